"""Whole-image and sliding-window segmentation inference (mmseg's `whole`/`slide` test modes).

`segmentor(images [n,3,h,w]) -> logits [n,C,h',w']`; logits are resized (bilinear) to the input
size, as mmseg's encode_decode does. Sliding windows follow mmseg's grid: ceil-style steps of
`stride`, the last window pushed back inside the image, overlapping logits averaged.

Every forward holds ONE image, or one window of it, padded (with zeros, the normalised mean) only
to the next multiple of the backbone's `size_divisor`: a prediction never depends on the images
that share its batch, nor on a crop size it was not cut to. A window of an image smaller than the
crop runs at its own size, as mmseg runs it; zero-padding it to the full crop changes what a
model with global context (attention, pooling) sees.

Under ZeRO-3 every forward is a collective (parameters are gathered per call), so ranks must run
the same number of forwards: `slide_inference` agrees on the count with an all-reduce(max) and
runs the missing ones on zeros; `whole_inference` runs one per image, and the InferenceSampler
gives every rank the same number of images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from piip6b import dist

Segmentor = Callable[[torch.Tensor], torch.Tensor]


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def _forward_region(segmentor: Segmentor, image: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """Logits [C,h,w] of one image region [3,h,w], run alone, padded to a multiple of `size_divisor`."""
    height, width = image.shape[-2:]
    padded = F.pad(image[None], (0, _round_up(width, size_divisor) - width, 0, _round_up(height, size_divisor) - height))
    logits = segmentor(padded)
    if logits.shape[-2:] != padded.shape[-2:]:
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[0, :, :height, :width].float()


def sliding_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) windows covering a height x width image, mmseg's grid."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def whole_inference(segmentor: Segmentor, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                    size_divisor: int = 1) -> list[torch.Tensor]:
    """One forward per image, at its true size (padded to `size_divisor`); returns each image's
    logits [C,h,w]."""
    return [_forward_region(segmentor, images[i, :, :h, :w], size_divisor) for i, (h, w) in enumerate(image_sizes)]


def slide_inference(
    segmentor: Segmentor,
    images: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    num_classes: int,
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    size_divisor: int = 1,
    sync_ranks: bool = True,
) -> list[torch.Tensor]:
    """Sliding-window logits [C,h,w] for each image's true-size region, one window per forward."""
    jobs = [(i, window) for i, (h, w) in enumerate(image_sizes) for window in sliding_windows(h, w, crop, stride)]
    # Agreed before the first forward: the all-reduce must not meet another rank's forward.
    forwards = int(dist.all_max(len(jobs))) if sync_ranks else len(jobs)
    sums = [images.new_zeros(num_classes, h, w, dtype=torch.float32) for h, w in image_sizes]
    counts = [images.new_zeros(1, h, w, dtype=torch.float32) for h, w in image_sizes]
    for i, (y1, y2, x1, x2) in jobs:
        sums[i][:, y1:y2, x1:x2] += _forward_region(segmentor, images[i, :, y1:y2, x1:x2], size_divisor)
        counts[i][:, y1:y2, x1:x2] += 1
    idle = images.new_zeros(images.shape[1], *crop)
    for _ in range(forwards - len(jobs)):  # a rank with fewer windows joins the others' last forwards
        _forward_region(segmentor, idle, size_divisor)
    return [s / c for s, c in zip(sums, counts)]


def logits_to_original(logits: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """[C,h,w] logits of the resized image -> [H,W] class map at the file's resolution
    (mmseg resizes the logits, not the argmax)."""
    if tuple(logits.shape[-2:]) != tuple(orig_size):
        logits = F.interpolate(logits[None], size=tuple(orig_size), mode="bilinear", align_corners=False)[0]
    return logits.argmax(dim=0)
