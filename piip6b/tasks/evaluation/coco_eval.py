"""COCO box and mask AP with pycocotools' COCOeval, on predictions gathered from every rank.

Each rank `add`s its images' predictions (in the ORIGINAL image frame), encoded to COCO result
dicts (masks as RLE) right away so gathering moves little. `evaluate()` gathers to rank 0,
keeps one copy per image id (InferenceSampler pads ranks with duplicates), optionally writes them
as a COCO results file, runs COCOeval for box and mask, and broadcasts the numbers (the summary
and each category's AP), so every rank returns the same `EvalResults`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils

from piip6b import dist
from piip6b.tasks.evaluation.results import EvalResults

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# gather(obj) -> list of every rank's obj on rank 0, None elsewhere (injectable for tests).
GatherFn = Callable[[Any], "list[Any] | None"]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # str pickles and JSON-dumps; bytes do not JSON
    return rle


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    label_to_category_id: dict[int, int],
    masks: torch.Tensor | None = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One image's predictions -> COCO result dicts. boxes xyxy [N,4] and masks [N,(1,)H,W]
    (probabilities or bool) in the original image frame; labels 1..K as in the dataset."""
    boxes = boxes.detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores_l, labels_l = scores.detach().float().cpu().tolist(), labels.detach().cpu().tolist()
    binary = None
    if masks is not None:
        masks = masks.detach()
        if masks.dim() == 4:
            masks = masks[:, 0]
        binary = (masks >= mask_threshold if masks.is_floating_point() else masks.bool()).cpu().numpy()
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores_l, labels_l)):
        result = {"image_id": int(image_id), "category_id": label_to_category_id[int(label)], "bbox": box, "score": score}
        if binary is not None:
            result["segmentation"] = encode_mask(binary[i])
        results.append(result)
    return results


class CocoEvaluator:
    """`predictions_file`: where rank 0 writes the gathered predictions, once, as a COCO results
    file (boxes xywh, scores, category ids and RLE masks: what `COCO.loadRes` and the COCO test
    server read)."""

    def __init__(
        self,
        coco_gt,
        label_to_category_id: dict[int, int],
        iou_types: tuple[str, ...] = ("bbox", "segm"),
        gather: GatherFn = dist.gather_to_main,
        predictions_file: str | Path | None = None,
    ):
        self.coco_gt, self.label_to_category_id, self.iou_types = coco_gt, label_to_category_id, iou_types
        self._gather = gather
        self.predictions_file = Path(predictions_file) if predictions_file is not None else None
        self._results: dict[int, list[dict[str, Any]]] = {}

    def add(self, image_id: int, boxes, scores, labels, masks=None) -> None:
        """Record one image (also with no detections: it still counts as evaluated)."""
        self._results[int(image_id)] = detections_to_coco(
            image_id, boxes, scores, labels, self.label_to_category_id, masks if "segm" in self.iou_types else None
        )

    def evaluate(self) -> EvalResults:
        """Collective: rank 0 evaluates what every rank gathered; every rank gets its numbers (or
        its error, instead of waiting for them until the collective timeout)."""
        gathered = self._gather(self._results)
        return dist.on_main(lambda: self._evaluate_merged(gathered))

    def _evaluate_merged(self, per_rank: list[dict[int, list]]) -> EvalResults:
        merged: dict[int, list] = {}
        for results in per_rank:
            for image_id, dets in results.items():
                merged.setdefault(image_id, dets)  # a padded duplicate of an image already seen
        expected = set(self.coco_gt.getImgIds())
        unknown = set(merged) - expected
        if unknown:
            raise ValueError(f"predictions for image ids not in the ground truth: {sorted(unknown)[:10]}")
        missing = len(expected) - len(merged)
        if missing:
            logger.warning("COCO evaluation: %d of %d ground-truth images have no predictions", missing, len(expected))
        metrics: dict[str, float | None] = {"num_images": float(len(merged)), "missing_images": float(missing)}
        detections = [d for image_id in sorted(merged) for d in merged[image_id]]
        if self.predictions_file is not None:
            self._write_predictions(detections)
        per_class: dict[str, dict[str, float | None]] = {}
        for iou_type in self.iou_types:
            stats, per_category = self._run_cocoeval(iou_type, detections, sorted(merged))
            metrics.update({f"{iou_type}/{name}": value for name, value in zip(STAT_NAMES, stats)})
            per_class[f"{iou_type}/AP"] = per_category
        return EvalResults(metrics, per_class)

    def _write_predictions(self, detections: list[dict]) -> None:
        path = self.predictions_file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w") as f:
            json.dump(detections, f)
        os.replace(partial, path)  # a reader never sees half a file
        logger.info("wrote %d COCO-format predictions to %s", len(detections), path)

    def _run_cocoeval(self, iou_type: str, detections: list[dict], image_ids: list[int]
                      ) -> tuple[list[float | None], dict[str, float | None]]:
        """The summary stats and each category's AP (IoU .50:.95, all areas, 100 detections), in
        percent; None where COCOeval says -1: no ground truth of that size or category."""
        from pycocotools.cocoeval import COCOeval

        # Keep only the field being judged: with a box present, loadRes sets a mask result's
        # area to the box area, which moves detections between the small/medium/large ranges.
        dropped = "segmentation" if iou_type == "bbox" else "bbox"
        detections = [{k: v for k, v in d.items() if k != dropped} for d in detections]
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            coco_dt = self.coco_gt.loadRes(detections) if detections else _no_detections(self.coco_gt)
            evaluator = COCOeval(self.coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.info("COCO %s evaluation:\n%s", iou_type, output.getvalue().strip())
        stats = [_percent_or_none(s) for s in evaluator.stats[: len(STAT_NAMES)]]
        # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
        precision = evaluator.eval["precision"]
        names = {c["id"]: c["name"] for c in self.coco_gt.loadCats(evaluator.params.catIds)}
        per_category = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            valid = precision[:, :, k, 0, -1]
            valid = valid[valid > -1]
            per_category[names[category_id]] = 100.0 * float(valid.mean()) if valid.size else None
        return stats, per_category


def _percent_or_none(stat: float) -> float | None:
    return None if stat < 0 else 100.0 * float(stat)


def _no_detections(coco_gt):
    """An empty result set (`loadRes` cannot take an empty list), so that COCOeval still tells a
    category or size with ground truth (AP 0) from one without (-1, not applicable)."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty
