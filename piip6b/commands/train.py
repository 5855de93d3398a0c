"""`piip6b train CONFIG [key=value ...] [--nproc N] [--resume PATH]`.

Under torchrun / `python -m launch` (srun) each process joins the job from the env:// variables;
with `--nproc N` this process starts N local ranks itself.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. optim.lr=2e-4 run_dir=runs/try1")
    parser.add_argument("--nproc", type=int, default=None,
                        help="start this many local ranks (no torchrun/srun needed)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="resume from this checkpoint (or run dir); failing to load it is an error")


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides)
    if args.resume:
        extra.append(f"checkpoint.resume={args.resume}")
    return extra


def _run_rank(config_path: str, overrides: list[str]) -> int:
    from piip6b.config import load_config
    from piip6b.train import train

    return train(load_config(config_path, overrides))


def run(args: argparse.Namespace) -> int:
    from piip6b.config import ConfigError, load_config

    overrides = _overrides(args)
    try:
        load_config(args.config, overrides)  # fail fast, before any rank starts
    except ConfigError as exc:
        print(f"piip6b train: {exc}", file=sys.stderr)
        return 2
    if args.nproc is not None and args.nproc > 1:
        from piip6b.engine.distributed import spawn_local

        return spawn_local(args.nproc, _run_rank, (args.config, overrides))
    return _run_rank(args.config, overrides)
