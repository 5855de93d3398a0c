"""`piip6b train CONFIG [key=value ...] [--nproc N] [--resume PATH]`.

Under torchrun / `python launch/rank.py` (srun) each process joins the job from the env://
variables; with `--nproc N` this process starts N local ranks itself.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=2e-4 run_dir=runs/try1")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start this many local ranks (no torchrun/srun needed)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="resume from this checkpoint (or run dir); failing to load it is an error")


def run(args: argparse.Namespace) -> int:
    from piip6b.train import start

    resume = [f"checkpoint.resume={args.resume}"] if args.resume else []
    return start(args.config, [*args.overrides, *resume], args.nproc)
