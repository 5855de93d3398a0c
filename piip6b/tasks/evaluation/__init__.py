"""Evaluation: COCO box/mask AP gathered across ranks; mIoU/mAcc/aAcc from an all-reduced
confusion matrix; whole-image and sliding-window segmentation inference; results (`EvalResults`)
with per-class values by class name."""

from piip6b.tasks.evaluation.coco_eval import CocoEvaluator, detections_to_coco, encode_mask
from piip6b.tasks.evaluation.loops import evaluate_detection, evaluate_segmentation
from piip6b.tasks.evaluation.results import EvalResults
from piip6b.tasks.evaluation.seg_metrics import SegmentationMetric, metrics_from_confusion
from piip6b.tasks.evaluation.sliding_window import (
    logits_to_original,
    slide_inference,
    sliding_windows,
    whole_inference,
)

__all__ = [
    "CocoEvaluator",
    "EvalResults",
    "SegmentationMetric",
    "detections_to_coco",
    "encode_mask",
    "evaluate_detection",
    "evaluate_segmentation",
    "logits_to_original",
    "metrics_from_confusion",
    "slide_inference",
    "sliding_windows",
    "whole_inference",
]
