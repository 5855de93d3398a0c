"""COCO instances (JSON + image folder) for Mask R-CNN: polygon and RLE masks via pycocotools.

What the reference (mmdet's CocoDataset) does and this follows: crowd annotations and boxes under
1 px are left out of the training targets; training skips images with no remaining annotation or a
side under 32 px; evaluation keeps every image. Labels are contiguous 1..K in category-id order
(0 is background, torchvision's convention); `label_to_category_id` maps them back.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from piip6b.tasks.data.common import BadDataPolicy, DataError, SampleKey, new_stats, read_image, sample_key
from piip6b.tasks.data.transforms import augment

logger = logging.getLogger(__name__)

MIN_TRAIN_IMAGE_SIZE = 32  # mmdet's CocoDataset._filter_imgs default


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read an instances JSON and check it has the COCO shape; errors name the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise DataError(
            f"COCO annotation file {path} does not exist; set data.*_annotations / data.root, "
            "or write the synthetic data set with `piip6b make-shapes OUT`"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a COCO instances file: top level is {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path} is not a COCO instances file: `{key}` is missing or not a list")
    for image in data["images"]:
        if not isinstance(image, dict) or not {"id", "file_name", "height", "width"} <= image.keys():
            raise DataError(f"{path}: image entry {image!r:.200} lacks one of id, file_name, height, width")
    for category in data["categories"]:
        if not isinstance(category, dict) or not {"id", "name"} <= category.keys():
            raise DataError(f"{path}: category entry {category!r:.200} lacks id or name")
    if not data["categories"]:
        raise DataError(f"{path}: `categories` is empty")
    return data


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def annotation_problem(ann: dict[str, Any], images: dict[int, dict], category_ids: set[int]) -> str | None:
    """Why an annotation is unusable (None when it is fine)."""
    image = images.get(ann.get("image_id"))
    if image is None:
        return f"image_id {ann.get('image_id')!r} is not in `images`"
    if ann.get("category_id") not in category_ids:
        return f"category_id {ann.get('category_id')!r} is not in `categories`"
    bbox = ann.get("bbox")
    if not (_finite_numbers(bbox) and len(bbox) == 4):
        return f"bbox {bbox!r:.100} is not 4 finite numbers [x, y, w, h]"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox {bbox} has a negative width or height"
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        if not segm:
            return "segmentation is an empty polygon list"
        for polygon in segm:
            if not _finite_numbers(polygon) or len(polygon) < 6 or len(polygon) % 2:
                return f"polygon {polygon!r:.100} is not an even list of >= 6 finite coordinates"
    elif isinstance(segm, dict):
        if not {"counts", "size"} <= segm.keys():
            return "RLE segmentation lacks `counts` or `size`"
        if list(segm["size"]) != [image["height"], image["width"]]:
            return f"RLE size {segm['size']} differs from the image size {[image['height'], image['width']]}"
    else:
        return f"segmentation is {type(segm).__name__}, not a polygon list or an RLE dict"
    return None


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO polygon list, uncompressed RLE or compressed RLE -> uint8 [H, W] mask."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


class _PackedRecords:
    """Per-image records pickled into one numpy buffer: loader workers forked from the trainer
    then share it without copy-on-write growth (a list of Python dicts is copied page by page as
    its reference counts change, which costs gigabytes for COCO train across many workers)."""

    def __init__(self, records: list[dict[str, Any]]):
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())


class CocoInstanceDataset(torch.utils.data.Dataset):
    """Samples: `image` uint8 [3,h,w], `target` {boxes xyxy float [N,4], labels int64 [N],
    masks uint8 [N,h,w]} in the transformed frame, plus `image_id`, `file_name`, `orig_size`,
    `image_size`, `is_padding` and `stats`. Indices >= len (from InferenceSampler) wrap around
    and come back marked as padding."""

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Any = None,
        train: bool = True,
        bad_data: str = "error",
        min_box_size: float = 0.01,
    ):
        self.image_dir, self.annotation_file = Path(image_dir), Path(annotation_file)
        self.transforms, self.train, self.min_box_size = transforms, train, min_box_size
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder {self.image_dir} does not exist (data.*_images / data.root)")
        data = load_coco_json(self.annotation_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.label_to_category_id = {i + 1: c["id"] for i, c in enumerate(categories)}
        self.class_names = [c["name"] for c in categories]
        category_to_label = {cid: label for label, cid in self.label_to_category_id.items()}

        images = {img["id"]: img for img in data["images"]}
        anns_by_image: dict[int, list] = {img_id: [] for img_id in images}
        self.init_stats = {"invalid_annotations": 0, "crowd_or_tiny_annotations": 0, "images_without_annotations": 0}
        for ann in data["annotations"]:
            problem = annotation_problem(ann, images, set(category_to_label))
            if problem is not None:
                where = f"{self.annotation_file}: annotation id {ann.get('id')!r} (image id {ann.get('image_id')!r})"
                if bad_data == "error":
                    raise DataError(f"{where}: {problem}. Fix the file or set data.bad_data=skip")
                if self.init_stats["invalid_annotations"] < 10:
                    logger.warning("dropping %s: %s", where, problem)
                self.init_stats["invalid_annotations"] += 1
                continue
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1 or ann.get("area", 1) <= 0:
                self.init_stats["crowd_or_tiny_annotations"] += 1
                continue
            anns_by_image[ann["image_id"]].append(
                (ann.get("id"), [x, y, x + w, y + h], category_to_label[ann["category_id"]], ann["segmentation"])
            )

        records = []
        for img_id in sorted(images):
            img, anns = images[img_id], anns_by_image[img_id]
            if train and (not anns or min(img["width"], img["height"]) < MIN_TRAIN_IMAGE_SIZE):
                self.init_stats["images_without_annotations"] += 1
                continue
            records.append(
                {"id": img_id, "file_name": img["file_name"], "height": img["height"], "width": img["width"], "anns": anns}
            )
        if not records:
            raise DataError(f"{self.annotation_file}: no usable images ({self.init_stats})")
        self.num_annotations = sum(len(r["anns"]) for r in records)  # the instances training uses
        self._records = _PackedRecords(records)
        self.image_ids = [r["id"] for r in records]
        self._policy = BadDataPolicy(bad_data, len(records))
        logger.info("%s: %d images, %s", self.annotation_file, len(records), self.init_stats)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._records)

    def coco_api(self):
        """pycocotools COCO ground truth of this file (annotations that failed validation left
        out), for COCOeval."""
        from pycocotools.coco import COCO

        data = load_coco_json(self.annotation_file)
        images = {img["id"]: img for img in data["images"]}
        category_ids = {c["id"] for c in data["categories"]}
        data["annotations"] = [a for a in data["annotations"] if annotation_problem(a, images, category_ids) is None]
        for i, ann in enumerate(data["annotations"]):
            ann.setdefault("id", i + 1)
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
            coco.createIndex()
        return coco

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        index, seed = sample_key(key)
        is_padding = index >= len(self)
        sample = self._policy(index % len(self), lambda i: self._load(i, seed))
        sample["is_padding"] = is_padding or sample.pop("is_substitute", False)
        return sample

    def _load(self, index: int, seed: int) -> dict[str, Any]:
        record = self._records[index]
        path = self.image_dir / record["file_name"]
        image = read_image(path)
        height, width = record["height"], record["width"]
        if tuple(image.shape[1:]) != (height, width):
            raise DataError(
                f"image {path} (id {record['id']}) decodes to {tuple(image.shape[1:])} but "
                f"{self.annotation_file} says (height, width) = {(height, width)}"
            )
        masks = np.zeros((len(record["anns"]), height, width), dtype=np.uint8)
        for i, (ann_id, _, _, segm) in enumerate(record["anns"]):
            try:
                masks[i] = decode_segmentation(segm, height, width)
            except Exception as exc:  # pycocotools raises bare Exception/TypeError on malformed RLE
                raise DataError(
                    f"{self.annotation_file}: annotation id {ann_id} (image id {record['id']}) has a "
                    f"segmentation pycocotools cannot decode: {exc}"
                ) from exc
        boxes = torch.tensor([a[1] for a in record["anns"]], dtype=torch.float32).reshape(-1, 4)
        inputs = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.tensor([a[2] for a in record["anns"]], dtype=torch.int64),
        }
        if self.transforms is not None:
            inputs = augment(self.transforms, inputs, seed)
        boxes = inputs["boxes"].as_subclass(torch.Tensor)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_box_size)
        image = inputs["image"].as_subclass(torch.Tensor)
        return {
            "image": image,
            "target": {
                "boxes": boxes[keep],
                "labels": inputs["labels"][keep],
                "masks": inputs["masks"].as_subclass(torch.Tensor)[keep],
            },
            "image_id": record["id"],
            "file_name": str(path),
            "orig_size": (height, width),
            "image_size": tuple(image.shape[1:]),
            "stats": new_stats(degenerate_boxes_dropped=int((~keep).sum())),
        }
