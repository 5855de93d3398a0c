"""Batching: pad to a common size that is a multiple of `size_divisor`, normalise, keep true sizes.

A batch is a dict:
  images       float [B, 3, H, W], (x - 127.5) / 127.5, zero (the mean) in the padding
  image_sizes  list of (h, w): each image's true size inside the padding
  orig_sizes   list of (h, w): the file's size (predictions are mapped back to it)
  image_ids, file_names, is_padding (bool tensor [B]: duplicates/substitutes no metric may count)
  data_stats   dict of summed per-sample counters (skipped samples, degenerate boxes dropped)
  targets      detection: list of {boxes, labels, masks (uint8 [N, H, W], padded with 0)}
  labels       segmentation: long [B, H, W], padded with ignore_index
  orig_labels  segmentation evaluation: list of long [h0, w0] at the file's resolution
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from piip6b.tasks.data.common import STAT_KEYS

PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


def normalize(image: torch.Tensor) -> torch.Tensor:
    return (image.float() - PIXEL_MEAN) / PIXEL_STD


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised float images -> uint8 (for visualisation)."""
    return (images * PIXEL_STD + PIXEL_MEAN).round().clamp(0, 255).to(torch.uint8)


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def single_image_batches(batch: dict[str, Any], size_divisor: int) -> list[dict[str, Any]]:
    """Each image of an evaluation batch as a batch of its own, padded only to its own size's
    multiple of `size_divisor` (exactly the batch `val_batch_size: 1` would give): what a model
    predicts for an image then never depends on the images that share its batch."""
    singles = []
    for index, (h, w) in enumerate(batch["image_sizes"]):
        height, width = _round_up(int(h), size_divisor), _round_up(int(w), size_divisor)
        single = {key: batch[key][index : index + 1] for key in ("image_sizes", "orig_sizes", "image_ids",
                                                                  "file_names", "is_padding")}
        single["images"] = batch["images"][index : index + 1, :, :height, :width].contiguous()
        singles.append(single)
    return singles


class PadCollate:
    """Collate for both tasks (picklable, so loader workers can run it).

    `min_size` (h, w) pads at least to that size: segmentation training pads to the crop size as
    mmseg's `Pad(size=crop_size)` does, so every training batch has one shape."""

    def __init__(self, size_divisor: int = 32, ignore_index: int = 255, min_size: tuple[int, int] | None = None):
        self.size_divisor, self.ignore_index, self.min_size = size_divisor, ignore_index, min_size

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("PadCollate got an empty batch")
        max_h = max(s["image"].shape[1] for s in samples)
        max_w = max(s["image"].shape[2] for s in samples)
        if self.min_size is not None:
            max_h, max_w = max(max_h, self.min_size[0]), max(max_w, self.min_size[1])
        height, width = _round_up(max_h, self.size_divisor), _round_up(max_w, self.size_divisor)

        def pad_right_bottom(x: torch.Tensor, value: float) -> torch.Tensor:
            return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), value=value)

        batch: dict[str, Any] = {
            "images": torch.stack([pad_right_bottom(normalize(s["image"]), 0.0) for s in samples]),
            "image_sizes": [tuple(s["image_size"]) for s in samples],
            "orig_sizes": [tuple(s["orig_size"]) for s in samples],
            "image_ids": [s["image_id"] for s in samples],
            "file_names": [s["file_name"] for s in samples],
            "is_padding": torch.tensor([bool(s.get("is_padding", False)) for s in samples]),
            "data_stats": {k: sum(s["stats"][k] for s in samples) for k in STAT_KEYS},
        }
        if "target" in samples[0]:
            batch["targets"] = [
                {
                    "boxes": s["target"]["boxes"],
                    "labels": s["target"]["labels"],
                    "masks": pad_right_bottom(s["target"]["masks"], 0),
                }
                for s in samples
            ]
        if "label" in samples[0]:
            batch["labels"] = torch.stack([pad_right_bottom(s["label"], self.ignore_index) for s in samples])
        if "orig_label" in samples[0]:
            batch["orig_labels"] = [s["orig_label"] for s in samples]
        return batch
