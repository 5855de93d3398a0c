"""`piip6b params PRESET [--json] [--keys]`: exact parameter counts on the meta device."""

from __future__ import annotations

import argparse
import json

import torch

from piip6b.models import create_backbone, list_presets
from piip6b.models.counting import count_params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help=f"one of: {', '.join(list_presets())}")
    parser.add_argument("--img-sizes", type=int, nargs="+", help="per-branch input sizes, branch 1 first")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keys", action="store_true", help="print the state dict as key<TAB>[shape]<TAB>numel")


def run(args: argparse.Namespace) -> int:
    if args.keys:
        with torch.device("meta"):
            backbone = create_backbone(args.preset, args.img_sizes)
        for key, tensor in backbone.state_dict().items():
            print(f"{key}\t{list(tensor.shape)}\t{tensor.numel()}")
        return 0
    count = count_params(args.preset, args.img_sizes)
    if args.json:
        print(json.dumps({"preset": args.preset, "total": count.total, "readme_total": count.readme_total,
                          "by_part": count.by_part}))
        return 0
    print(f"{args.preset}: {count.total:,} parameters")
    for part, n in count.by_part.items():
        print(f"  {part:<14} {n:>15,}  ({n / 1e6:,.2f} M)")
    print(f"README convention: {count.readme_total:,} ({count.readme_total / 1e6:,.1f} M)")
    return 0
