"""Semantic segmentation metrics from a confusion matrix summed over all ranks.

Definitions follow mmseg: IoU_c = TP / (TP + FP + FN), Acc_c = TP / (TP + FN); mIoU and mAcc
average over classes that occur (in the labels or, for IoU, in the predictions: NaN classes are
skipped); aAcc = all TP / all labelled pixels. Reported in percent, with each class's IoU and Acc
by name (None where the class never occurs).
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from piip6b import dist
from piip6b.tasks.evaluation.results import EvalResults, applicable


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu",
                 class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        # rows: ground truth, columns: prediction. int64: ADE20K val alone has ~3e8 pixels.
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        # Images scored: a validation split that lost images (data.bad_data=skip) shows it here.
        self.num_images = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Score one image: `prediction` and `target` are integer class maps of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        target, prediction = target[valid].long(), prediction[valid].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"label values {target.min().item()}..{target.max().item()} are outside 0..{self.num_classes - 1} "
                f"(ignore_index {self.ignore_index}); check num_classes and reduce_zero_label"
            )
        index = (target * self.num_classes + prediction).to(self.confusion.device)
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)
        self.num_images += 1

    def all_reduce(self) -> None:
        """Sum the confusion matrices and image counts of all ranks in place (call on every rank, once)."""
        dist.all_sum_(self.confusion)
        dist.all_sum_(self.num_images)

    def compute(self) -> EvalResults:
        results = metrics_from_confusion(self.confusion, self.class_names)
        results.metrics = {"num_images": float(self.num_images), **results.metrics}
        return results


def metrics_from_confusion(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> EvalResults:
    """Summary and per-class metrics; classes are named by `class_names`, else by their index."""
    confusion = confusion.double().cpu()
    true_positive = confusion.diag()
    labelled = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    union = labelled + predicted - true_positive
    iou = true_positive / union  # 0/0 -> NaN: class absent from labels and predictions
    accuracy = true_positive / labelled
    total = labelled.sum()
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(iou))]
    summary = {
        "mIoU": 100.0 * float(torch.nanmean(iou)),
        "mAcc": 100.0 * float(torch.nanmean(accuracy)),
        "aAcc": 100.0 * float(true_positive.sum() / total) if total > 0 else float("nan"),
    }
    per_class = {
        "IoU": {name: applicable(100.0 * v) for name, v in zip(names, iou.tolist())},
        "Acc": {name: applicable(100.0 * v) for name, v in zip(names, accuracy.tolist())},
    }
    return EvalResults(summary, per_class)
