"""The `piip6b` command line: one sub-command per module in `piip6b.commands`.

Sub-command modules are imported only when chosen, so `piip6b params` never pays for DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    """Run one sub-command; returns its exit code. A failure is one line on stderr (see
    `piip6b.engine.distributed.report_failure`): exit code 2 when its message says what to fix,
    1 otherwise; `PIIP6B_DEBUG=1` adds the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="piip6b", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None
    for name, (module_name, help_text) in _available().items():
        sub_parser = sub.add_parser(name, help=help_text)
        if argv[:1] == [name]:
            chosen = sub_parser, importlib.import_module(f"piip6b.commands.{module_name}")
    if chosen is None:
        parser.parse_args(argv)  # --help, no command or an unknown one: argparse says so and exits
        parser.error(f"unknown command {argv[0]!r}")
    sub_parser, module = chosen
    module.add_arguments(sub_parser)
    # Options before, between or after the positionals: `train CFG --nproc 2 key=v` works as
    # `train CFG key=v --nproc 2` does (plain parse_args stops the key=value list at the option).
    args = sub_parser.parse_intermixed_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - one line and an exit code, whatever went wrong
        from piip6b.engine.distributed import report_failure

        return report_failure(f"piip6b {argv[0]}", error)


if __name__ == "__main__":
    sys.exit(main())
