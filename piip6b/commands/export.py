"""`piip6b export RUN_DIR [--step S] --out model.safetensors [--dtype bf16|fp32] [--backbone-only]`

Consolidates the ZeRO shards of one complete checkpoint into a single safetensors file in the
reference's key layout (see `piip6b.engine.consolidate`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

DTYPES = ("bf16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (or its checkpoints/ folder)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16",
                        help="dtype of floating-point tensors in the file (default: bf16)")
    parser.add_argument("--backbone-only", action="store_true",
                        help="write only the backbone, with bare reference keys (no 'backbone.' prefix)")


def run(args: argparse.Namespace) -> int:
    import torch

    from piip6b.engine.consolidate import export_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    metadata = export_checkpoint(args.run_dir, args.out, step=args.step, dtype=dtype, backbone_only=args.backbone_only)
    print(f"exported {metadata['piip6b.source']} -> {args.out} {json.dumps(metadata)}")
    return 0
