"""`piip6b make-shapes OUT`: write the synthetic shapes data set in the COCO and ADE20K layouts."""

from __future__ import annotations

import argparse

from piip6b.tasks.data.shapes import ShapesSpec, write_shapes_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ShapesSpec()
    parser.add_argument("out", help="output folder (gets coco/ and ade/ sub-folders)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="training images")
    parser.add_argument("--num-val", type=int, default=defaults.num_val, help="validation images")
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help="smallest image side (px)")
    parser.add_argument("--max-size", type=int, default=defaults.max_size, help="largest image side (px)")
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects, help="shapes per image, at most")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    spec = ShapesSpec(args.num_train, args.num_val, args.min_size, args.max_size, args.max_objects, args.seed)
    out = write_shapes_dataset(args.out, spec, overwrite=args.overwrite)
    print(f"wrote {spec.num_train} train + {spec.num_val} val images to {out}/coco (COCO) and {out}/ade (ADE20K)")
    print(f"  detection: data.root={out}/coco  (3 classes)   segmentation: data.root={out}/ade  (4 classes)")
    return 0
