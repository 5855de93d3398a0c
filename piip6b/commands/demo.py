"""`piip6b demo`: the embedded default job.

Until the training engine lands this runs one forward pass of a tiny preset on a random image and
prints the pyramid it returns.
"""

from __future__ import annotations

import argparse

import torch

from piip6b.models import create_backbone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="piip_h6b_tiny")


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    backbone = create_backbone(args.preset).eval()
    size = backbone.img_sizes[-1]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, size, size))
    print(f"{args.preset}: input 1x3x{size}x{size}, branch sizes {backbone.img_sizes}")
    for stride, fmap in zip((4, 8, 16, 32), features):
        print(f"  stride {stride:>2}: {tuple(fmap.shape)} {fmap.dtype}")
    return 0
