"""Predictions drawn on validation images for TensorBoard's image tab (torchvision's drawing utils).

Every function takes uint8 CHW images and returns uint8 CHW images on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """A fixed, well-spread colour per class index (golden-ratio hue steps), stable across runs."""
    colors = []
    for index in range(num_classes):
        hue = (index * 0.618033988749895) % 1.0
        colors.append(_hsv_to_rgb(hue, 0.75, 0.95))
    return colors


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: torch.Tensor,
    prediction: dict[str, torch.Tensor],
    class_names: Sequence[str] | None,
    num_classes: int,
    score_threshold: float = 0.3,
    max_detections: int = 30,
) -> torch.Tensor:
    """Masks then boxes with "class score" captions; `prediction` labels are 1..num_classes and
    its boxes/masks in `image`'s frame."""
    image = image.cpu()
    keep = (prediction["scores"] >= score_threshold).nonzero().flatten()[:max_detections].cpu()
    if keep.numel() == 0:
        return image
    labels = prediction["labels"].cpu()[keep]
    colors = class_colors(num_classes + 1)
    label_colors = [colors[int(label)] for label in labels]
    if "masks" in prediction:
        masks = prediction["masks"].cpu()[keep].bool()
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=label_colors)
    captions = [
        f"{class_names[int(label) - 1] if class_names else int(label)} {float(score):.2f}"
        for label, score in zip(labels, prediction["scores"].cpu()[keep])
    ]
    return draw_bounding_boxes(image, prediction["boxes"].cpu()[keep].float(), labels=captions, colors=label_colors, width=2)


def draw_label_map(image: torch.Tensor, label_map: torch.Tensor, num_classes: int, ignore_index: int = 255,
                   alpha: float = 0.6) -> torch.Tensor:
    """Each class present in `label_map` [H,W] painted in its colour; ignored pixels left as they are."""
    image, label_map = image.cpu(), label_map.cpu()
    present = [int(c) for c in label_map.unique() if int(c) != ignore_index and 0 <= int(c) < num_classes]
    if not present:
        return image
    masks = torch.stack([label_map == c for c in present])
    colors = class_colors(num_classes)
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[colors[c] for c in present])


def side_by_side(images: Sequence[torch.Tensor], gap: int = 4) -> torch.Tensor:
    """Concatenate equally tall CHW images left to right with a white gap."""
    height = images[0].shape[-2]
    spacer = torch.full((3, height, gap), 255, dtype=torch.uint8)
    parts = []
    for index, image in enumerate(images):
        if index:
            parts.append(spacer)
        parts.append(image)
    return torch.cat(parts, dim=-1)
