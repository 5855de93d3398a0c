"""Whole-image and sliding-window segmentation inference (mmseg's `whole`/`slide` test modes).

`segmentor(images [n,3,h,w]) -> logits [n,C,h',w']`; logits are resized (bilinear) to the input
size, as mmseg's encode_decode does. Sliding windows follow mmseg's grid: ceil-style steps of
`stride`, the last window pushed back inside the image, overlapping logits averaged.

Under ZeRO-3 every forward is a collective (parameters are gathered per call), so ranks must run
the same number of forwards: `slide_inference` agrees on the count with an all-reduce(max) and
runs the missing ones on zeros.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from piip6b import dist

Segmentor = Callable[[torch.Tensor], torch.Tensor]


def _forward(segmentor: Segmentor, images: torch.Tensor) -> torch.Tensor:
    logits = segmentor(images)
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


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


def whole_inference(segmentor: Segmentor, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """One forward over the padded batch; returns each image's logits [C,h,w] at its true size."""
    logits = _forward(segmentor, images)
    return [logits[i, :, :h, :w] for i, (h, w) in enumerate(image_sizes)]


def slide_inference(
    segmentor: Segmentor,
    images: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    num_classes: int,
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    windows_per_forward: int = 1,
    sync_ranks: bool = True,
) -> list[torch.Tensor]:
    """Sliding-window logits [C,h,w] for each image's true-size region. Windows of images smaller
    than the crop are zero-padded (the normalised mean) to the crop size, so every forward has
    one shape; their logits are cut back."""
    crop_h, crop_w = crop
    jobs = []  # (image index, window)
    for i, (h, w) in enumerate(image_sizes):
        jobs += [(i, win) for win in sliding_windows(h, w, crop, stride)]
    sums = [images.new_zeros(num_classes, h, w, dtype=torch.float32) for h, w in image_sizes]
    counts = [images.new_zeros(1, h, w, dtype=torch.float32) for h, w in image_sizes]
    forwards = -(-len(jobs) // windows_per_forward)
    total_forwards = int(dist.all_max(forwards)) if sync_ranks else forwards
    for f in range(total_forwards):
        chunk = jobs[f * windows_per_forward : (f + 1) * windows_per_forward]
        crops = images.new_zeros(windows_per_forward, images.shape[1], crop_h, crop_w)
        for k, (i, (y1, y2, x1, x2)) in enumerate(chunk):
            crops[k, :, : y2 - y1, : x2 - x1] = images[i, :, y1:y2, x1:x2]
        logits = _forward(segmentor, crops).float()  # all-zero crops keep the forward count equal
        for k, (i, (y1, y2, x1, x2)) in enumerate(chunk):
            sums[i][:, y1:y2, x1:x2] += logits[k, :, : y2 - y1, : x2 - x1]
            counts[i][:, y1:y2, x1:x2] += 1
    return [s / c for s, c in zip(sums, counts)]


def logits_to_original(logits: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """[C,h,w] logits of the resized image -> [H,W] class map at the file's resolution
    (mmseg resizes the logits, not the argmax)."""
    if tuple(logits.shape[-2:]) != tuple(orig_size):
        logits = F.interpolate(logits[None], size=tuple(orig_size), mode="bilinear", align_corners=False)[0]
    return logits.argmax(dim=0)
