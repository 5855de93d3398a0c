"""The training loop. Reads top to bottom: join, check, prepare, build, resume, loop, save, leave.

Every rank runs the same code; the only rank-0-only work is writing metrics and the manifest.
`start()` is what `piip6b train` calls: it runs the pre-flight in the launching process (before any
rank or DeepSpeed starts) and starts the ranks, or joins the ones torchrun/srun started.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
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
from piip6b.engine.build import BuiltEngine, build_engine
from piip6b.engine.checkpoint import CheckpointManager, FinishedRun, code_version, tag_for_step
from piip6b.engine.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatcher
from piip6b.engine.step import StepResult, train_step
from piip6b.preflight import Preflight, preflight
from piip6b.recipe import Recipe
from piip6b.seeding import derive_seed, seed_everything

log = logging.getLogger("piip6b.train")

# DeepSpeed calls torch's deprecated collective names on every step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)


COMMAND = "piip6b train"  # how failures of its ranks are reported (`distributed.report_failure`)


class NonFiniteError(ValueError):
    """Training stopped on a non-finite loss or gradient (`engine.nonfinite: stop`, or more than
    `engine.max_consecutive_skips` skipped steps in a row under `skip`). A ValueError because,
    like a wrong config value or data file, its message says what to change: one line, exit 2."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples drawn, across all ranks (the sampler position)
    skipped_steps: int = 0
    consecutive_skips: int = 0  # skipped steps since the last applied one
    evaluation_pending: bool = False  # a periodic evaluation at `step` was preempted: run it first


def train(cfg: ExperimentConfig, task: Any | None = None, checked: Preflight | None = None) -> int:
    """Run (or resume) the experiment on this rank; returns the exit code (0, or 75 when preempted).
    `checked`: the pre-flight this process already ran (a single-process `piip6b train`)."""
    # From the first moment: a USR1 while the model is built (minutes at 6B) stops the run before its
    # first step instead of killing the rank.
    watcher = PreemptionWatcher().install()
    env = distributed.init_distributed()
    setup_logging(env.is_main)
    if task is None:
        from piip6b.tasks import build_task

        task = build_task(cfg)
    checked = checked or preflight(cfg, task, env.world_size, nodes=env.world_size // env.local_world_size,
                                   device=env.device)
    run = Run(checked, env)  # the run dir's first writes, once everything was checked
    setup_logging(env.is_main, run.dir)  # and train.log from here on
    cfg, recipe = run.cfg, run.recipe
    if run.finished is not None:
        if env.is_main:
            log.info("%s. To evaluate it again: piip6b eval CONFIG --weights %s (or slurm/eval_6b.sh); to "
                     "train further, lengthen its schedule", run.finished.describe(run.dir), run.dir)
        watcher.leave()
        watcher.uninstall()
        distributed.teardown()
        return 0
    if env.is_main:
        log.info("%s", checked.summary.text())
        if run.resume_from is None and (cfg.checkpoint.resume or cfg.checkpoint.auto_resume):
            log.info("no complete checkpoint in %s: training starts from step 0", run.ckpt.root)
    built = build_engine(cfg, task, env)
    if cfg.logging.print_groups:
        log.info("optimizer parameter groups:\n%s", optim.format_group_table(built.param_groups, recipe.lr))
    state = run.resume(built.engine, cfg)
    if not run.resume_from:
        seed_everything(derive_seed(cfg.seed, "train", env.rank))  # augmentation, drop path differ by rank
    horizon = Horizon(recipe, state)
    if state.step < horizon.last_step:  # a full disk fails the run now, not at its first save hours later
        run.ckpt.ensure_space(run.ckpt.expected_size(built.engine))
    writer = metrics.MetricsWriter(run.dir, cfg.logging, env.is_main, horizon.last_step, resume_step=state.step)
    writer.log_text(state.step, "config", f"```yaml\n{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```")
    window = metrics.ThroughputWindow(env.world_size, _train_flops_per_image(cfg) if env.is_main else 0.0,
                                      metrics.device_peak_flops(env.device), env.device)
    batches = iter(run.loader(cfg, task, env.rank, state.consumed_samples))
    exit_code = 0
    built.engine.train()
    try:
        if watcher.should_stop():
            raise Preempted("signalled while the model was being built", during_evaluation=False)
        if state.evaluation_pending and state.step < horizon.last_step:  # the one a preemption cut short
            evaluate_into(writer, cfg, task, built.engine, state.step, watcher)
        while state.step < horizon.last_step:
            factor = recipe.schedule.factor(horizon.position())
            schedule.apply_lr(built.optimizer, recipe.lr, factor)
            result = train_step(built.engine, batches, recipe.batch, env.device, window)
            state.step += 1
            state.consumed_samples += recipe.global_batch
            check_finite(result, state, cfg, run.ckpt)
            if state.step % cfg.logging.interval == 0 or state.step in (run.first_step, horizon.last_step):
                writer.log(state.step, step_scalars(result, state, recipe, factor, built, run, window))
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
        log.info("preempted %s on %s: %s; exiting with %d (EX_TEMPFAIL: resume me)", when, watcher.describe(),
                 saved, EXIT_PREEMPTED)
    return EXIT_PREEMPTED


TRAIN_LOG = "train.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_run_log: logging.FileHandler | None = None  # this process's train.log handler, replaced on the next setup


def setup_logging(is_main: bool, run_dir: str | Path | None = None) -> None:
    """Rank 0 logs INFO to the console and, given `run_dir`, also to `<run_dir>/train.log`,
    whichever launcher started it (Slurm's own log stays where slurm/common.sh sends it). The file
    is appended to across restarts, each start marked by a line of its own. Other ranks log
    warnings to the console only."""
    global _run_log
    deepspeed_log = logging.getLogger("DeepSpeed")  # DeepSpeed's logger does not propagate to the root
    if _run_log is not None:
        deepspeed_log.removeHandler(_run_log)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    path = Path(run_dir) / TRAIN_LOG if is_main and run_dir is not None else None
    _run_log = None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _run_log = logging.FileHandler(path, mode="a", encoding="utf-8")
        handlers.append(_run_log)
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format=LOG_FORMAT,
                        datefmt="%Y-%m-%d %H:%M:%S", handlers=handlers, force=True)  # closes the old ones
    if _run_log is not None:
        deepspeed_log.addHandler(_run_log)  # its warnings (e.g. allocator cache flushes) belong in train.log
    logging.captureWarnings(True)  # Python warnings reach train.log too
    if path is not None:
        log.info("===== start: %d rank(s), %s, host %s, pid %d =====",
                 dist.world_size(), _launcher(), socket.gethostname(), os.getpid())


def _launcher() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"Slurm job {job} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')})"
    return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "local launch"


class Run:
    """The run directory, the training data, the recipe and the resume point, as the pre-flight
    found them: a wrong data path or `--resume` failed in seconds, before anything was written here."""

    def __init__(self, checked: Preflight, env: distributed.DistEnv):
        self.cfg, self.recipe, self.dataset = checked.cfg, checked.recipe, checked.dataset
        self.dir = Path(self.cfg.run_dir)
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                write_config(self.dir, self.cfg)
            except OSError as error:  # e.g. a full disk: the checkpoint space check says what to do
                log.warning("could not write %s: %s", self.dir / "config.yaml", error)
        self.ckpt = CheckpointManager(self.dir, keep_last=self.cfg.checkpoint.keep_last,
                                      universal_workers=self.cfg.checkpoint.universal_workers)
        self.finished: FinishedRun | None = checked.finished
        self.resume_from = checked.resume_from
        if self.finished is None:
            self.ckpt.set_aside_newer_than(self.ckpt.validate(self.resume_from).step if self.resume_from else 0)
        self.started = time.perf_counter()
        self.first_step = 1

    def resume(self, engine: Any, cfg: ExperimentConfig) -> TrainState:
        if self.resume_from is None:
            return TrainState()
        client = self.ckpt.load(engine, self.resume_from, expected_config_hash=config_hash(cfg))
        state = TrainState(step=int(client["step"]), consumed_samples=int(client["consumed_samples"]),
                           skipped_steps=int(client.get("skipped_steps", 0)),
                           consecutive_skips=int(client.get("consecutive_skips", 0)),
                           evaluation_pending=bool(client.get("evaluation_pending", False)))
        self.first_step = state.step + 1
        log.info("resumed at step %d (%d samples consumed)", state.step, state.consumed_samples)
        return state

    def loader(self, cfg: ExperimentConfig, task: Any, rank: int, consumed_samples: int):
        """The endless training loader from the resumed global position (one iterator per run)."""
        from piip6b.tasks.data.loader import build_dataloader

        data = dataclasses.replace(cfg.data, batch_size=self.recipe.batch.micro_batch)  # the derived micro-batch
        return build_dataloader(self.dataset, data, task.collate, train=True, rank=rank,
                                world_size=self.recipe.world_size, seed=cfg.seed, consumed_samples=consumed_samples)

    def save(self, built: BuiltEngine, cfg: ExperimentConfig, state: TrainState,
             evaluation_pending: bool = False) -> Path:
        return self.ckpt.save(built.engine, state.step, {
            "consumed_samples": state.consumed_samples,
            "epoch": state.consumed_samples // max(1, len(self.dataset)),
            "skipped_steps": state.skipped_steps,
            "consecutive_skips": state.consecutive_skips,
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
            evaluated=cfg.evaluation.at_end, metrics={k: None if v is None else float(v) for k, v in results.items()},
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ))


class Horizon:
    """Where the run ends and where it stands in its lr schedule: both are counted in samples, so a
    resume at another global batch (another world size) continues the same curve to the same end;
    the step counter stays continuous for logs and checkpoints."""

    def __init__(self, recipe: Recipe, state: TrainState):
        self.state = state
        self.last_step = recipe.last_step(state.step, state.consumed_samples)

    def position(self) -> int:
        return self.state.consumed_samples


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    """config.yaml as this run uses it; a different one left by an earlier run is kept beside it
    (config.<time>.yaml), never overwritten."""
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(run_dir / f"config.{stamp}.yaml")
    path.write_text(text)


def check_finite(result: StepResult, state: TrainState, cfg: ExperimentConfig, ckpt: CheckpointManager) -> None:
    """Count a step DeepSpeed skipped (engine.nonfinite: skip, at most engine.max_consecutive_skips
    in a row), or stop the run.

    Stopping saves nothing: the weights in memory gave the non-finite values (or came out of the
    update before them), and saved they would be the checkpoint the next run resumes. The message
    names the newest checkpoint instead, the one a rerun resumes from.
    """
    if result.applied:
        state.consecutive_skips = 0
        return
    state.skipped_steps += 1
    state.consecutive_skips += 1
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in result.losses.items())
    message = (f"non-finite loss or gradient at step {state.step} (grad norm {result.grad_norm}; "
               f"loss terms on rank {dist.rank()}: {terms})")
    limit = cfg.engine.max_consecutive_skips
    if cfg.engine.nonfinite == "skip":
        if state.consecutive_skips <= limit:
            log.warning("%s: step skipped (%d so far, %d in a row)", message, state.skipped_steps, state.consecutive_skips)
            return
        message += (f"; {state.consecutive_skips} steps in a row skipped, more than engine.max_consecutive_skips="
                    f"{limit}: the run is diverging, not meeting the odd bad batch")
        remedy = "lower optim.lr or check the data; raise engine.max_consecutive_skips only if single bad batches come in runs"
    else:
        remedy = "lower optim.lr, check the data, or set engine.nonfinite=skip"
    complete = ckpt.complete_checkpoints()
    if complete:
        resume_point = (f"a rerun resumes from the newest checkpoint, {complete[0]} (step "
                        f"{CheckpointManager.validate(complete[0]).step}), and unchanged repeats the same steps")
    else:
        resume_point = "no checkpoint was saved before it, so a rerun starts from scratch"
    raise NonFiniteError(f"{message}. Nothing was saved at this step; {resume_point}: {remedy}")


def step_scalars(result: StepResult, state: TrainState, recipe: Recipe, factor: float,
                 built: BuiltEngine, run: Run, window: metrics.ThroughputWindow) -> dict[str, float]:
    """The logged row of a step: losses averaged over ranks (one collective), lr, norms, speed."""
    losses = dist.all_mean(result.losses)
    num_layers = int(getattr(built.backbone, "num_layers", 0))
    top = [g.lr_scale for g in built.param_groups if g.layer_id is not None and g.layer_id <= num_layers]
    scalars = {
        "loss": losses.pop("loss"),
        **{f"loss/{k}": v for k, v in losses.items()},
        "lr": recipe.lr * factor,
        "lr/head": recipe.lr * factor,
        "lr/backbone_top": recipe.lr * factor * max(top, default=1.0),
        "samples": state.consumed_samples,
        "grad_norm": result.grad_norm,
        "skipped_steps": state.skipped_steps,
        "epoch": state.consumed_samples / max(1, len(run.dataset)),
        **window.scalars(),
    }
    if state.step == run.first_step:
        scalars["perf/time_to_first_step_s"] = time.perf_counter() - run.started
    return scalars


def evaluate_into(writer: metrics.MetricsWriter, cfg: ExperimentConfig, task: Any, model: Any, step: int,
                  watcher: PreemptionWatcher) -> dict[str, float | None]:
    """Evaluate on every rank and log the results at `step`: the summary metrics as scalars, the
    per-class values as one table (console, train.log, TensorBoard text; `metrics.jsonl` keeps
    them under `eval/per_class`), and a few drawn predictions. A preemption signal stops it at the
    next batch (`Preempted`, nothing logged). Returns the summary metrics."""
    from piip6b.evaluate import evaluate_model

    results, images = evaluate_model(cfg, task, model, visualize=cfg.evaluation.visualize,
                                     should_stop=watcher.should_stop)
    if results.metrics:
        writer.log(step, {f"eval/{k}": v for k, v in results.metrics.items()},
                   details={"eval/per_class": results.per_class} if results.per_class else None)
    if results.per_class:
        writer.log_text(step, "eval/per_class", results.class_table(markdown=True), results.class_table())
    writer.log_images(step, images)
    return results.metrics


def _train_flops_per_image(cfg: ExperimentConfig) -> float:
    """Forward + backward FLOPs of the backbone for one square image at the largest input
    (3 x the forward's 2 x MACs, as built; recomputation not counted)."""
    from piip6b.models.counting import count_flops

    return 3 * 2e9 * count_flops(cfg.model.preset, img_sizes=cfg.model.img_sizes).gflops_full


def start(config_path: str, overrides: list[str], nproc: int | None = None) -> int:
    """`piip6b train`: check the run here, then start `nproc` local ranks, or join the job."""
    from piip6b.config import load_config
    from piip6b.tasks import build_task

    cfg = load_config(config_path, overrides)  # a ConfigError here, before any rank starts
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:  # a rank of a job torchrun/srun started: rank 0 checks once joined
        return distributed.run_entry(COMMAND, train, cfg, run_dir=cfg.run_dir)
    task = build_task(cfg)
    checked = preflight(cfg, task, world_size=nproc or 1)  # the one line, before any rank or DeepSpeed
    if nproc is not None and nproc > 1:
        # The ranks check again once joined (they must agree on one resume point and one plan);
        # this process need not hold its copy of the training set while they train.
        del checked
        return distributed.spawn_local(nproc, _train_rank, (config_path, overrides), command=COMMAND,
                                       run_dir=cfg.run_dir)
    return distributed.run_entry(COMMAND, train, cfg, task, checked, run_dir=cfg.run_dir)


def _train_rank(config_path: str, overrides: list[str]) -> int:
    from piip6b.config import load_config

    return train(load_config(config_path, overrides))
