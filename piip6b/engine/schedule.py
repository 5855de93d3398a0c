"""Per-iteration learning-rate schedules: linear warm-up, then step / poly / cosine / constant.

The schedule is a pure function of the optimizer step, so resuming needs no scheduler state: the
loop calls `apply_lr(optimizer, factor)` before every step. Warm-up multiplies the regular
schedule (mmcv's convention, which the reference recipes were tuned with):
`lr = base_lr * policy(step) * (1 - (1 - step / warmup_iters) * (1 - warmup_ratio))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ScheduleConfig:
    policy: Literal["step", "poly", "cosine", "constant"] = "step"
    max_iters: int | None = None  # total optimizer steps; or give max_epochs
    max_epochs: int | None = None
    warmup_iters: int = 500
    warmup_ratio: float = 1e-3  # lr factor at step 0
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
        if any(m < 0 for m in self.milestones):
            raise ValueError(f"schedule.milestones must be >= 0, got {list(self.milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones must be increasing, got {self.milestones}")


class LRSchedule:
    """`factor(step)` for a config resolved against the number of optimizer steps per epoch."""

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        if cfg.max_iters is None and cfg.max_epochs is None:
            raise ValueError("the config sets neither schedule.max_iters nor schedule.max_epochs")
        if cfg.max_iters is not None:
            self.total_steps = cfg.max_iters
            self.milestones = [int(round(m)) for m in cfg.milestones]
        else:
            self.total_steps = cfg.max_epochs * self.steps_per_epoch
            self.milestones = [int(round(m * self.steps_per_epoch)) for m in cfg.milestones]

    def regular(self, step: int) -> float:
        cfg = self.cfg
        progress = min(step / max(1, self.total_steps), 1.0)
        if cfg.policy == "constant":
            return 1.0
        if cfg.policy == "step":
            return cfg.gamma ** sum(step >= m for m in self.milestones)
        if cfg.policy == "poly":
            return (1 - cfg.min_lr_ratio) * (1 - progress) ** cfg.power + cfg.min_lr_ratio
        # cosine
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(self, step: int) -> float:
        """Multiplier of the base lr for optimizer step `step` (0-based)."""
        value = self.regular(step)
        if step < self.cfg.warmup_iters:
            value *= 1 - (1 - step / self.cfg.warmup_iters) * (1 - self.cfg.warmup_ratio)
        return value


def apply_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every group's lr to base_lr * factor * its layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
