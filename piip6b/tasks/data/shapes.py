"""`piip6b make-shapes`: a small synthetic data set a tiny model learns in minutes on a CPU.

Coloured circles, squares and triangles (each class its own hue, jittered) on textured, noisy,
low-saturation backgrounds, with grey unannotated "clutter" blobs. It is written in the real
layouts so the demo runs the real loaders:

  OUT/coco/{train2017,val2017}/*.jpg, OUT/coco/annotations/instances_{train,val}2017.json (polygons)
  OUT/ade/images/{training,validation}/*.jpg, OUT/ade/annotations/{training,validation}/*.png
  OUT/ade/classes.json, OUT/shapes.json (manifest, written last: its presence means complete)

ADE20K convention in the PNGs: 0 = unlabelled (the clutter; ignored after reduce_zero_label),
1 = background, 2.. = the shapes. So segmentation has 4 classes (background + 3 shapes) after
reduction, detection 3. Each shape's pixels are the pycocotools rasterisation of its own polygon,
so the COCO masks, the painted pixels and the PNG labels agree exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPE_CLASSES = ("circle", "square", "triangle")
SHAPE_COLOURS = {"circle": (215, 45, 45), "square": (45, 190, 70), "triangle": (55, 85, 225)}
SEGMENTATION_CLASSES = ("background",) + SHAPE_CLASSES  # after reduce_zero_label
MANIFEST = "shapes.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShapesSpec:
    num_train: int = 300
    num_val: int = 50
    min_size: int = 160  # image sides drawn from [min_size, max_size]
    max_size: int = 256
    max_objects: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"shapes data: need 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.num_train < 1 or self.num_val < 1 or self.max_objects < 1:
            raise ValueError("shapes data: num_train, num_val and max_objects must be >= 1")


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    grey = rng.uniform(70, 180)
    base = grey + rng.uniform(-20, 20, size=3)
    coarse = rng.normal(0, 22, size=(height // 24 + 2, width // 24 + 2, 3)).astype(np.float32)
    # Low-frequency blotches: bilinear upsampling of a coarse noise grid, one channel at a time.
    blotches = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.BILINEAR)) for c in range(3)], axis=-1
    )
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    stripes = rng.uniform(0, 14) * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    grain = rng.normal(0, 7, size=(height, width, 3))
    return base + blotches + stripes[..., None] + grain


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    corners = {"circle": 32, "square": 4, "triangle": 3}[kind]
    points = []
    for k in range(corners):
        theta = angle + 2 * math.pi * k / corners
        points += [round(cx + radius * math.cos(theta), 2), round(cy + radius * math.sin(theta), 2)]
    return points


def _rasterize(polygon: list[float], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))).astype(bool)


def _draw_image(rng: np.random.Generator, spec: ShapesSpec):
    height, width = (int(rng.integers(spec.min_size, spec.max_size + 1)) for _ in range(2))
    pixels = _textured_background(rng, height, width)
    label = np.ones((height, width), dtype=np.uint8)  # 1 = background

    for _ in range(int(rng.integers(0, 3))):  # clutter: grey ellipses nobody annotates
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(5, 18, size=2)
        yy, xx = np.ogrid[0:height, 0:width]
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        pixels[blob] = rng.uniform(90, 170) + rng.normal(0, 6, size=(int(blob.sum()), 1))
        label[blob] = 0

    objects, taken = [], []
    count = 0 if rng.random() < 0.03 else int(rng.integers(1, spec.max_objects + 1))
    for _ in range(count * 20):  # rejection sampling for non-overlapping shapes
        if len(objects) == count:
            break
        radius = rng.uniform(0.07, 0.16) * min(height, width)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        if any(math.hypot(cx - ox, cy - oy) < radius + oradius + 3 for ox, oy, oradius in taken):
            continue
        kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        polygon = _polygon(kind, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        mask = _rasterize(polygon, height, width)
        if not mask.any():
            continue
        colour = np.array(SHAPE_COLOURS[kind], dtype=np.float32) + rng.uniform(-25, 25, size=3)
        shade = rng.normal(0, 6, size=(int(mask.sum()), 3))
        pixels[mask] = colour + shade
        label[mask] = 2 + SHAPE_CLASSES.index(kind)
        taken.append((cx, cy, radius))
        objects.append((kind, polygon, mask))
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    return image, label, objects


def _write_split(rng, spec: ShapesSpec, count: int, out: Path, coco_split: str, ade_split: str, start_id: int) -> None:
    coco_dir, ade_images, ade_labels = out / "coco" / coco_split, out / "ade/images" / ade_split, out / "ade/annotations" / ade_split
    for folder in (coco_dir, ade_images, ade_labels):
        folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = start_id + i
        image, label, objects = _draw_image(rng, spec)
        name = f"shapes_{image_id:06d}"
        Image.fromarray(image).save(coco_dir / f"{name}.jpg", quality=95)
        shutil.copyfile(coco_dir / f"{name}.jpg", ade_images / f"{name}.jpg")
        Image.fromarray(label, mode="L").save(ade_labels / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": image.shape[0], "width": image.shape[1]})
        for kind, polygon, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1 + SHAPE_CLASSES.index(kind),
                    "segmentation": [polygon],
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1 + i, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    instances = {
        "info": {"description": "piip6b synthetic shapes", "version": str(FORMAT_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    annotation_dir = out / "coco/annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    (annotation_dir / f"instances_{coco_split}.json").write_text(json.dumps(instances))


def is_complete(out: str | Path, spec: ShapesSpec | None = None) -> bool:
    """True when `out` holds a finished shapes data set (made with `spec`, when given)."""
    manifest = Path(out) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        written = json.loads(manifest.read_text())
    except ValueError:
        return False
    return written.get("version") == FORMAT_VERSION and (spec is None or written.get("spec") == asdict(spec))


def write_shapes_dataset(out: str | Path, spec: ShapesSpec = ShapesSpec(), overwrite: bool = False) -> Path:
    """Write the data set to `out` (built in a sibling temporary folder, then renamed into place,
    so an interrupted run never leaves a half-written data set that looks complete)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    _write_split(rng, spec, spec.num_train, staging, "train2017", "training", start_id=1)
    _write_split(rng, spec, spec.num_val, staging, "val2017", "validation", start_id=1 + spec.num_train)
    (staging / "ade/classes.json").write_text(json.dumps({"classes": list(SEGMENTATION_CLASSES)}))
    (staging / MANIFEST).write_text(json.dumps({"version": FORMAT_VERSION, "spec": asdict(spec)}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def ensure_shapes_dataset(out: str | Path, spec: ShapesSpec = ShapesSpec()) -> Path:
    """The demo's entry: reuse `out` when it already holds this data set, else write it."""
    if is_complete(out, spec):
        return Path(out)
    return write_shapes_dataset(out, spec, overwrite=Path(out).exists() and is_complete(out))
