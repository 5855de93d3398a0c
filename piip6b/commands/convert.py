"""`piip6b convert SRC --preset P [--target branch1] --out X.safetensors`

Converts a pretrained or released weight file into ONE safetensors file in this project's (the
reference's) key layout for the preset's backbone (see `piip6b.weights.convert`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from piip6b.weights.convert import DTYPES
    from piip6b.weights.layouts import LAYOUTS

    parser.add_argument("source", help="weight file, a model.safetensors.index.json, or a Hugging Face model folder")
    parser.add_argument("--preset", required=True, help="backbone preset whose key layout and shapes to produce")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument("--target", default=None,
                        help="module the source fills, e.g. branch1 / branch2 (required for a single pretrained ViT "
                             "into a multi-branch preset); default: the whole backbone")
    parser.add_argument("--format", default="auto", choices=["auto", *sorted(LAYOUTS)],
                        help="source key layout (default: detected from the key names)")
    parser.add_argument("--dtype", default="source", choices=["source", *DTYPES],
                        help="output dtype; 'source' keeps each tensor's dtype from the file (resizes computed in fp32)")
    parser.add_argument("--allow-missing", action="append", default=[], metavar="REGEX",
                        help="model names (full match) allowed to be absent from the source; repeatable")
    parser.add_argument("--allow-unexpected", action="append", default=[], metavar="REGEX",
                        help="source names (full match) allowed to be left unused; repeatable")
    parser.add_argument("--no-source-hash", action="store_true",
                        help="skip hashing the source file (saves one read of it)")


def run(args: argparse.Namespace) -> int:
    import torch

    from piip6b.models import create_backbone
    from piip6b.weights.convert import convert_file

    with torch.device("meta"):  # shapes and names only, no memory
        backbone = create_backbone(args.preset)
    digest = convert_file(args.source, backbone, args.out, preset=args.preset, target=args.target, format=args.format,
                          dtype=args.dtype, allow_missing=args.allow_missing,
                          allow_unexpected=args.allow_unexpected, hash_source=not args.no_source_hash)
    print(f"wrote {args.out} (sha256 of tensor data {digest})")
    return 0
