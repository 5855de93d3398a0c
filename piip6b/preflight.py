"""Pre-flight: everything a run can be refused for, found in seconds, before any rank or GPU starts
and before anything in the run directory is written.

Who runs it:
- `piip6b train` in the launching process (before `--nproc` starts ranks, before DeepSpeed);
- `piip6b check CONFIG --world-size N` on a login node, and `slurm/train_6b.sh` (through
  `piip6b check`) before `srun`, so a bad job fails with one line in its log and no rank starts;
- every job's ranks again, inside `train` once they have joined: rank 0 looks and every rank gets
  its answers (`dist.on_main`). Under torchrun nobody checked before; under srun and `--nproc` the
  ranks must still agree on one resume point and one plan (engine.plan=auto), and the repeat costs
  seconds next to building a 6B model. Nothing is written until it has passed.

What it checks, cheapest first; each failure is one `PreflightError` (or the data, weights,
checkpoint or config error of the module that knows) naming the setting and the fix:
1. the config: validated when loaded (every key, type and name, `model.attn_backend` included);
   the attention backend asked for must run on this device; the batch splits over this world size;
2. the run directory: a directory, or creatable under a writable one;
3. the resume point: `checkpoint.resume` must load, auto-resume finds the newest complete one;
4. pretrained weights: a full-size preset (`piip6b.models.is_full_size`) needs `model.pretrained`
   for every branch, or `model.from_scratch: true`; the files must fit the preset
   (`plan_sources`, headers only);
5. disk: the run dir's file system holds at least one checkpoint (parameters x 14 bytes: bf16
   weights, fp32 master weights and two Adam moments; a warning below what retention keeps);
6. the data: the training set (and the evaluation split) build and parse; counts are reported;
7. memory: with the GPU memory known (engine.gpu_mem_gib, `--gpu-mem`, or this machine's GPU),
   `piip6b plan`'s estimate of the configured layout (a warning with its numbers when it does not
   fit), or its recommendation applied (engine.plan=auto); skipped with a note otherwise;
8. the recipe for this world size (`piip6b.recipe.resolve`); then the weight files' hashes (a full
   read of a file whose writer recorded none) and the start-up summary.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from piip6b import dist
from piip6b.engine.build import BatchLayout
from piip6b.engine.checkpoint import existing_ancestor, format_size
from piip6b.recipe import Recipe, apply_plan, gpu_memory_gib, plan_run, resolve
from piip6b.summary import StartupSummary, startup_summary

if TYPE_CHECKING:
    from piip6b.config import ExperimentConfig
    from piip6b.engine.checkpoint import FinishedRun

# bf16 weights (2) + fp32 master weights (4) + Adam's two fp32 moments (8), per parameter.
CHECKPOINT_BYTES_PER_PARAM = 14


class PreflightError(ValueError):
    """A run that would fail or waste its allocation; the message names the setting and the fix."""


@dataclass(frozen=True)
class WeightsFile:
    target: str  # model.pretrained key: "branch1", ... or "backbone"
    path: str  # as configured
    format: str  # the layout the loader read it as
    file: str  # the file the loader opened (a Hugging Face folder's index or model file)
    sha256: str
    hash_of: str  # what the hash covers

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Findings:
    """What the pre-flight found, besides the recipe (plain data: rank 0 sends it to the other ranks)."""

    device: str
    nodes: int
    attention: str
    deform_kernel: str
    weights: list[WeightsFile]
    data: dict[str, Any]  # {"root": ..., "splits": {split: {"images": n, "annotations": m or None}}}
    resume_from: str | None
    checkpoint_bytes: int
    free_disk_bytes: int
    memory: dict[str, Any]  # at least {"note": one line}
    planned: tuple[str, ...] = ()  # config keys engine.plan=auto set
    warnings: list[str] = field(default_factory=list)


@dataclass
class Preflight:
    cfg: ExperimentConfig  # as the run will use it: with the plan's settings under engine.plan=auto
    recipe: Recipe
    dataset: Any  # this rank's training set
    resume_from: Path | None
    findings: Findings
    summary: StartupSummary
    finished: FinishedRun | None = None  # the run dir's record when the run is done: nothing to train


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def preflight(cfg: ExperimentConfig, task: Any, world_size: int, *, nodes: int = 1,
              device: torch.device | None = None) -> Preflight:
    """Check `cfg` for a job of `world_size` ranks on `nodes` nodes; raise on the first problem.

    Collective when called by every rank of a joined job (rank 0 looks, every rank gets the same
    answers or the same error); a plain function in a single process. Writes nothing.
    """
    if world_size < 1 or nodes < 1:
        raise PreflightError(f"a job needs at least one rank and one node, got {world_size} ranks on {nodes} nodes")
    device = device or default_device()
    run_dir = Path(cfg.run_dir)
    warnings: list[str] = []
    attention, deform_kernel, note = dist.on_main(lambda: check_kernels(cfg, device))
    warnings += [note] if note else []
    BatchLayout.from_config(cfg, world_size)  # a pinned accumulation that cannot split the batch
    dist.on_main(lambda: check_run_dir(run_dir))
    resume_from = find_resume_point(cfg)
    weights = dist.on_main(lambda: check_pretrained(cfg))
    checkpoint_bytes, free_bytes = dist.on_main(lambda: check_disk(cfg, task, run_dir))
    dataset, data = load_training_data(cfg, task)
    memory, overrides, memory_warnings = dist.on_main(lambda: check_memory(cfg, world_size, nodes))
    warnings += memory_warnings
    cfg, planned = apply_plan(cfg, overrides) if overrides else (cfg, ())
    recipe = resolve(cfg, world_size, len(dataset), planned=planned)
    finished = finished_record(cfg, recipe)
    warnings += retention_warnings(cfg, recipe, checkpoint_bytes, free_bytes)
    weights = dist.on_main(lambda: [with_hash(w) for w in weights])
    findings = Findings(str(device), nodes, attention, deform_kernel, weights, data,
                        str(resume_from) if resume_from else None, checkpoint_bytes, free_bytes, memory, planned,
                        warnings)
    return Preflight(cfg, recipe, dataset, resume_from, findings, startup_summary(cfg, recipe, findings), finished)


# ----------------------------------------------------------------------------------- the checks
def check_kernels(cfg: ExperimentConfig, device: torch.device) -> tuple[str, str, str | None]:
    """(attention backend, deformable kernel, a note or None) on `device`. A backend that cannot run
    on a GPU here is an error; on a CPU-only machine (a login node checking a GPU job) a note."""
    try:
        from piip6b.environment import kernels

        found = kernels(device, cfg.model.attn_backend, torch.bfloat16 if cfg.engine.bf16 else torch.float32)
        return found["attention"], found["deformable_attention"], None
    except RuntimeError as error:
        if device.type == "cuda":
            raise PreflightError(f"model.attn_backend={cfg.model.attn_backend}: {error}") from error
        return (f"{cfg.model.attn_backend} (not available on {device.type})", "auto",
                f"model.attn_backend={cfg.model.attn_backend} cannot run on this machine's {device.type}; "
                "the ranks' GPUs must have it")


def check_run_dir(run_dir: Path) -> None:
    """The run dir is a directory this user can write, or can be created (nothing is created here)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PreflightError(f"run_dir {run_dir} exists and is not a directory: set run_dir= to a folder")
    ancestor = existing_ancestor(run_dir)
    if not ancestor.is_dir():
        raise PreflightError(f"run_dir {run_dir} cannot be created: {ancestor} is a file, not a directory")
    writable = [ancestor] + [p for p in (run_dir / name for name in ("checkpoints", "tb", "logs")) if p.is_dir()]
    for folder in writable:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PreflightError(f"run_dir {run_dir}: this user cannot write to {folder}; choose another run_dir= "
                                 "or fix its permissions")


def find_resume_point(cfg: ExperimentConfig) -> Path | None:
    """The checkpoint the run will resume from (collective: rank 0 decides). An explicit
    `checkpoint.resume` that cannot be loaded is an error (CheckpointError)."""
    from piip6b.engine.checkpoint import CheckpointManager

    if not (cfg.checkpoint.resume or cfg.checkpoint.auto_resume):
        return None
    manager = CheckpointManager(cfg.run_dir)
    found = manager.find_resume(cfg.checkpoint.resume)
    if found is not None:  # another preset's checkpoint: refused before anything is converted or built
        manager.ensure_same_model(found, cfg.model.preset, cfg.task)
    return found


def finished_record(cfg: ExperimentConfig, recipe: Recipe) -> FinishedRun | None:
    """The run dir's record of a finished run (`FinishedRun`, collective), unless this config asks
    for more: an explicit resume point, a longer schedule, or a final evaluation the finished run
    did not have (evaluation.at_end=true). None: there is training (or evaluating) to do."""
    from piip6b.engine.checkpoint import CheckpointManager

    if cfg.checkpoint.resume:
        return None
    record = CheckpointManager(cfg.run_dir).finished()
    if record is None:
        return None
    if recipe.last_step(record.step, record.consumed_samples) > record.step:
        return None
    if cfg.evaluation.at_end and not record.evaluated:
        return None
    return record


def pretrained_targets(preset: str) -> list[str]:
    """The `model.pretrained` keys that together cover a preset: its branches (or the backbone)."""
    from piip6b.models import get_spec

    branches = len(get_spec(preset).branches)
    return ["backbone"] if branches == 1 else [f"branch{i + 1}" for i in range(branches)]


def check_pretrained(cfg: ExperimentConfig) -> list[WeightsFile]:
    """Weight files that fit the preset exactly (file headers only), or none on purpose."""
    from piip6b.engine.build import plan_pretrained
    from piip6b.models import is_full_size
    from piip6b.weights.export import TENSORS_SHA256_KEY

    model = cfg.model
    if not model.pretrained:
        if is_full_size(model.preset) and not model.from_scratch:
            keys = " ".join(f"model.pretrained.{t}=FILE" for t in pretrained_targets(model.preset))
            raise PreflightError(
                f"model.pretrained is not set and {model.preset} is a full-size preset: it would train from random "
                f"initialisation. Set {keys} (converted with `piip6b convert`), or model.from_scratch=true to "
                "train from scratch on purpose")
        return []
    for target, path in model.pretrained.items():
        if not Path(path).exists():
            raise PreflightError(f"model.pretrained.{target}: {path} does not exist (convert the released weights "
                                 f"with `piip6b convert SOURCE --preset {model.preset} --target {target} --out {path}`)")
    with torch.device("meta"):
        backbone = model.build()
    try:
        plans = plan_pretrained(backbone, model.pretrained)
    except ValueError as error:  # WeightsLoadError / WeightsFormatError: keys, shapes, formats
        raise PreflightError(f"model.pretrained: {error}") from error
    files = []
    for (target, path), plan in zip(model.pretrained.items(), plans):
        recorded = plan.source.metadata.get(TENSORS_SHA256_KEY, "")
        files.append(WeightsFile(target, str(path), plan.report.format, str(plan.source.path), recorded,
                                 "tensor data, recorded by piip6b convert" if recorded else "the file"))
        plan.close()
    return files


def with_hash(weights: WeightsFile) -> WeightsFile:
    """The file's sha256 unless its writer recorded one (a full read of the file: done last)."""
    from piip6b.weights import file_sha256

    if weights.sha256:
        return weights
    return dataclasses.replace(weights, sha256=file_sha256(weights.file))


def _counts(dataset: Any) -> dict[str, int | None]:
    return {"images": len(dataset), "annotations": getattr(dataset, "num_annotations", None)}


def load_training_data(cfg: ExperimentConfig, task: Any) -> tuple[Any, dict[str, Any]]:
    """(this rank's training set, the counts rank 0 found). Rank 0 builds (and parses) the
    training set and the evaluation split first; the other ranks build theirs once it succeeded,
    so a wrong data.root is one error from rank 0, not one per rank."""
    built: dict[str, Any] = {}

    def inspect() -> dict[str, Any]:
        built["train"] = task.build_dataset("train")
        if len(built["train"]) == 0:
            raise PreflightError(f"the training set under data.root={cfg.data.root} has no images")
        splits = {"train": _counts(built["train"])}
        if cfg.evaluation.at_end or cfg.evaluation.interval:
            evaluation = task.build_dataset(cfg.evaluation.split)
            if evaluation is not None:
                splits[cfg.evaluation.split] = _counts(evaluation)
        return {"root": cfg.data.root, "splits": splits}

    facts = dist.on_main(inspect)
    dataset = built["train"] if "train" in built else task.build_dataset("train")
    return dataset, facts


def check_memory(cfg: ExperimentConfig, world_size: int, nodes: int
                 ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(memory facts, the plan's overrides under engine.plan=auto else {}, warnings)."""
    from piip6b.plan import GIB, HEADROOM, Layout, format_overrides

    gpu_mem = gpu_memory_gib(cfg)
    if gpu_mem is None:
        if cfg.engine.plan == "auto":
            raise PreflightError("engine.plan=auto needs the GPU memory and there is no GPU here: set "
                                 "engine.gpu_mem_gib (e.g. 80), or pass --gpu-mem to piip6b check")
        return {"gpu_mem_gib": None, "note": "not checked: no GPU here and no engine.gpu_mem_gib "
                                             "(piip6b check --gpu-mem GiB)"}, {}, []
    plan = plan_run(cfg, world_size, gpu_mem, nodes)
    recommended = plan.recommended
    if cfg.engine.plan == "auto":
        if recommended is None:
            raise PreflightError(
                f"engine.plan=auto: no layout of {cfg.model.preset} fits in {HEADROOM:.0%} of {gpu_mem:g} GiB per GPU "
                f"on {world_size} GPUs, even at one image per forward: use more GPUs or engine.offload_optimizer=cpu")
        chosen, overrides = recommended, plan.overrides()
    else:
        micro, accum = plan.batch_per_gpu, plan.grad_accum
        layout = Layout(cfg.engine.zero_stage, cfg.engine.hpz_partition_size > 1, cfg.model.grad_checkpointing > 0)
        chosen, overrides = plan.estimate_layout(layout, micro, accum), {}
    facts = {
        "gpu_mem_gib": gpu_mem,
        "layout": chosen.layout.name,
        "micro_batch": chosen.micro_batch,
        "estimate_gib": chosen.total_bytes / GIB,
        "by_part_gib": {k: v / GIB for k, v in chosen.memory.items()},
        "fits": chosen.fits,
        "step_s": chosen.step_s,
        "recommended": plan.overrides(),
    }
    where = f"{chosen.layout.name} at {chosen.micro_batch} image(s) per forward"
    facts["note"] = (f"{where}: ~{facts['estimate_gib']:.1f} of {gpu_mem:g} GiB per GPU "
                     f"({'plan' if overrides else 'plan estimate'}; ~{chosen.step_s:.2f} s per step estimated)")
    warnings = []
    if not overrides and not chosen.fits:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in facts["by_part_gib"].items())
        advice = (f"set engine.plan=auto, or {format_overrides(plan.overrides())}" if recommended is not None
                  else "no layout fits: use more GPUs or engine.offload_optimizer=cpu")
        warnings.append(f"{where} needs ~{facts['estimate_gib']:.1f} GiB per GPU by `piip6b plan`'s estimate, more than "
                        f"{HEADROOM:.0%} of {gpu_mem:g} GiB ({parts} GiB): {advice}")
    elif not overrides and recommended is not None and recommended.step_s < chosen.step_s * 0.95:
        facts["note"] += (f"; the plan would choose {recommended.layout.name} at {recommended.micro_batch} per forward "
                          f"(~{recommended.step_s:.2f} s): engine.plan=auto")
    return facts, overrides, warnings


def check_disk(cfg: ExperimentConfig, task: Any, run_dir: Path) -> tuple[int, int]:
    """(bytes of one checkpoint, free bytes where the run dir is); an error when not even one fits."""
    with torch.device("meta"):
        model = task.build_model(cfg.model.build())
    parameters = sum(p.numel() for p in model.parameters())
    checkpoint = parameters * CHECKPOINT_BYTES_PER_PARAM
    free = shutil.disk_usage(existing_ancestor(run_dir)).free
    if free < checkpoint:
        raise PreflightError(
            f"run_dir {run_dir}: {format_size(free)} free on its file system, but a checkpoint of "
            f"{cfg.model.preset} with its heads is ~{format_size(checkpoint)} ({parameters:,} parameters x "
            f"{CHECKPOINT_BYTES_PER_PARAM} bytes): free space there or choose another run_dir=")
    return checkpoint, free


def retention_warnings(cfg: ExperimentConfig, recipe: Recipe, checkpoint: int, free: int) -> list[str]:
    """A warning when the checkpoints kept at once (checkpoint.keep_last plus the one being written,
    or every save with keep_last=0) do not fit in the free space."""
    saves = -(-recipe.total_steps // cfg.checkpoint.every_steps) + 1
    kept = min(saves, cfg.checkpoint.keep_last + 1) if cfg.checkpoint.keep_last else saves
    if free >= kept * checkpoint:
        return []
    return [f"run_dir {cfg.run_dir}: {format_size(free)} free, but up to {kept} checkpoints of ~{format_size(checkpoint)} "
            f"exist at once (checkpoint.keep_last={cfg.checkpoint.keep_last} plus the one being written): the "
            "run may stop when the disk fills"]

def check(config_path: str, overrides: list[str], world_size: int = 1, *, nodes: int | None = None,
          gpu_mem_gib: float | None = None) -> StartupSummary:
    """`piip6b check`: load the config and run the pre-flight for `world_size` ranks in this process
    (no rank, no DeepSpeed, nothing written); the start-up summary, or the error."""
    from piip6b.config import load_config
    from piip6b.tasks import build_task

    if gpu_mem_gib is not None:
        overrides = [*overrides, f"engine.gpu_mem_gib={gpu_mem_gib}"]
    cfg = load_config(config_path, overrides)
    if nodes is None:  # 8 GPUs per node, the usual cluster node; --nodes says otherwise
        nodes = world_size // 8 if world_size > 8 and world_size % 8 == 0 else 1
    return preflight(cfg, build_task(cfg), world_size, nodes=nodes).summary
