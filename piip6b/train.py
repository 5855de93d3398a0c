"""The training loop. Reads top to bottom: join, prepare, build, resume, loop, save, leave.

Every rank runs the same code; the only rank-0-only work is writing metrics and the manifest.
`start()` is what `piip6b train` calls: it checks the config in the launching process and starts
the ranks (or joins the ones torchrun/srun started).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from piip6b import dist
from piip6b.config import ExperimentConfig, config_hash, to_dict
from piip6b.engine import distributed, metrics, optim, schedule
from piip6b.engine.build import BatchLayout, BuiltEngine, build_engine
from piip6b.engine.checkpoint import CheckpointManager, FinishedRun, code_version, tag_for_step
from piip6b.engine.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatcher
from piip6b.engine.rng import derive_seed, seed_everything
from piip6b.engine.step import StepResult, train_step

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
    evaluation_pending: bool = False  # a periodic evaluation at `step` was preempted: run it first


def train(cfg: ExperimentConfig, task: Any | None = None) -> int:
    """Run (or resume) the experiment on this rank; returns the exit code (0, or 75 when preempted)."""
    # From the first moment: a USR1 while the model is built (minutes at 6B) stops the run before its
    # first step instead of killing the rank.
    watcher = PreemptionWatcher().install()
    env = distributed.init_distributed()
    setup_logging(env.is_main)
    if task is None:
        from piip6b.tasks import build_task

        task = build_task(cfg)
    run = Run(cfg, task, env.world_size)  # data and resume point first: fail in seconds
    if run.finished is not None:
        if env.is_main:
            log.info("%s. To evaluate it again: piip6b eval CONFIG --weights %s (or slurm/eval_6b.sh); to "
                     "train further, lengthen its schedule", run.finished.describe(run.dir), run.dir)
        watcher.leave()
        watcher.uninstall()
        distributed.teardown()
        return 0
    built = build_engine(cfg, task, env)
    if env.is_main and cfg.logging.print_groups:
        print(optim.format_group_table(built.param_groups, cfg.optim.lr), flush=True)
    state = run.resume(built.engine, cfg)
    if not run.resume_from:
        seed_everything(derive_seed(cfg.seed, "train", env.rank))  # augmentation, drop path differ by rank
    horizon = Horizon(cfg, run, state)
    if state.step < horizon.last_step:  # a full disk fails the run now, not at its first save hours later
        run.ckpt.ensure_space(run.ckpt.expected_size(built.engine))
    writer = metrics.MetricsWriter(run.dir, cfg.logging, env.is_main, horizon.last_step, resume_step=state.step)
    window = metrics.ThroughputWindow(env.world_size, _train_flops_per_image(cfg) if env.is_main else 0.0,
                                      metrics.device_peak_flops(env.device))
    batches = iter(run.loader(cfg, task, env.rank, state.consumed_samples))
    exit_code = 0
    built.engine.train()
    try:
        if watcher.should_stop():
            raise Preempted("signalled while the model was being built", during_evaluation=False)
        if state.evaluation_pending and state.step < horizon.last_step:  # the one a preemption cut short
            evaluate_into(writer, cfg, task, built.engine, state.step, watcher)
        while state.step < horizon.last_step:
            factor = run.lr_schedule.factor(horizon.position())
            schedule.apply_lr(built.optimizer, cfg.optim.lr, factor)
            result = train_step(built.engine, batches, run.batch, env.device, window)
            state.step += 1
            state.consumed_samples += run.batch.global_batch
            check_finite(result, state, cfg, lambda: run.save(built, cfg, state))
            if state.step % cfg.logging.interval == 0 or state.step in (run.first_step, horizon.last_step):
                writer.log(state.step, step_scalars(result, state, cfg, factor, built, run, window))
                window.reset()
            if cfg.evaluation.interval and state.step % cfg.evaluation.interval == 0 and state.step < horizon.last_step:
                evaluate_into(writer, cfg, task, built.engine, state.step, watcher)
            if state.step % cfg.checkpoint.every_steps == 0 and state.step < horizon.last_step:
                run.save(built, cfg, state)
            if watcher.should_stop():
                exit_code = stop_for_requeue(run, built, cfg, state, watcher, f"at step {state.step}")
                break
        else:
            run.save(built, cfg, state)
            results = evaluate_into(writer, cfg, task, built.engine, state.step, watcher) if cfg.evaluation.at_end else {}
            run.mark_finished(cfg, state, results)
            watcher.leave()
    except Preempted as stopped:  # in an evaluation (which the restart runs first), or before training
        exit_code = stop_for_requeue(run, built, cfg, state, watcher, f"at step {state.step} ({stopped})",
                                     evaluation_pending=stopped.during_evaluation or state.evaluation_pending)
    finally:
        watcher.uninstall()
        writer.close()
        distributed.teardown(built.engine)
    return exit_code


def stop_for_requeue(run: Run, built: BuiltEngine, cfg: ExperimentConfig, state: TrainState,
                     watcher: PreemptionWatcher, when: str, evaluation_pending: bool = False) -> int:
    """Checkpoint this step (noting an evaluation the signal cut short: the restart runs it first;
    a step already saved is not written again) and say so; returns EXIT_PREEMPTED. Whether the job
    is requeued is the batch script's decision (not when Slurm is ending it for good: scancel)."""
    watcher.leave()
    if state.step == 0:
        saved = "nothing trained yet, nothing to save"
    else:
        saved = f"checkpoint {run.save(built, cfg, state, evaluation_pending=evaluation_pending)} is complete"
    if dist.is_main():
        print(f"preempted {when} on {watcher.describe()}: {saved}; exiting with {EXIT_PREEMPTED} "
              "(EX_TEMPFAIL: resume me)", flush=True)
    return EXIT_PREEMPTED


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


class Run:
    """The run directory, the training data, the schedule and the resume point, decided before the
    model is built: a wrong data path or `--resume` fails in seconds, not after sharding a 6B model."""

    def __init__(self, cfg: ExperimentConfig, task: Any, world_size: int):
        self.dir = Path(cfg.run_dir)
        if dist.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            except OSError as error:  # e.g. a full disk: the checkpoint space check below says what to do
                log.warning("could not write %s: %s", self.dir / "config.yaml", error)
        self.dataset = task.build_dataset("train")
        self.batch = BatchLayout.from_config(cfg, world_size)
        self.lr_schedule = schedule.LRSchedule(cfg.schedule, max(1, len(self.dataset) // self.batch.global_batch))
        self.ckpt = CheckpointManager(self.dir, keep_last=cfg.checkpoint.keep_last,
                                      universal_workers=cfg.checkpoint.universal_workers)
        self.started = time.perf_counter()
        self.first_step = 1
        self.resume_from: Path | None = None
        # An explicit resume point means "train from there", whatever the run dir says.
        self.finished = None if cfg.checkpoint.resume else self._still_finished(cfg)
        if self.finished is not None:
            return
        wanted = cfg.checkpoint.resume or cfg.checkpoint.auto_resume
        self.resume_from = self.ckpt.find_resume(cfg.checkpoint.resume) if wanted else None
        if self.resume_from is not None:
            self.ckpt.ensure_same_model(self.resume_from, cfg.model.preset, cfg.task)
        elif wanted and dist.is_main():
            log.info("no complete checkpoint in %s: training starts from step 0", self.ckpt.root)
        self.ckpt.set_aside_newer_than(self.ckpt.validate(self.resume_from).step if self.resume_from else 0)

    def _still_finished(self, cfg: ExperimentConfig) -> FinishedRun | None:
        """The run's finished record, unless the config now asks for more: a longer schedule, or a
        final evaluation the finished run did not have (evaluation.at_end=true)."""
        record = self.ckpt.finished()
        if record is None:
            return None
        end = Horizon(cfg, self, TrainState(step=record.step, consumed_samples=record.consumed_samples)).last_step
        if end > record.step or (cfg.evaluation.at_end and not record.evaluated):
            return None
        return record

    def resume(self, engine: Any, cfg: ExperimentConfig) -> TrainState:
        if self.resume_from is None:
            return TrainState()
        client = self.ckpt.load(engine, self.resume_from, expected_config_hash=config_hash(cfg))
        state = TrainState(step=int(client["step"]), consumed_samples=int(client["consumed_samples"]),
                           skipped_steps=int(client.get("skipped_steps", 0)),
                           evaluation_pending=bool(client.get("evaluation_pending", False)))
        self.first_step = state.step + 1
        log.info("resumed at step %d (%d samples consumed)", state.step, state.consumed_samples)
        return state

    def loader(self, cfg: ExperimentConfig, task: Any, rank: int, consumed_samples: int):
        """The endless training loader from the resumed global position (one iterator per run)."""
        from piip6b.tasks.data.loader import build_dataloader

        return build_dataloader(self.dataset, cfg.data, task.collate, train=True, rank=rank,
                                world_size=self.batch.world_size, seed=cfg.seed, consumed_samples=consumed_samples)

    def save(self, built: BuiltEngine, cfg: ExperimentConfig, state: TrainState,
             evaluation_pending: bool = False) -> Path:
        return self.ckpt.save(built.engine, state.step, {
            "consumed_samples": state.consumed_samples,
            "epoch": state.consumed_samples // max(1, len(self.dataset)),
            "skipped_steps": state.skipped_steps,
            "evaluation_pending": evaluation_pending,
            "seed": cfg.seed,
            "config": to_dict(cfg),
            "config_hash": config_hash(cfg),
            "code_version": code_version(),
        })

    def mark_finished(self, cfg: ExperimentConfig, state: TrainState, results: dict[str, float]) -> None:
        """Record that the run is done (after its final checkpoint and evaluation), so that a
        restart (a requeue after a late signal, a resubmission) does nothing."""
        self.ckpt.mark_finished(FinishedRun(
            step=state.step, checkpoint=tag_for_step(state.step), consumed_samples=state.consumed_samples,
            evaluated=cfg.evaluation.at_end, metrics={k: float(v) for k, v in results.items()},
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ))


class Horizon:
    """Where the run ends and where it stands in its lr schedule.

    An epoch-based schedule is a number of samples: after a resume at another world size the global
    batch differs, and the step counter (kept continuous for logs and checkpoints) no longer says
    how far along it is; the consumed-sample count does. An iteration-based one (`max_iters`)
    counts optimizer steps, whatever their size.
    """

    def __init__(self, cfg: ExperimentConfig, run: Run, state: TrainState):
        self.state, self.global_batch = state, run.batch.global_batch
        self.by_samples = bool(cfg.schedule.max_epochs)
        if self.by_samples:
            remaining = run.lr_schedule.total_steps * self.global_batch - state.consumed_samples
            self.last_step = state.step + max(0, -(-remaining // self.global_batch))
        else:
            self.last_step = run.lr_schedule.total_steps

    def position(self) -> int:
        return self.state.consumed_samples // self.global_batch if self.by_samples else self.state.step


def check_finite(result: StepResult, state: TrainState, cfg: ExperimentConfig, save) -> None:
    """Count a step DeepSpeed skipped (engine.nonfinite: skip), or checkpoint and stop."""
    if result.applied:
        return
    state.skipped_steps += 1
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in result.losses.items())
    message = (f"non-finite loss or gradient at step {state.step} (grad norm {result.grad_norm}; "
               f"loss terms on rank {dist.rank()}: {terms})")
    if cfg.engine.nonfinite == "stop":
        save()
        raise NonFiniteError(message + f"; checkpoint saved in {Path(cfg.run_dir) / 'checkpoints'}. Lower "
                             "the lr, check the data, or set engine.nonfinite=skip")
    log.warning("%s: step skipped (%d so far)", message, state.skipped_steps)


def step_scalars(result: StepResult, state: TrainState, cfg: ExperimentConfig, factor: float,
                 built: BuiltEngine, run: Run, window: metrics.ThroughputWindow) -> dict[str, float]:
    """The logged row of a step: losses averaged over ranks (one collective), lr, norms, speed."""
    losses = dist.all_mean(result.losses)
    num_layers = int(getattr(built.backbone, "num_layers", 0))
    top = [g.lr_scale for g in built.param_groups if g.layer_id is not None and g.layer_id <= num_layers]
    scalars = {
        "loss": losses.pop("loss"),
        **{f"loss/{k}": v for k, v in losses.items()},
        "lr": cfg.optim.lr * factor,
        "lr/head": cfg.optim.lr * factor,
        "lr/backbone_top": cfg.optim.lr * factor * max(top, default=1.0),
        "grad_norm": result.grad_norm,
        "skipped_steps": state.skipped_steps,
        "epoch": state.consumed_samples / max(1, len(run.dataset)),
        **window.scalars(),
        "memory/peak_gib": metrics.peak_memory_bytes(built.engine.device) / 2**30,
    }
    if state.step == run.first_step:
        scalars["perf/time_to_first_step_s"] = time.perf_counter() - run.started
    return scalars


def evaluate_into(writer: metrics.MetricsWriter, cfg: ExperimentConfig, task: Any, model: Any, step: int,
                  watcher: PreemptionWatcher) -> dict[str, float]:
    """Evaluate on every rank and log the results (and a few drawn predictions) at `step`; a
    preemption signal stops it at the next batch (`Preempted`, nothing logged)."""
    from piip6b.evaluate import evaluate_model

    results, images = evaluate_model(cfg, task, model, visualize=cfg.evaluation.visualize,
                                     should_stop=watcher.should_stop)
    if results:
        writer.log(step, {f"eval/{k}": v for k, v in results.items()})
        writer.log_images(step, images)
    return results


def _train_flops_per_image(cfg: ExperimentConfig) -> float:
    """Forward + backward FLOPs of the backbone for one square image at the largest input
    (3 x the forward's 2 x MACs, as built; recomputation not counted)."""
    from piip6b.models.counting import count_flops

    return 3 * 2e9 * count_flops(cfg.model.preset, img_sizes=cfg.model.img_sizes).gflops_full


def start(config_path: str, overrides: list[str], nproc: int | None = None) -> int:
    """`piip6b train`: validate the config here, then start `nproc` local ranks or join the job."""
    from piip6b.config import load_config

    load_config(config_path, overrides)  # a ConfigError here, before any rank starts
    if nproc is not None and nproc > 1:
        return distributed.spawn_local(nproc, _train_rank, (config_path, overrides))
    return _train_rank(config_path, overrides)


def _train_rank(config_path: str, overrides: list[str]) -> int:
    from piip6b.config import load_config

    return train(load_config(config_path, overrides))
