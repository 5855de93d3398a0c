"""`piip6b convert SRC --preset P [--target branch1] --out X.safetensors`

Converts a pretrained file (InternViT-6B release or Hugging Face layout, MAE, DeiT, DeiT III), a
released PIIP checkpoint (mmdetection / DeepSpeed) or one of our own files into ONE safetensors
file in this project's (the reference's) key layout for the preset's backbone. The preset is
built on the meta device (no memory); tensors stream from the source's memory map to the output,
so converting the 12 GB 6B file needs about one tensor of extra memory. The output's metadata
records the source, its sha256, the format read, every conversion and the hash of the output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from piip6b.weights.layouts import LAYOUTS

    parser.add_argument("source", help="weight file, a model.safetensors.index.json, or a Hugging Face model folder")
    parser.add_argument("--preset", required=True, help="backbone preset whose key layout and shapes to produce")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument("--target", default=None,
                        help="module the source fills, e.g. branch1 / branch2 (required for a single pretrained ViT "
                             "into a multi-branch preset); default: the whole backbone")
    parser.add_argument("--format", default="auto", choices=["auto", *sorted(LAYOUTS)],
                        help="source key layout (default: detected from the key names)")
    parser.add_argument("--dtype", default="source", choices=["source", *_DTYPES],
                        help="output dtype; 'source' keeps each tensor's dtype from the file (resizes computed in fp32)")
    parser.add_argument("--allow-missing", action="append", default=[], metavar="REGEX",
                        help="model names (full match) allowed to be absent from the source; repeatable")
    parser.add_argument("--allow-unexpected", action="append", default=[], metavar="REGEX",
                        help="source names (full match) allowed to be left unused; repeatable")
    parser.add_argument("--no-source-hash", action="store_true",
                        help="skip hashing the source file (saves one read of it)")


def _default_target(layout_full_names: bool, spec: dict) -> str | None:
    if layout_full_names:
        return None
    branches = sorted({k.split(".")[0] for k in spec if re.match(r"branch\d+\.", k)})
    if branches:
        raise SystemExit(
            f"error: a single pretrained ViT fills one branch; pass --target (one of {', '.join(branches)})."
        )
    return None


def run(args: argparse.Namespace) -> int:
    from piip6b.models import create_backbone
    from piip6b.weights import WeightsFormatError, WeightsLoadError, file_sha256, open_source, plan_load, target_spec
    from piip6b.weights.export import write_safetensors
    from piip6b.weights.formats import TensorInfo
    from piip6b.weights.layouts import get_layout

    try:
        with torch.device("meta"):
            spec = target_spec(create_backbone(args.preset))
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    out_dtype = _DTYPES.get(args.dtype)
    try:
        source = open_source(args.source)
    except WeightsFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with source:
        try:
            layout = get_layout(args.format, source)
            target = args.target if args.target is not None else _default_target(layout.full_names, spec)
            if layout.name == "piip6b" and args.target is None:
                target = source.metadata.get("piip6b.target") or None
            plan = plan_load(source, spec, target=target, format=layout.name,
                             allow_missing=args.allow_missing, allow_unexpected=args.allow_unexpected)
        except (WeightsFormatError, WeightsLoadError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(plan.report.summary())

        def out_dtype_of(entry) -> torch.dtype:
            if out_dtype is not None:
                return out_dtype
            return source.info(entry.source).dtype if entry.source is not None else entry.dst.dtype

        header = [(e.target, TensorInfo(e.dst.shape, out_dtype_of(e))) for e in plan.entries]
        dtypes = dict(header)

        def stream():
            for name, tensor in plan.tensors(cast=False):
                yield name, tensor.to(dtypes[name].dtype)

        report = plan.report
        metadata = {
            "piip6b.kind": "converted",
            "piip6b.preset": args.preset,
            "piip6b.source": str(Path(args.source).resolve()),
            "piip6b.source_format": layout.name,
            "piip6b.source_container": source.container or "",
            "piip6b.source_sha256": "" if args.no_source_hash else file_sha256(source.path),
            "piip6b.conversions": json.dumps({
                "resized": [[n, list(a), list(b), "bicubic"] for n, a, b in report.resized],
                "filled": [[n, why] for n, why in report.filled],
                "renamed": [[a, b, why] for a, b, why in report.renamed],
                "ignored": [[n, why] for n, why in report.ignored],
                "missing_allowed": report.missing,
                "unexpected_allowed": report.unexpected,
                "dtype": args.dtype,
            }),
        }
        digest = write_safetensors(args.out, header, stream(), metadata, target=target or "")
    print(f"wrote {args.out} ({len(header)} tensors, sha256 of tensor data {digest})")
    return 0
