"""Evaluation passes over an InferenceSampler loader; every rank runs them and gets the same dict."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Callable

import torch

from piip6b.progress import with_progress
from piip6b.tasks.evaluation.coco_eval import CocoEvaluator
from piip6b.tasks.evaluation.results import EvalResults
from piip6b.tasks.evaluation.seg_metrics import SegmentationMetric
from piip6b.tasks.evaluation.sliding_window import Segmentor, logits_to_original, slide_inference, whole_inference

# predict(batch) -> one dict per image: boxes xyxy, scores, labels (1..K), masks [N,(1,)H,W],
# all in the ORIGINAL image frame (batch["orig_sizes"]).
DetectionPredictor = Callable[[dict[str, Any]], list[dict[str, torch.Tensor]]]

log = logging.getLogger("piip6b.evaluate")


@torch.no_grad()
def evaluate_detection(predict: DetectionPredictor, loader, evaluator: CocoEvaluator) -> EvalResults:
    for batch in with_progress(loader, "COCO evaluation", log):
        predictions = predict(batch)  # padded samples run too: the forward count must match across ranks
        for image_id, is_padding, pred in zip(batch["image_ids"], batch["is_padding"].tolist(), predictions):
            if not is_padding:
                evaluator.add(image_id, pred["boxes"], pred["scores"], pred["labels"], pred.get("masks"))
    return evaluator.evaluate()


@torch.no_grad()
def evaluate_segmentation(
    segmentor: Segmentor,
    loader,
    num_classes: int,
    *,
    ignore_index: int = 255,
    mode: str = "slide",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    size_divisor: int = 1,
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
) -> EvalResults:
    """mIoU/mAcc/aAcc (and each class's IoU/Acc) at the label files' resolution, and the number of
    images scored; `mode` is `whole` or `slide`, each image (or window) run alone padded to
    `size_divisor` (see `sliding_window`)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"segmentation test mode must be 'whole' or 'slide', got {mode!r}")
    metric = SegmentationMetric(num_classes, ignore_index, device=device, class_names=class_names)
    for batch in with_progress(loader, f"segmentation evaluation ({mode})", log):
        images = batch["images"].to(device)
        if mode == "whole":
            logits = whole_inference(segmentor, images, batch["image_sizes"], size_divisor)
        else:
            logits = slide_inference(segmentor, images, batch["image_sizes"], num_classes, crop, stride, size_divisor)
        for logit, orig_size, label, is_padding in zip(
            logits, batch["orig_sizes"], batch["orig_labels"], batch["is_padding"].tolist()
        ):
            if not is_padding:
                metric.update(logits_to_original(logit, orig_size), label.to(device))
    metric.all_reduce()
    return metric.compute()
