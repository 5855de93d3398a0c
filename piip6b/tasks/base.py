"""What the engine needs from a task, and how a config picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from pathlib import Path

    from torch.utils.data import DataLoader, Dataset

    from piip6b.tasks.evaluation import EvalResults


class Task(Protocol):
    """What the engine needs from a task (detection or segmentation)."""

    name: str

    def build_model(self, backbone: nn.Module) -> nn.Module:
        """forward(batch) -> dict of loss terms in train mode, predictions in eval mode."""

    def build_dataset(self, split: str) -> Dataset: ...

    def collate(self, samples: list) -> dict[str, Any]:
        """Training batches."""

    def eval_collate(self, samples: list) -> dict[str, Any]:
        """Evaluation batches (no training-only padding: see `piip6b.tasks.evaluation`)."""

    def evaluate(self, model: nn.Module, loader: DataLoader, predictions_file: str | Path | None = None
                 ) -> EvalResults:
        """All ranks call it; the metrics are computed over every rank's samples. With
        `predictions_file`, rank 0 also writes the gathered predictions there (detection: COCO
        results JSON; a task without such a format raises ValueError)."""

    def visualize(self, model: nn.Module, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """(tag, uint8 CHW image) pairs for TensorBoard's image tab."""


def build_task(cfg) -> Task:
    """The task named by `cfg.task` ("detection" | "segmentation"), configured by its section."""
    if cfg.task == "detection":
        from piip6b.tasks.detection import DetectionTask

        if cfg.detection is None:
            raise ValueError("config: task is 'detection' but the 'detection:' section is missing")
        return DetectionTask(cfg.detection, cfg.data)
    if cfg.task == "segmentation":
        from piip6b.tasks.segmentation import SegmentationTask

        if cfg.segmentation is None:
            raise ValueError("config: task is 'segmentation' but the 'segmentation:' section is missing")
        return SegmentationTask(cfg.segmentation, cfg.data)
    raise ValueError(f"config: unknown task {cfg.task!r}; choose 'detection' or 'segmentation'")
