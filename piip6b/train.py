"""The training loop. Reads top to bottom: join, build, shard, resume, loop, save, leave.

Every rank runs the same code; the only rank-0-only work is writing metrics and the manifest.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from piip6b.config import ExperimentConfig, config_hash, to_dict
from piip6b.engine import distributed, metrics, optim, schedule, sharding
from piip6b.engine.checkpoint import CheckpointManager, code_version
from piip6b.engine.preemption import EXIT_PREEMPTED, PreemptionWatcher
from piip6b.engine.rng import derive_seed, seed_everything
from piip6b.tasks import model_device, to_device

log = logging.getLogger("piip6b.train")

# DeepSpeed calls torch's deprecated collective names on every step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (engine.nonfinite: stop)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples drawn, across all ranks (the sampler position)
    skipped_steps: int = 0


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _model_flops_per_image(cfg: ExperimentConfig) -> float:
    """Backbone forward FLOPs (2 x MACs, as built) for one square image at the largest input."""
    from piip6b.models.counting import count_flops

    return 2e9 * count_flops(cfg.model.preset, img_sizes=cfg.model.img_sizes).gflops_full


def _all_mean(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean over ranks of each scalar (one collective; called at logging steps only)."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stacked)
        stacked /= torch.distributed.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def train(cfg: ExperimentConfig, task: Any | None = None) -> int:
    """Run (or resume) the experiment; returns the process exit code (0, or 75 when preempted)."""
    env = distributed.init_distributed()
    _setup_logging(env.is_main)
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(to_dict(cfg), sort_keys=False))

    if task is None:
        from piip6b.tasks import build_task

        task = build_task(cfg)

    # ---- data and the resume point first: a wrong data path or --resume fails in seconds,
    # before the (6B) model is built and sharded
    from piip6b.tasks.data.loader import build_dataloader

    dataset = task.build_dataset("train")
    global_batch = cfg.data.batch_size * env.world_size * cfg.engine.grad_accum_steps
    steps_per_epoch = max(1, len(dataset) // global_batch)
    lr_schedule = schedule.LRSchedule(cfg.schedule, steps_per_epoch)
    total_steps = lr_schedule.total_steps
    ckpt = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last,
                             universal_workers=cfg.checkpoint.universal_workers)
    resume_from = ckpt.find_resume(cfg.checkpoint.resume) if (
        cfg.checkpoint.resume or cfg.checkpoint.auto_resume) else None
    ckpt.set_aside_newer_than(ckpt.validate(resume_from).step if resume_from is not None else 0)

    # ---- build: the same seed on every rank, so un-partitioned modules start identical
    seed_everything(cfg.seed)
    ds_config = sharding.deepspeed_config(cfg.engine, cfg.optim, cfg.data.batch_size, env.world_size)
    with sharding.model_construction(cfg.engine, ds_config):
        backbone = cfg.model.build()
        model = task.build_model(backbone)
    sharding.partition_built_model(model, cfg.engine, ds_config)
    if cfg.model.pretrained:
        _load_pretrained(backbone, cfg.model.pretrained)
    if cfg.engine.bf16:
        sharding.cast_partitioned_params(model, torch.bfloat16)

    param_groups, group_infos = optim.build_param_groups(model, backbone, cfg.optim)
    if env.is_main and cfg.logging.print_groups:
        print(optim.format_group_table(group_infos, cfg.optim.lr), flush=True)
    optimizer = optim.build_optimizer(param_groups, cfg.optim)

    engine, optimizer = sharding.initialize(model, optimizer, ds_config)

    # ---- resume
    state = TrainState()
    started = time.perf_counter()
    if resume_from is not None:
        client = ckpt.load(engine, resume_from, expected_config_hash=config_hash(cfg))
        state = TrainState(step=int(client["step"]), consumed_samples=int(client["consumed_samples"]),
                           skipped_steps=int(client.get("skipped_steps", 0)))
        log.info("resumed at step %d (%d samples consumed)", state.step, state.consumed_samples)
    else:
        # Different streams per rank from here on: augmentation and drop path must differ by rank.
        seed_everything(derive_seed(cfg.seed, "train", env.rank))

    # An epoch-based schedule is a number of samples: after a resume at another world size the
    # global batch differs, and the step counter (kept continuous for logs and checkpoints) no
    # longer says how far along it is; the consumed-sample count does. An iteration-based one
    # (`max_iters`) counts optimizer steps, whatever their size.
    if cfg.schedule.max_epochs:
        total_samples = total_steps * global_batch
        last_step = state.step + max(0, -(-(total_samples - state.consumed_samples) // global_batch))
        schedule_position = lambda: state.consumed_samples // global_batch  # noqa: E731
    else:
        last_step = total_steps
        schedule_position = lambda: state.step  # noqa: E731
    writer = metrics.MetricsWriter(run_dir, cfg.logging, env.is_main, last_step, resume_step=state.step)
    # forward + backward; only rank 0 reports it (a meta-device forward, cheap but not free)
    flops_per_image = 3 * _model_flops_per_image(cfg) if env.is_main else 0.0
    peak_flops = metrics.device_peak_flops(env.device)
    num_layers = int(getattr(backbone, "num_layers", 0))
    top_backbone = [g for g in group_infos if g.layer_id is not None and g.layer_id <= num_layers]
    backbone_top_scale = max((g.lr_scale for g in top_backbone), default=1.0)

    def save(step: int) -> None:
        ckpt.save(engine, step, {
            "consumed_samples": state.consumed_samples,
            "epoch": state.consumed_samples // max(1, len(dataset)),
            "skipped_steps": state.skipped_steps,
            "seed": cfg.seed,
            "config": to_dict(cfg),
            "config_hash": config_hash(cfg),
            "code_version": code_version(),
        })

    # ---- loop
    # The sampler is endless: one iterator from the resumed global position serves the whole run.
    loader = build_dataloader(dataset, cfg.data, task.collate, train=True, rank=env.rank,
                              world_size=env.world_size, seed=cfg.seed,
                              consumed_samples=state.consumed_samples)
    batches = iter(loader)
    watcher = PreemptionWatcher(env.device).install()
    window = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0, "images": 0, "steps": 0}
    first_step_logged = False
    first_step = state.step + 1
    exit_code = 0
    engine.train()
    try:
        while state.step < last_step:
            factor = lr_schedule.factor(schedule_position())
            schedule.apply_lr(optimizer, cfg.optim.lr, factor)
            step_losses: dict[str, torch.Tensor] = {}
            for _ in range(cfg.engine.grad_accum_steps):
                t0 = time.perf_counter()
                batch = to_device(next(batches), env.device)
                t1 = time.perf_counter()
                loss_terms = engine(batch)
                loss = sum(loss_terms.values())
                engine.backward(loss)
                t2 = time.perf_counter()
                engine.step()  # a no-op until the accumulation boundary
                t3 = time.perf_counter()
                window["data"] += t1 - t0
                window["fwd_bwd"] += t2 - t1
                window["optim"] += t3 - t2
                window["images"] += cfg.data.batch_size
                state.consumed_samples += cfg.data.batch_size * env.world_size
                for k, v in {**loss_terms, "loss": loss}.items():
                    step_losses[k] = step_losses.get(k, 0) + v.detach().float() / cfg.engine.grad_accum_steps
            state.step += 1
            window["steps"] += 1
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not engine.was_step_applied():
                state.skipped_steps += 1
                terms = ", ".join(f"{k}={float(v):.4g}" for k, v in step_losses.items())
                message = (f"non-finite loss or gradient at step {state.step} (grad norm {grad_norm}; "
                           f"loss terms on rank {env.rank}: {terms})")
                if cfg.engine.nonfinite == "stop":
                    save(state.step)
                    raise NonFiniteError(message + f"; checkpoint saved in {ckpt.root}. Lower the lr, "
                                         "check the data, or set engine.nonfinite=skip")
                log.warning("%s: step skipped (%d so far)", message, state.skipped_steps)

            if state.step % cfg.logging.interval == 0 or state.step == last_step or not first_step_logged:
                first_step_logged = True
                losses = _all_mean(step_losses, env.device)
                elapsed = window["data"] + window["fwd_bwd"] + window["optim"]
                images_per_s = window["images"] * env.world_size / max(elapsed, 1e-9)
                achieved = flops_per_image * window["images"] / max(elapsed, 1e-9)  # per device
                scalars = {
                    "loss": losses.pop("loss"),
                    **{f"loss/{k}": v for k, v in losses.items()},
                    "lr": cfg.optim.lr * factor,
                    "lr/head": cfg.optim.lr * factor,
                    "lr/backbone_top": cfg.optim.lr * factor * backbone_top_scale,
                    "grad_norm": grad_norm,
                    "skipped_steps": state.skipped_steps,
                    "epoch": state.consumed_samples / max(1, len(dataset)),
                    "perf/images_per_s": images_per_s,
                    "perf/data_s": window["data"] / window["steps"],
                    "perf/fwd_bwd_s": window["fwd_bwd"] / window["steps"],
                    "perf/optim_s": window["optim"] / window["steps"],
                    "perf/tflops_per_device": achieved / 1e12,
                    "perf/mfu": achieved / peak_flops,
                    "memory/peak_gib": metrics.peak_memory_bytes(env.device) / 2**30,
                }
                if state.step == first_step:
                    scalars["perf/time_to_first_step_s"] = time.perf_counter() - started
                writer.log(state.step, scalars)
                window = {k: 0 for k in window}

            if cfg.evaluation.interval and state.step % cfg.evaluation.interval == 0 and state.step < last_step:
                _evaluate(cfg, task, engine, writer, state.step)
            if state.step % cfg.checkpoint.every_steps == 0 and state.step < last_step:
                save(state.step)
            if watcher.should_stop():
                watcher.saving = True
                save(state.step)
                if env.is_main:
                    print(f"preempted at step {state.step}: checkpoint saved in {ckpt.root}; exiting "
                          f"with {EXIT_PREEMPTED} so the job is requeued", flush=True)
                exit_code = EXIT_PREEMPTED
                break
        else:
            save(state.step)
            if cfg.evaluation.at_end:
                _evaluate(cfg, task, engine, writer, state.step)
    finally:
        watcher.uninstall()
        writer.close()
        distributed.teardown(engine)
    return exit_code


def _evaluate(cfg: ExperimentConfig, task: Any, engine: Any, writer: metrics.MetricsWriter,
              step: int) -> None:
    dataset = task.build_dataset(cfg.evaluation.split)
    if dataset is None or len(dataset) == 0:
        return
    from piip6b.tasks.data.loader import build_dataloader

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    loader = build_dataloader(dataset, cfg.data, task.collate, train=False, rank=rank,
                              world_size=world, seed=cfg.seed)
    engine.eval()
    try:
        with torch.no_grad():
            results = task.evaluate(engine, loader)
        writer.log(step, {f"eval/{k}": v for k, v in results.items()})
        if cfg.evaluation.visualize:
            batch = to_device(next(iter(loader)), model_device(engine))
            writer.log_images(step, task.visualize(engine, batch)[: cfg.evaluation.visualize])
    finally:
        engine.train()


def _load_pretrained(backbone: torch.nn.Module, files: dict[str, str]) -> None:
    """Stream each named weights file into the (possibly partitioned) backbone.

    The weights loader validates every key and shape against the target (partitioned
    parameters report their `ds_shape`) and prints its report before the first tensor moves;
    the engine then copies tensor by tensor under `GatheredParameters`.
    """
    from piip6b.weights import iter_converted

    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for target, path in files.items():
        if target != "backbone" and not isinstance(getattr(backbone, target, None), torch.nn.Module):
            raise ValueError(f"model.pretrained names {target!r}, which the backbone does not have "
                             f"(use 'backbone' or a branch name such as 'branch1')")
        subtree = None if target == "backbone" else target
        stream = iter_converted(path, backbone, target=subtree, log=log.info if is_rank0 else None)
        missing = [n for n in sharding.load_pretrained_streaming(backbone, stream)
                   if subtree is None or n.startswith(subtree + ".")]
        if missing:
            log.info("pretrained %s: %d parameters not in %s (new by construction, trained from their init), e.g. %s",
                     target, len(missing), path, missing[:3])