"""`piip6b demo [--out runs/demo] [--steps N] [--nproc 2] [key=value ...]`: the embedded default job
(see `piip6b.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from piip6b.demo import DEFAULT_DATA, DEFAULT_OUT, DEMO_CONFIG

    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. optim.lr=2e-4 (see configs/tiny/shapes_demo.yaml)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"run dir: checkpoints/, tb/ (TensorBoard), metrics.jsonl (default: {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: the config's schedule.max_iters)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (default: 2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shapes data set folder; written with the make-shapes defaults if absent "
                             f"(default: {DEFAULT_DATA})")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment YAML (default: the repository's {DEMO_CONFIG})")


def run(args: argparse.Namespace) -> int:
    from piip6b.demo import run_demo

    return run_demo(args.out, steps=args.steps, nproc=args.nproc, data=args.data, config=args.config,
                    overrides=args.overrides)
