"""`DataConfig`: where the data is, how it is augmented and loaded.

Defaults are the reference recipe at full scale (docs/SPEC.md §6); tiny configs override the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BAD_DATA_POLICIES = ("error", "skip")


def _as_tuple(value, name: str, length: int | None = None) -> tuple:
    # YAML gives lists; the dataclasses keep tuples so configs hash and compare by value.
    if isinstance(value, (int, float)):
        value = (value,) * (length or 1)
    value = tuple(value)
    if length is not None and len(value) != length:
        raise ValueError(f"data config: `{name}` needs {length} values, got {list(value)}")
    return value


@dataclass
class DetectionAugConfig:
    """COCO Mask R-CNN augmentation: DETR-style multi-scale train resize, (1333, 800) test."""

    # Policy A: short side drawn from these values, long side capped at `train_max_size`.
    train_short_sides: tuple[int, ...] = tuple(range(480, 801, 32))
    train_max_size: int = 1333
    # Policy B (chosen with probability 1/2): resize to one of these short sides, crop an absolute
    # size drawn from `detr_crop_range`, then resize as in policy A. Empty tuple: policy A only.
    detr_crop_short_sides: tuple[int, ...] = (400, 500, 600)
    detr_crop_range: tuple[int, int] = (384, 600)
    # Final random crop to at most this square size (0: no crop).
    train_crop_size: int = 1024
    # Test resize, written as the reference does: (long side cap, short side).
    test_scale: tuple[int, int] = (1333, 800)
    flip_prob: float = 0.5
    # Boxes narrower or lower than this after augmentation are dropped (and counted):
    # torchvision's detection models raise on degenerate boxes in training.
    min_box_size: float = 0.01

    def __post_init__(self) -> None:
        self.train_short_sides = _as_tuple(self.train_short_sides, "train_short_sides")
        self.detr_crop_short_sides = _as_tuple(self.detr_crop_short_sides, "detr_crop_short_sides")
        self.detr_crop_range = _as_tuple(self.detr_crop_range, "detr_crop_range", 2)
        self.test_scale = _as_tuple(self.test_scale, "test_scale", 2)
        if not self.train_short_sides or min(self.train_short_sides) <= 0:
            raise ValueError("data.detection.train_short_sides needs at least one positive size")
        for name in ("detr_crop_short_sides", "detr_crop_range", "test_scale"):
            if any(size < 1 for size in getattr(self, name)):
                raise ValueError(f"data.detection.{name} must hold positive sizes, got {list(getattr(self, name))}")
        if self.detr_crop_range[0] > self.detr_crop_range[1]:
            raise ValueError(f"data.detection.detr_crop_range {self.detr_crop_range} is not (min, max)")
        if self.train_max_size < 1:
            raise ValueError(f"data.detection.train_max_size must be >= 1, got {self.train_max_size}")
        if self.train_crop_size < 0:
            raise ValueError(f"data.detection.train_crop_size must be >= 0 (0: no crop), got {self.train_crop_size}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"data.detection.flip_prob must lie in [0, 1], got {self.flip_prob}")
        if self.min_box_size < 0:
            raise ValueError(f"data.detection.min_box_size must be >= 0, got {self.min_box_size}")


@dataclass
class SegmentationAugConfig:
    """ADE20K UperNet augmentation (mmseg's pipeline): ratio resize, cat-max-ratio crop, flip,
    photometric distortion; keep-ratio resize to `test_scale` at test time."""

    scale: tuple[int, int] = (2048, 512)  # (long side, short side) before the ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)  # (height, width)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    test_scale: tuple[int, int] = (2048, 512)
    # ADE20K's label 0 is "other": it becomes ignore, and labels 1..150 become 0..149.
    reduce_zero_label: bool = True
    ignore_index: int = 255

    def __post_init__(self) -> None:
        self.scale = _as_tuple(self.scale, "scale", 2)
        self.ratio_range = _as_tuple(self.ratio_range, "ratio_range", 2)
        self.crop_size = _as_tuple(self.crop_size, "crop_size", 2)
        self.test_scale = _as_tuple(self.test_scale, "test_scale", 2)
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"data.segmentation.ratio_range {self.ratio_range} is not (min, max) > 0")
        for name in ("scale", "crop_size", "test_scale"):
            if any(size < 1 for size in getattr(self, name)):
                raise ValueError(f"data.segmentation.{name} must hold positive sizes, got {list(getattr(self, name))}")
        if self.cat_max_ratio <= 0:
            raise ValueError(f"data.segmentation.cat_max_ratio must be > 0 (1 or more: no check), got {self.cat_max_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"data.segmentation.flip_prob must lie in [0, 1], got {self.flip_prob}")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"data.segmentation.ignore_index must fit the 8-bit label maps (0..255), got {self.ignore_index}")


@dataclass
class DataConfig:
    """Dataset location, augmentation and loading. Paths are relative to `root` unless absolute;
    empty paths take the standard layout of the task's dataset:
    COCO: train2017/, val2017/, annotations/instances_{train,val}2017.json;
    ADE20K: images/{training,validation}/, annotations/{training,validation}/ (PNG labels)."""

    root: str = ""
    train_images: str = ""
    train_annotations: str = ""  # COCO: instances JSON; ADE20K: folder of PNG label maps
    val_images: str = ""
    val_annotations: str = ""
    # Images per optimizer step over all ranks, as the recipe states it (docs/SPEC.md §6: 16). The
    # engine splits it into per-rank micro-batches of at most `batch_size` and gradient accumulation
    # for the world size (`BatchLayout.derive`). None: pinned by hand, the global batch is then
    # batch_size x engine.grad_accum_steps x world size.
    global_batch: int | None = None
    batch_size: int = 2  # the most images one rank takes per forward (memory); exactly that when global_batch is unset
    val_batch_size: int = 1
    num_workers: int = 4
    prefetch_factor: int = 2
    size_divisor: int = 32
    # What a missing/undecodable image or an invalid annotation does: `error` stops with a message
    # naming the file and id; `skip` drops it, logs it once, and counts it in the data stats.
    bad_data: str = "error"
    detection: DetectionAugConfig = field(default_factory=DetectionAugConfig)
    segmentation: SegmentationAugConfig = field(default_factory=SegmentationAugConfig)

    def __post_init__(self) -> None:
        if isinstance(self.detection, dict):
            self.detection = DetectionAugConfig(**self.detection)
        if isinstance(self.segmentation, dict):
            self.segmentation = SegmentationAugConfig(**self.segmentation)
        if self.bad_data not in BAD_DATA_POLICIES:
            raise ValueError(f"data.bad_data must be one of {BAD_DATA_POLICIES}, got {self.bad_data!r}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"data.global_batch must be >= 1 (or unset: pinned by data.batch_size), got {self.global_batch}")
        for name in ("batch_size", "val_batch_size", "size_divisor", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
