"""Learning-rate schedules as functions of the samples seen: linear warm-up, then step / poly /
cosine / constant.

A recipe states its schedule at its own global batch: `max_iters`, `warmup_iters` and iteration
milestones are optimizer steps of `data.global_batch` images (ADE20K's 80k iterations at 16 images
are 1.28 M samples), epochs are passes over the training set. Everything is converted to samples
once, so the same recipe gives the same lr after the same number of images whatever the world
size, micro-batch or accumulation, and a run resumed with another global batch continues the same
curve. The schedule is a pure function of the consumed-sample count, so resuming needs no scheduler
state: the loop calls `apply_lr(optimizer, lr, factor)` before every step. Warm-up multiplies the
regular schedule (mmcv's convention, which the reference recipes were tuned with):
`lr = base_lr * policy(s) * (1 - (1 - s / warmup_samples) * (1 - warmup_ratio))` for s samples seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ScheduleConfig:
    policy: Literal["step", "poly", "cosine", "constant"] = "step"
    max_iters: int | None = None  # optimizer steps at the recipe's global batch; or give max_epochs
    max_epochs: int | None = None
    warmup_iters: int = 500  # optimizer steps at the recipe's global batch
    warmup_ratio: float = 1e-3  # lr factor at the first step
    milestones: tuple[float, ...] = ()  # step policy; in epochs if max_epochs is set, else iters
    gamma: float = 0.1  # step policy decay per milestone
    power: float = 1.0  # poly exponent
    min_lr_ratio: float = 0.0  # poly/cosine floor, as a fraction of base lr

    def __post_init__(self) -> None:
        if self.max_iters is not None and self.max_epochs is not None:
            raise ValueError("set only one of schedule.max_iters and schedule.max_epochs")
        for name in ("max_iters", "max_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"schedule.{name} must be >= 1, got {value}")
        if self.warmup_iters < 0:
            raise ValueError(f"schedule.warmup_iters must be >= 0, got {self.warmup_iters}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"schedule.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("gamma", "power"):
            if getattr(self, name) <= 0:
                raise ValueError(f"schedule.{name} must be > 0, got {getattr(self, name)}")
        if any(m <= 0 for m in self.milestones):
            raise ValueError(f"schedule.milestones must be > 0, got {list(self.milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones must be increasing, got {self.milestones}")


class LRSchedule:
    """`factor(samples)`, the base lr's multiplier after `samples` training images (all ranks).

    `samples_per_iter`: the recipe's global batch, what one of its iterations means;
    `samples_per_epoch`: the training set's size.
    """

    def __init__(self, cfg: ScheduleConfig, *, samples_per_iter: int, samples_per_epoch: int):
        if cfg.max_iters is None and cfg.max_epochs is None:
            raise ValueError("the config sets neither schedule.max_iters nor schedule.max_epochs")
        if samples_per_iter < 1 or samples_per_epoch < 1:
            raise ValueError(f"a schedule needs samples per iteration and per epoch >= 1, got "
                             f"{samples_per_iter} and {samples_per_epoch}")
        self.cfg = cfg
        unit = samples_per_iter if cfg.max_iters is not None else samples_per_epoch
        self.total_samples = (cfg.max_iters or cfg.max_epochs) * unit
        self.milestones = [int(round(m * unit)) for m in cfg.milestones]
        self.warmup_samples = cfg.warmup_iters * samples_per_iter
        if self.milestones and self.milestones[-1] > self.total_samples:
            length = f"{cfg.max_iters} iterations" if cfg.max_iters is not None else f"{cfg.max_epochs} epochs"
            raise ValueError(f"schedule.milestones {list(cfg.milestones)} reach past the end of the schedule "
                             f"({length}); they count {'iterations' if cfg.max_iters is not None else 'epochs'}")

    def regular(self, samples: int) -> float:
        cfg = self.cfg
        progress = min(samples / self.total_samples, 1.0)
        if cfg.policy == "constant":
            return 1.0
        if cfg.policy == "step":
            return cfg.gamma ** sum(samples >= m for m in self.milestones)
        if cfg.policy == "poly":
            return (1 - cfg.min_lr_ratio) * (1 - progress) ** cfg.power + cfg.min_lr_ratio
        # cosine
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(self, samples: int) -> float:
        """Multiplier of the base lr for the optimizer step that starts after `samples` images."""
        value = self.regular(samples)
        if samples < self.warmup_samples:
            value *= 1 - (1 - samples / self.warmup_samples) * (1 - self.cfg.warmup_ratio)
        return value


def apply_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every group's lr to base_lr * factor * its layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
