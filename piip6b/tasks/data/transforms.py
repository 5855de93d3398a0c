"""The reference's augmentation pipelines, written as torchvision.transforms.v2 transforms.

Every transform takes a dict of tv_tensors (`image`: Image, and `boxes`: BoundingBoxes with
`masks`: Mask, or `label`: Mask) so boxes, instance masks and label maps move with the image.
Images stay uint8 0..255 until the collate normalises them (4x less worker-to-trainer traffic).
Resizes use bilinear without antialiasing, as the reference's OpenCV resize does.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

from piip6b.tasks.data.config import DetectionAugConfig, SegmentationAugConfig

_BILINEAR = v2.InterpolationMode.BILINEAR


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            height, width = F.get_size(inpt)
            return height, width
    raise TypeError("transform input holds no tv_tensors.Image or tv_tensors.Mask")


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, ()).item())


class KeepRatioResize(v2.Transform):
    """Rescale so the image fits (long, short) = `scale` times a ratio drawn from `ratio_range`,
    keeping the aspect ratio (mmcv's `imrescale`: factor min(long/L, short/S), sizes rounded)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.scale = (max(scale), min(scale))
        self.ratio_range = ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        long_side, short_side = int(self.scale[0] * ratio), int(self.scale[1] * ratio)
        factor = min(long_side / max(height, width), short_side / min(height, width))
        return {"size": [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], interpolation=_BILINEAR, antialias=False)


class RandomAbsoluteCrop(v2.Transform):
    """Crop a (h, w) window with h, w drawn uniformly from [min(H, lo), min(H, hi)] (mmdet's
    `absolute_range` RandomCrop; lo == hi gives a fixed crop that shrinks to small images).
    Boxes are clipped; ones that fall outside become degenerate and are dropped later."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        crop_h = _randint(min(height, self.min_size), min(height, self.max_size))
        crop_w = _randint(min(width, self.min_size), min(width, self.max_size))
        return {
            "top": _randint(0, height - crop_h),
            "left": _randint(0, width - crop_w),
            "height": crop_h,
            "width": crop_w,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class CategoryBalancedCrop(v2.Transform):
    """mmseg's RandomCrop with `cat_max_ratio`: retry up to 10 times until the crop holds more than
    one category and none covers `cat_max_ratio` or more of its labelled pixels."""

    def __init__(self, size: tuple[int, int], cat_max_ratio: float, ignore_index: int, tries: int = 10):
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index, self.tries = size, cat_max_ratio, ignore_index, tries

    def _window(self, height: int, width: int) -> dict[str, int]:
        crop_h, crop_w = min(height, self.size[0]), min(width, self.size[1])
        return {
            "top": _randint(0, height - crop_h),
            "left": _randint(0, width - crop_w),
            "height": crop_h,
            "width": crop_w,
        }

    def _balanced(self, label: torch.Tensor, window: dict[str, int]) -> bool:
        crop = F.crop(label, **window)
        _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
        return len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)
        window = self._window(height, width)
        label = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        if label is None or self.cat_max_ratio >= 1.0:
            return window
        for _ in range(self.tries):
            if self._balanced(label, window):
                break
            window = self._window(height, width)
        return window

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def _scale_saturation(image: torch.Tensor, alpha: float) -> torch.Tensor:
    """Multiply HSV saturation by `alpha` (clipped to 1) keeping hue and value: for fixed H and V
    every channel is affine in S, c = V - (V - c0) * S'/S."""
    value = image.amax(dim=0, keepdim=True)
    spread = value - image.amin(dim=0, keepdim=True)
    max_gain = torch.where(spread > 0, value / spread.clamp_min(1e-6), torch.ones_like(value))
    gain = torch.clamp(torch.full_like(value, alpha), max=max_gain)
    return value - (value - image) * gain


class PhotoMetricDistortion(v2.Transform):
    """mmseg's PhotoMetricDistortion: each step with probability 1/2 — brightness +-32, contrast
    x[0.5, 1.5] (before or after the colour steps), saturation x[0.5, 1.5], hue +-18 of OpenCV's
    180 hue units; every step clips to 0..255 and truncates to uint8 as the reference does."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range, self.hue_delta = contrast_range, saturation_range, hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(2, ()).item())

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {
            "brightness": self._uniform(-self.brightness_delta, self.brightness_delta) if self._coin() else None,
            "contrast_first": self._coin(),
            "contrast": self._uniform(*self.contrast_range) if self._coin() else None,
            "saturation": self._uniform(*self.saturation_range) if self._coin() else None,
            "hue": _randint(-self.hue_delta, self.hue_delta) if self._coin() else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        def to_uint8(x: torch.Tensor) -> torch.Tensor:
            return x.clamp(0, 255).to(torch.uint8)

        image = inpt.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            image = to_uint8(image.float() + params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            image = to_uint8(image.float() * params["contrast"])
        if params["saturation"] is not None:
            image = to_uint8(_scale_saturation(image.float(), params["saturation"]))
        if params["hue"] is not None:
            image = F.adjust_hue(image, params["hue"] / 180.0)
        if not params["contrast_first"] and params["contrast"] is not None:
            image = to_uint8(image.float() * params["contrast"])
        return tv_tensors.wrap(image, like=inpt)


def augment(transforms: v2.Transform, inputs: dict[str, Any], seed: int) -> dict[str, Any]:
    """`transforms(inputs)` with every random draw a function of `seed` alone.

    The transforms (these and torchvision's flip, shortest-side resize and random choice) draw from
    torch's default CPU generator, which takes no per-call generator; it is seeded for this sample
    inside a fork, so the caller's stream (a loader worker's, or the trainer's own when the data is
    loaded in the training process) is neither read nor moved.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed seeds CUDA too)
        return transforms(inputs)


def build_detection_transforms(cfg: DetectionAugConfig, train: bool) -> v2.Transform:
    if not train:
        return KeepRatioResize(cfg.test_scale)
    sides = list(cfg.train_short_sides)
    multi_scale = v2.RandomShortestSize(sides, max_size=cfg.train_max_size, antialias=False)
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(cfg.flip_prob)]
    if cfg.detr_crop_short_sides:
        crop_policy = v2.Compose(
            [
                v2.RandomShortestSize(list(cfg.detr_crop_short_sides), max_size=cfg.train_max_size, antialias=False),
                RandomAbsoluteCrop(*cfg.detr_crop_range),
                v2.RandomShortestSize(sides, max_size=cfg.train_max_size, antialias=False),
            ]
        )
        steps.append(v2.RandomChoice([multi_scale, crop_policy]))
    else:
        steps.append(multi_scale)
    if cfg.train_crop_size > 0:
        steps.append(RandomAbsoluteCrop(cfg.train_crop_size, cfg.train_crop_size))
    return v2.Compose(steps)


def build_segmentation_transforms(cfg: SegmentationAugConfig, train: bool) -> v2.Transform:
    if not train:
        return KeepRatioResize(cfg.test_scale)
    steps: list[v2.Transform] = [
        KeepRatioResize(cfg.scale, cfg.ratio_range),
        CategoryBalancedCrop(cfg.crop_size, cfg.cat_max_ratio, cfg.ignore_index),
        v2.RandomHorizontalFlip(cfg.flip_prob),
    ]
    if cfg.photometric:
        steps.append(PhotoMetricDistortion())
    return v2.Compose(steps)
