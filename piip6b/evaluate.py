"""Evaluation, the twin of `piip6b.train`: a finished model on the config's validation split.

`evaluate_model` is the pass both paths share (the trainer's periodic and final evaluation, and
`piip6b eval`): every rank evaluates its share of the images and the metrics are gathered.
`evaluate` builds the model from the config without DeepSpeed (every rank holds the whole model in
the training dtype: bf16 for the 6B presets, ~15 GB, one GPU) and fills it from an exported file,
a checkpoint folder or a run dir. `start` is what `piip6b eval` calls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from piip6b import dist
from piip6b.devices import model_device, to_device
from piip6b.tasks.evaluation.results import EvalResults

log = logging.getLogger("piip6b.evaluate")

COMMAND = "piip6b eval"  # how failures of its ranks are reported (`distributed.report_failure`)


class EvalWeightsError(ValueError):
    """The weights do not cover the model exactly; nothing was evaluated."""


def evaluate_model(cfg, task: Any, model: nn.Module, visualize: int = 0, predictions_file: Path | None = None,
                   should_stop: Callable[[], bool] | None = None) -> tuple[EvalResults, list[tuple[str, torch.Tensor]]]:
    """(results, drawn predictions) of `model` on `cfg.evaluation.split`; collective.

    The model is put in eval mode for the pass and back into the mode it was in afterwards.
    An empty or absent split gives empty results and no drawings. With `predictions_file`, rank 0
    writes the gathered predictions there (COCO results JSON; detection only). With `should_stop`
    (a collective, e.g. the trainer's `PreemptionWatcher.should_stop`), every rank asks it before
    each batch and all raise `piip6b.engine.preemption.Preempted` at the same batch when it says so.
    """
    from piip6b.tasks.data.loader import build_dataloader

    dataset = task.build_dataset(cfg.evaluation.split)
    if dataset is None or len(dataset) == 0:
        return EvalResults({}), []
    loader = build_dataloader(dataset, cfg.data, task.eval_collate, train=False, rank=dist.rank(),
                              world_size=dist.world_size(), seed=cfg.seed)
    if should_stop is not None:
        from piip6b.engine.preemption import PreemptibleLoader

        loader = PreemptibleLoader(loader, should_stop)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = task.evaluate(model, loader, predictions_file=predictions_file)
            images = []
            if visualize:
                batch = to_device(next(iter(loader)), model_device(model))
                images = task.visualize(model, batch)[:visualize]
    finally:
        model.train(was_training)
    return results, images


def load_model_weights(model: nn.Module, path: str | Path, verbose: bool = True) -> str:
    """Fill every parameter and buffer of `model` from `path`; returns what was loaded.

    `path` is an exported model file (`piip6b export RUN_DIR --out model.safetensors`: backbone
    under `backbone.` and the heads), a checkpoint folder (`.../checkpoints/step_N`) or a run dir
    (its newest complete checkpoint, consolidated from the ZeRO shards on the fly). Raises
    EvalWeightsError (or the weights/checkpoint modules' own errors) when any model tensor would be
    left at its initial value: evaluating random heads would report a meaningless number.
    """
    from piip6b.engine.consolidate import find_checkpoint, load_checkpoint_into

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
    checkpoint = find_checkpoint(path)
    load_checkpoint_into(model, checkpoint)
    return str(checkpoint)


def evaluate(cfg, weights: str | Path, predictions_file: Path | None = None) -> EvalResults:
    """Build the task's model as trained, load `weights`, and evaluate (call on every rank)."""
    from piip6b.engine import distributed
    from piip6b.tasks import build_task

    env = distributed.init_distributed()
    task = build_task(cfg)
    with torch.device(env.device):
        model = task.build_model(cfg.model.build())
    source = load_model_weights(model, weights, verbose=env.is_main)
    if cfg.engine.bf16:
        # The dtype the model was trained in; the heads still compute in fp32 (float32_compute).
        model.to(torch.bfloat16)
    results, _ = evaluate_model(cfg, task, model, predictions_file=predictions_file)
    if env.is_main:
        log.info("evaluated %s on %s/%s", source, cfg.task, cfg.evaluation.split)
    return results


def start(config_path: str, overrides: list[str], weights: str, nproc: int | None = None,
          out: Path | None = None, predictions_file: Path | None = None) -> int:
    """`piip6b eval`: validate here, start `nproc` local ranks (or join the job), and print the
    metrics (and write `out`, and the COCO-format predictions to `predictions_file`) once, from
    rank 0."""
    from piip6b.config import load_config
    from piip6b.engine import distributed

    cfg = load_config(config_path, overrides)  # a ConfigError here, before any rank starts
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if not Path(weights).exists():
        raise EvalWeightsError(f"--weights {weights}: no such file or directory")
    if predictions_file is not None and cfg.task != "detection":
        raise ValueError(f"--out-predictions writes COCO results, which exist for detection only "
                         f"(this config's task is {cfg.task})")
    job = (config_path, list(overrides), weights, out, predictions_file)
    if nproc is not None and nproc > 1:
        return distributed.spawn_local(nproc, _evaluate_rank, job, command=COMMAND, run_dir=cfg.run_dir)
    return distributed.run_entry(COMMAND, _evaluate_rank, *job, run_dir=cfg.run_dir)


def _evaluate_rank(config_path: str, overrides: list[str], weights: str, out: Path | None,
                   predictions_file: Path | None) -> int:
    from piip6b.config import load_config
    from piip6b.engine import distributed

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = evaluate(load_config(config_path, overrides), weights, predictions_file)
        is_main = dist.is_main()  # asked before teardown, which leaves the process group
    finally:
        distributed.teardown()
    if is_main:
        if results.per_class:
            log.info("per-class results:\n%s", results.class_table())
        text = json.dumps(results.to_json(), indent=2)
        print(text, flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
    return 0
