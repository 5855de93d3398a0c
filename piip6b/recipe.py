"""What a config means at a world size: the batch layout, the lr after its scaling rule, the schedule
in samples, and where each of those settings came from.

A recipe states what the paper states (docs/SPEC.md §6): a global batch (`data.global_batch`, 16
for COCO 1x and ADE20K 80k), a schedule in epochs or in iterations of that batch, a warm-up and an
lr (`optim.lr`, stated at `optim.lr_base_batch` images, by default the recipe's global batch).
`resolve` turns that into what one world size runs:

- the batch layout (`BatchLayout.derive`, the one rule): the global batch is kept wherever the
  world size divides it; 64 ranks cannot share 16 images, so there the global batch becomes 64;
- the lr: `optim.lr` scaled from `optim.lr_base_batch` to the global batch actually used by
  `optim.lr_scaling` (linear, as mmdet's auto_scale_lr, or sqrt, or none);
- the schedule in samples (`LRSchedule`): the same lr after the same number of images whatever the
  world size, micro-batch and accumulation, and the same number of images in all.

`engine.plan=auto` first replaces the layout settings by `piip6b plan`'s recommendation for the
world size and GPU memory (`plan_run`, `apply_plan`). Pinning everything by hand is
`data.global_batch: null` (then data.batch_size x engine.grad_accum_steps x world size, and a schedule
in iterations of that batch) with `optim.lr_scaling: none`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from piip6b.config import with_values
from piip6b.engine.build import BatchLayout
from piip6b.engine.optim import scale_lr
from piip6b.engine.schedule import LRSchedule

if TYPE_CHECKING:
    from piip6b.config import ExperimentConfig
    from piip6b.plan import Plan

# Where a resolved setting came from (shown in the start-up summary).
RECIPE = "recipe"  # stated by the config's recipe (data.global_batch, optim.lr, ...)
DERIVED = "derived"  # computed from the recipe for this world size
RAISED = "raised"  # the recipe's value cannot be kept at this world size
PINNED = "pinned"  # set by hand in the config
PLAN = "plan"  # chosen by the planner (engine.plan=auto)

# The settings `engine.plan=auto` may choose (`Plan.overrides()`).
PLANNED_KEYS = ("engine.zero_stage", "engine.hpz_partition_size", "model.grad_checkpointing",
                "model.checkpoint_interactions", "data.batch_size", "engine.grad_accum_steps")


@dataclass(frozen=True)
class Recipe:
    """A config resolved for one world size (see the module docstring)."""

    world_size: int
    batch: BatchLayout
    recipe_batch: int | None  # data.global_batch (None: pinned by hand)
    base_lr: float  # optim.lr
    lr: float  # after the scaling rule
    lr_scaling: str  # the rule as configured: linear | sqrt | none
    lr_base_batch: int | None  # the global batch base_lr is stated at; None: nothing to scale from
    schedule: LRSchedule
    dataset_size: int
    origins: Mapping[str, str] = field(default_factory=dict)  # setting -> RECIPE, DERIVED, PINNED, ...
    warnings: tuple[str, ...] = ()

    @property
    def global_batch(self) -> int:
        return self.batch.global_batch

    @property
    def total_samples(self) -> int:
        return self.schedule.total_samples

    @property
    def warmup_samples(self) -> int:
        return self.schedule.warmup_samples

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a run from the start at this global batch (the last one may overshoot
        the schedule's samples by less than one batch)."""
        return -(-self.total_samples // self.global_batch)

    @property
    def lr_rule(self) -> str:
        """The rule that was applied: the configured one, or "none" when there was nothing to scale."""
        return self.lr_scaling if self.lr_base_batch is not None else "none"

    def last_step(self, step: int, consumed_samples: int) -> int:
        """The step at which a run now at `step`, having consumed `consumed_samples` (possibly at
        another global batch before a resume), has seen the schedule's samples."""
        left = max(0, self.total_samples - consumed_samples)
        return step + -(-left // self.global_batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "recipe_global_batch": self.recipe_batch,
            "per_device_batch": self.batch.micro_batch,
            "grad_accum_steps": self.batch.grad_accum,
            "lr": self.lr,
            "base_lr": self.base_lr,
            "lr_scaling": self.lr_rule,
            "lr_base_batch": self.lr_base_batch,
            "total_samples": self.total_samples,
            "total_steps": self.total_steps,
            "warmup_samples": self.warmup_samples,
            "dataset_size": self.dataset_size,
            "origins": dict(self.origins),
            "warnings": list(self.warnings),
        }


def resolve(cfg: ExperimentConfig, world_size: int, dataset_size: int, *, planned: Iterable[str] = ()) -> Recipe:
    """The recipe of `cfg` on `world_size` ranks over a training set of `dataset_size` images.
    `planned`: the config keys `apply_plan` set (reported as chosen by the plan)."""
    planned = set(planned)
    batch = BatchLayout.from_config(cfg, world_size)
    recipe_batch = cfg.data.global_batch
    base_batch = cfg.optim.lr_base_batch if cfg.optim.lr_base_batch is not None else recipe_batch
    lr = scale_lr(cfg.optim.lr, cfg.optim.lr_scaling, batch.global_batch, base_batch)
    schedule = LRSchedule(cfg.schedule, samples_per_iter=recipe_batch or batch.global_batch,
                          samples_per_epoch=dataset_size)

    def origin(key: str, otherwise: str) -> str:
        return PLAN if key in planned else otherwise

    raised = recipe_batch is not None and batch.global_batch != recipe_batch
    by_hand = PINNED if recipe_batch is None else DERIVED
    origins = {
        "global_batch": PINNED if recipe_batch is None else RAISED if raised else RECIPE,
        "micro_batch": origin("data.batch_size", by_hand),
        "grad_accum": origin("engine.grad_accum_steps",
                             PINNED if cfg.engine.grad_accum_steps is not None else by_hand),
        "lr": RECIPE if lr == cfg.optim.lr else DERIVED,
        "zero_stage": origin("engine.zero_stage", PINNED),
        "hpz_partition_size": origin("engine.hpz_partition_size", PINNED),
        "grad_checkpointing": origin("model.grad_checkpointing", PINNED),
    }
    recipe = Recipe(world_size, batch, recipe_batch, cfg.optim.lr, lr, cfg.optim.lr_scaling, base_batch, schedule,
                    dataset_size, origins)
    warnings = []
    if raised:
        warnings.append(
            f"data.global_batch={recipe_batch} cannot be kept on {world_size} ranks: each takes "
            f"{batch.global_batch // world_size} image(s) per step, so the global batch is {batch.global_batch}; "
            f"lr {describe_lr(recipe)}; warm-up and decay follow samples. The recipe as written needs a world "
            f"size that divides {recipe_batch}; to pin everything by hand set data.global_batch=null and "
            "optim.lr_scaling=none")
    if schedule.warmup_samples > schedule.total_samples:
        warnings.append(f"the warm-up ({schedule.warmup_samples:,} samples) is longer than the whole schedule "
                        f"({schedule.total_samples:,} samples): the lr never reaches its base value")
    return dataclasses.replace(recipe, warnings=tuple(warnings))


# ------------------------------------------------------------------------------------ the planner
def plan_run(cfg: ExperimentConfig, world_size: int, gpu_mem_gib: float, nodes: int = 1) -> Plan:
    """`piip6b plan` for this config's run: its preset and input sizes, its engine settings, the
    images one rank takes per step at this world size, split into the largest micro-batch that fits."""
    from piip6b.models import get_spec
    from piip6b.plan import Cluster, make_plan

    batch = BatchLayout.from_config(cfg, world_size)
    cluster = Cluster(world_size, gpu_mem_gib, nodes)
    spec = get_spec(cfg.model.preset, cfg.model.img_sizes)
    return make_plan(spec, cluster, batch.micro_batch, None, batch.grad_accum, cfg.engine, split=True)


def apply_plan(cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> tuple[ExperimentConfig, tuple[str, ...]]:
    """`cfg` with the plan's recommended settings (`Plan.overrides()`, engine.plan=auto), and the keys set."""
    unknown = set(overrides) - set(PLANNED_KEYS)
    if unknown:
        raise ValueError(f"the plan may only choose {PLANNED_KEYS}, not {sorted(unknown)}")
    return with_values(cfg, overrides), tuple(overrides)


def gpu_memory_gib(cfg: ExperimentConfig) -> float | None:
    """Memory per GPU for the planner: engine.gpu_mem_gib, else this machine's first CUDA device."""
    if cfg.engine.gpu_mem_gib is not None:
        return cfg.engine.gpu_mem_gib
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return None


def describe_lr(recipe: Recipe) -> str:
    """`4e-04 = 1e-04 x 64/16 (linear rule, optim.lr_base_batch=16)`, or why the lr is as written."""
    if recipe.lr_base_batch is None:
        return f"{recipe.lr:.4g} as written (no optim.lr_base_batch or data.global_batch to scale from)"
    if recipe.lr_scaling == "none":
        return f"{recipe.lr:.4g} as written (optim.lr_scaling=none)"
    ratio = f"{recipe.global_batch}/{recipe.lr_base_batch}"
    factor = ratio if recipe.lr_scaling == "linear" else f"sqrt({ratio})"
    if recipe.global_batch == recipe.lr_base_batch:
        return f"{recipe.lr:.4g} as written, stated at this global batch (optim.lr_base_batch={recipe.lr_base_batch})"
    return (f"{recipe.lr:.4g} = {recipe.base_lr:.4g} x {factor} ({recipe.lr_scaling} rule, "
            f"optim.lr_base_batch={recipe.lr_base_batch})")

