"""The `piip6b` command line: one sub-command per module in `piip6b.commands`.

Sub-command modules are imported only when chosen, so `piip6b params` never pays for DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> (module under piip6b.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("params", "count backbone parameters of a preset (on the meta device)"),
    "flops": ("flops", "count backbone FLOPs of a preset in the README's and the full convention"),
    "demo": ("demo", "the embedded default job on the synthetic dataset (CPU)"),
    "train": ("train", "train from a config (joins torchrun/srun, or --nproc N local ranks)"),
    "check": ("check", "resolve a config for N ranks and run the pre-flight checks, starting nothing"),
    "eval": ("eval", "evaluate a finished run or an exported checkpoint"),
    "export": ("export", "consolidate a sharded checkpoint into one safetensors file"),
    "convert": ("convert", "convert pretrained / released weights into this project's key layout"),
    "make-shapes": ("make_shapes", "write the synthetic shapes dataset (COCO and ADE20K layouts)"),
    "plan": ("plan", "estimate per-GPU memory and communication for a preset and cluster"),
    "env": ("env", "versions, GPUs, the attention/deformable kernels and JIT op cache a run would use here"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in COMMANDS.items()
        if importlib.util.find_spec(f"piip6b.commands.{spec[0]}") is not None
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="piip6b", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    available = _available()
    chosen = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module_name, help_text) in available.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if chosen == [name]:
            module = importlib.import_module(f"piip6b.commands.{module_name}")
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as error:
        # Mistakes a user can make (unknown preset or key, bad shape, missing or existing file):
        # one clear line instead of a traceback, unless asked for.
        if os.environ.get("PIIP6B_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"piip6b {args.command}: error: {message}", file=sys.stderr)
        print("(set PIIP6B_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
