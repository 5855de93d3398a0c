"""`piip6b flops PRESET [--input N] [--json]`: backbone multiply-accumulates in both conventions."""

from __future__ import annotations

import argparse
import json

from piip6b.models import list_presets
from piip6b.models.counting import count_flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help=f"one of: {', '.join(list_presets())}")
    parser.add_argument("--input", type=int, default=None, help="square input side (default: the largest branch size)")
    parser.add_argument("--img-sizes", type=int, nargs="+", help="per-branch sizes, branch 1 first")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    count = count_flops(args.preset, args.input, args.img_sizes)
    if args.json:
        print(json.dumps({"preset": args.preset, "input": count.input_size, "gflops_readme": count.gflops_readme,
                          "gflops_full": count.gflops_full, "by_part": count.by_part}))
        return 0
    print(f"{args.preset} at {count.input_size}x{count.input_size} (G = 1e9 multiply-accumulates)")
    print(f"  README convention: {count.gflops_readme:,.1f} G")
    print(f"  full backbone:     {count.gflops_full:,.1f} G")
    for part, g in count.by_part.items():
        print(f"    {part:<20} {g:>12,.1f} G")
    return 0
