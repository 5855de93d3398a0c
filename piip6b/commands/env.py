"""`piip6b env [--json]`: versions, GPUs, the attention backend and deformable kernel a run would
use here, and whether DeepSpeed's JIT op cache is warm (see `piip6b.environment`)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from piip6b.environment import collect, format_report

    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
