"""ADE20K layout: an image folder and a folder of PNG label maps with the same stems.

Label 0 means "other/unlabelled": with `reduce_zero_label` it becomes `ignore_index` and the
classes 1..K become 0..K-1, as in mmseg's ADE20KDataset.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors

from piip6b import dist
from piip6b.tasks.data.common import BadDataPolicy, DataError, SampleKey, new_stats, read_image, sample_key
from piip6b.tasks.data.transforms import augment

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASSES_FILE = "classes.json"  # optional, next to the image/label folders: {"classes": [names]}

# ADE20K's 150 evaluation classes (SceneParsing's objectInfo150, label values 1..150), named as in
# mmseg's ADE20KDataset: the names of the per-class tables when the data set has no classes.json.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


def read_label(path: Path) -> np.ndarray:
    """A PNG label map -> uint8 [H, W]; palette PNGs give their indices, not colours."""
    try:
        with PILImage.open(path) as img:
            mode = img.mode
            label = np.array(img, dtype=np.uint8) if mode in ("L", "P") else None
    except FileNotFoundError as exc:
        raise DataError(f"label map {path} does not exist") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode label map {path}: {exc}") from exc
    if label is None:
        raise DataError(f"label map {path} has mode {mode}; expected 8-bit L or P (class indices)")
    return label


def reduce_zero_label(label: np.ndarray, ignore_index: int) -> np.ndarray:
    out = label.astype(np.int16) - 1
    out[label == 0] = ignore_index
    out[label == ignore_index] = ignore_index  # an already-ignored 255 stays ignored
    return out.astype(np.uint8)


class AdeSegmentationDataset(torch.utils.data.Dataset):
    """Samples: `image` uint8 [3,h,w], `label` long [h,w] (transformed with the image), and in
    evaluation (`train=False`) `orig_label` long [H,W] at the file's resolution, which is where
    the reference measures mIoU; plus `image_id` (index), `file_name`, sizes, `is_padding`, `stats`.

    Every label map is checked when it is read: a value that is neither `ignore_index` nor one of
    the `num_classes` classes (after the zero-label reduction) is bad data, named with its file,
    instead of an out-of-bounds target deep inside the loss or the metric."""

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        *,
        num_classes: int,
        transforms: Any = None,
        train: bool = True,
        bad_data: str = "error",
        reduce_zero_label: bool = True,
        ignore_index: int = 255,
    ):
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.transforms, self.train, self.num_classes = transforms, train, num_classes
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        for folder, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not folder.is_dir():
                raise DataError(
                    f"ADE20K {what} folder {folder} does not exist; set data.root / data.*_images / "
                    "data.*_annotations, or write the synthetic data set with `piip6b make-shapes OUT`"
                )
        labels = {p.stem: p for p in self.label_dir.iterdir() if p.suffix.lower() == ".png"}
        self.init_stats = {"images_without_label": 0}
        self._pairs: list[tuple[str, str]] = []
        unlabelled = []
        for image_path in sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            label_path = labels.get(image_path.stem)
            if label_path is None:
                if bad_data == "error":
                    raise DataError(
                        f"image {image_path} has no label map {self.label_dir / (image_path.stem + '.png')}; "
                        "add it or set data.bad_data=skip"
                    )
                unlabelled.append(image_path.name)
                continue
            self._pairs.append((str(image_path), str(label_path)))
        self.init_stats["images_without_label"] = len(unlabelled)
        if not self._pairs:
            raise DataError(f"no image/label pairs found in {self.image_dir} and {self.label_dir}")
        if unlabelled and dist.is_main():
            # Once per data set (every rank builds it): a split that shrinks must not do so unnoticed.
            shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
            logger.warning("%s: left out %d of %d images that have no label map in %s (data.bad_data=skip): %s",
                           self.image_dir, len(unlabelled), len(unlabelled) + len(self._pairs), self.label_dir, shown)
        self._policy = BadDataPolicy(bad_data, len(self._pairs))
        self.num_annotations = len(self._pairs)  # one label map per image
        self.class_names = self._read_class_names()

    def _check_classes(self, label: np.ndarray, path: Path) -> None:
        outside = label[(label != self.ignore_index) & (label >= self.num_classes)]
        if outside.size:
            values = sorted(set(outside.tolist()))
            shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
            raw = f" (file values {', '.join(str(v + 1) for v in values[:5])} before the zero-label reduction)" \
                if self.reduce_zero_label else ""
            raise DataError(
                f"label map {path} has class values {shown}{raw} outside the {self.num_classes} classes "
                f"0..{self.num_classes - 1} (ignore_index {self.ignore_index}); fix the file, check "
                "segmentation.num_classes and data.segmentation.reduce_zero_label, or set data.bad_data=skip"
            )

    def _read_class_names(self) -> list[str] | None:
        for folder in (self.image_dir.parent.parent, self.image_dir.parent):
            path = folder / CLASSES_FILE
            if path.is_file():
                try:
                    return list(json.loads(path.read_text())["classes"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{path} is not {{\"classes\": [names...]}}: {exc}") from exc
        return None

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = sample_key(key)
        is_padding = index >= len(self)
        sample = self._policy(index % len(self), lambda i: self._load(i, seed))
        sample["is_padding"] = is_padding or sample.pop("is_substitute", False)
        return sample

    def _load(self, index: int, seed: int) -> dict[str, Any]:
        image_path, label_path = map(Path, self._pairs[index])
        image = read_image(image_path)
        label = read_label(label_path)
        if label.shape != tuple(image.shape[1:]):
            raise DataError(f"label map {label_path} is {label.shape} but image {image_path} is {tuple(image.shape[1:])}")
        if self.reduce_zero_label:
            label = reduce_zero_label(label, self.ignore_index)
        self._check_classes(label, label_path)
        label_t = torch.from_numpy(label)
        inputs = {"image": tv_tensors.Image(image), "label": tv_tensors.Mask(label_t[None])}
        if self.transforms is not None:
            inputs = augment(self.transforms, inputs, seed)
        image = inputs["image"].as_subclass(torch.Tensor)
        sample = {
            "image": image,
            "label": inputs["label"].as_subclass(torch.Tensor)[0].long(),
            "image_id": index,
            "file_name": str(image_path),
            "orig_size": tuple(label.shape),
            "image_size": tuple(image.shape[1:]),
            "stats": new_stats(),
        }
        if not self.train:
            sample["orig_label"] = label_t.long()
        return sample
