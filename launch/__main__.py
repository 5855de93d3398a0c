"""`python -m launch <piip6b args...>`: export env:// variables for this rank, then run piip6b.

`python -m launch --print-env` prints the derived variables as one JSON line per process instead
(no torch import), e.g. `srun python -m launch --print-env` to check a job's layout.
`python -m launch --print-run-dir CONFIG [key=value ...]` prints the experiment's run directory
as the trainer resolves it (the batch scripts send their log there before any rank starts).
"""

from __future__ import annotations

import json
import sys

from launch.dist_defaults import apply_env_defaults
from launch.env import LaunchEnvError, detect, export

PRINT_ENV_FLAG = "--print-env"
PRINT_RUN_DIR_FLAG = "--print-run-dir"


def print_run_dir(args: list[str]) -> int:
    if not args:
        print(f"launch: {PRINT_RUN_DIR_FLAG} needs a config file", file=sys.stderr)
        return 2
    from piip6b.config import ConfigError, load_config

    try:
        print(load_config(args[0], args[1:]).run_dir, flush=True)
    except ConfigError as error:
        print(f"launch: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PRINT_RUN_DIR_FLAG]:
        return print_run_dir(argv[1:])
    try:
        dist = detect()
    except LaunchEnvError as error:
        print(f"launch: {error}", file=sys.stderr)
        return 2
    if argv[:1] == [PRINT_ENV_FLAG]:
        print(json.dumps({"launcher": dist.launcher, **dist.torch_environ()}, sort_keys=True), flush=True)
        return 0
    export(dist)
    applied = apply_env_defaults()
    if dist.rank == 0:
        defaults = ", ".join(f"{k}={v}" for k, v in applied.items()) or "none needed"
        print(f"launch: {dist.describe()}; defaults set: {defaults}", file=sys.stderr, flush=True)

    from piip6b.cli import main as piip6b_main

    return piip6b_main(argv)


if __name__ == "__main__":
    sys.exit(main())
