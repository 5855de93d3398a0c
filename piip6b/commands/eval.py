"""`piip6b eval CONFIG [key=value ...] --weights PATH [--nproc N] [--out metrics.json]`

Evaluates a finished model on the config's validation split. PATH is an exported model file
(`piip6b export RUN_DIR --out model.safetensors`, whole model: backbone under `backbone.` and the
heads), a checkpoint folder (`.../checkpoints/step_N`), or a run dir (its newest complete
checkpoint, consolidated from the ZeRO shards on the fly).

No DeepSpeed engine: every rank holds the whole model in the training dtype (bf16 for the 6B
presets: ~15 GB, one GPU), evaluates its share of the images, and the metrics are gathered.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class EvalWeightsError(ValueError):
    """The weights do not cover the model exactly; nothing was evaluated."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML the model was trained with (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.root=/data/coco")
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="exported .safetensors, a checkpoint folder, or a run dir")
    parser.add_argument("--nproc", type=int, default=None, help="start this many local ranks")
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")


def load_model_weights(model: nn.Module, path: str | Path, verbose: bool = True) -> str:
    """Fill every parameter and buffer of `model` from `path`; returns what was loaded.

    Raises EvalWeightsError (or the weights/checkpoint modules' own errors) when any model tensor
    would be left at its initial value: evaluating random heads would report a meaningless number.
    """
    path = Path(path)
    if not path.exists():
        raise EvalWeightsError(f"--weights {path}: no such file or directory")
    if path.is_file():
        from piip6b.weights import load_pretrained

        report = load_pretrained(model, path, log=print if verbose else None)
        untouched = report.missing + [name for name, _ in report.filled]
        if untouched:
            shown = ", ".join(untouched[:8]) + (f", ... ({len(untouched)} in all)" if len(untouched) > 8 else "")
            raise EvalWeightsError(
                f"--weights {path} has no values for {shown}. Evaluation needs the whole model: "
                f"export it without --backbone-only (`piip6b export RUN_DIR --out FILE`)"
            )
        return str(path)
    return _load_checkpoint(model, path)


def _load_checkpoint(model: nn.Module, path: Path) -> str:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from piip6b.engine.checkpoint import CHECKPOINTS_SUBDIR, CheckpointManager

    run_dir = path.parent if path.name == CHECKPOINTS_SUBDIR else path
    checkpoint = CheckpointManager(run_dir).find_resume(explicit=path)
    # Lazy: each fp32 master tensor is assembled from the shards only when it is copied.
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    # DeepSpeed's consolidation holds parameters only; buffers (none in these heads) keep their values.
    missing = [name for name in missing if name in dict(model.named_parameters())]
    if missing or unexpected:
        raise EvalWeightsError(
            f"checkpoint {checkpoint} does not match the model built from the config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. Pass the config the run was trained with"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            if name not in state:
                continue
            value = state[name].contiguous()
            if tuple(value.shape) != tuple(tensor.shape):
                raise EvalWeightsError(f"checkpoint {checkpoint}: {name} has shape {tuple(value.shape)}, "
                                       f"the model {tuple(tensor.shape)}")
            tensor.copy_(value)
    return str(checkpoint)


def evaluate(cfg, weights: str | Path) -> dict[str, float]:
    """Build the task's model as trained, load `weights`, and evaluate (call on every rank)."""
    from piip6b.engine import distributed
    from piip6b.tasks import build_task
    from piip6b.tasks.data.loader import build_dataloader

    env = distributed.init_distributed()
    task = build_task(cfg)
    with torch.device(env.device):
        model = task.build_model(cfg.model.build())
    source = load_model_weights(model, weights, verbose=env.is_main)
    if cfg.engine.bf16:
        # The dtype the model was trained in; the heads still compute in fp32 (float32_compute).
        model.to(torch.bfloat16)
    model.eval()
    dataset = task.build_dataset(cfg.evaluation.split)
    loader = build_dataloader(dataset, cfg.data, task.collate, train=False, rank=env.rank,
                              world_size=env.world_size, seed=cfg.seed)
    metrics = task.evaluate(model, loader)
    if env.is_main:
        log.info("evaluated %s on %s/%s", source, cfg.task, cfg.evaluation.split)
    return metrics


def _run_rank(config_path: str, overrides: list[str], weights: str, out: Path | None) -> int:
    from piip6b.config import load_config
    from piip6b.engine import distributed

    from piip6b.engine.checkpoint import CheckpointError
    from piip6b.weights import WeightsFormatError, WeightsLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = evaluate(load_config(config_path, overrides), weights)
    except (EvalWeightsError, WeightsLoadError, WeightsFormatError, CheckpointError) as exc:
        print(f"piip6b eval: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        print(json.dumps(metrics, indent=2, sort_keys=True))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from piip6b.config import ConfigError, load_config

    try:
        load_config(args.config, args.overrides)  # fail fast, before any rank starts
    except ConfigError as exc:
        print(f"piip6b eval: {exc}", file=sys.stderr)
        return 2
    if not Path(args.weights).exists():
        print(f"piip6b eval: --weights {args.weights}: no such file or directory", file=sys.stderr)
        return 2
    job = (args.config, list(args.overrides), args.weights, args.out)
    if args.nproc is not None and args.nproc > 1:
        from piip6b.engine.distributed import spawn_local

        return spawn_local(args.nproc, _run_rank, job)
    return _run_rank(*job)
