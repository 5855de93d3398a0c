"""`piip6b check CONFIG [key=value ...] [--world-size N] [--nodes M] [--gpu-mem GiB] [--json]`.

Resolves the recipe for N ranks and runs the pre-flight (piip6b.preflight) in this process, without
starting any rank or writing anything: on a login node before `sbatch`, and in `slurm/train_6b.sh`
before `srun`. Prints the start-up summary (with --json its facts as one object) and exits 0, warnings
included; a problem is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for `piip6b train`")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the job to check (default 1)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes the ranks are spread over (default: world size / 8 when it divides, else 1)")
    parser.add_argument("--gpu-mem", type=float, default=None, metavar="GIB",
                        help="memory per GPU for the plan (default: engine.gpu_mem_gib, else this machine's GPU)")
    parser.add_argument("--json", action="store_true", help="print the summary's facts as one JSON object")


def run(args: argparse.Namespace) -> int:
    from piip6b.preflight import check

    summary = check(args.config, args.overrides, args.world_size, nodes=args.nodes, gpu_mem_gib=args.gpu_mem)
    print(json.dumps(summary.to_dict()) if args.json else summary.text(), flush=True)
    return 0
