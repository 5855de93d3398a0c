"""COCO instances loading: polygon/RLE masks, transforms keeping masks and boxes together, bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from piip6b.tasks.data import (
    CocoInstanceDataset,
    DataConfig,
    DataError,
    DetectionAugConfig,
    PadCollate,
    SampleKey,
    build_collate,
    build_dataset,
    single_image_batches,
)
from piip6b.tasks.data.transforms import build_detection_transforms

HEIGHT, WIDTH = 120, 160
# (x0, y0, x1, y1) rectangles, their colours and how each is stored in the JSON.
RECTS = [(10, 20, 50, 70), (70, 10, 140, 40), (90, 60, 150, 110)]
COLOURS = [(230, 30, 30), (30, 220, 40), (40, 60, 230)]
ENCODINGS = ["polygon", "rle", "uncompressed_rle"]

SMALL_AUG = DetectionAugConfig(
    train_short_sides=(96, 128, 160),
    train_max_size=256,
    detr_crop_short_sides=(80, 100),
    detr_crop_range=(60, 100),
    train_crop_size=112,
    test_scale=(256, 128),
)


def _rect_mask(rect) -> np.ndarray:
    x0, y0, x1, y1 = rect
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _segmentation(rect, encoding: str):
    x0, y0, x1, y1 = rect
    if encoding == "polygon":
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    rle = mask_utils.encode(np.asfortranarray(_rect_mask(rect)))
    if encoding == "rle":
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = _rect_mask(rect).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": counts}


def write_coco(root, num_images: int = 3, extra_annotations=(), empty_images=()):
    """A COCO folder whose image i shows the three rectangles; returns (image_dir, json_path)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
        if image_id not in empty_images:
            for (x0, y0, x1, y1), colour in zip(RECTS, COLOURS):
                pixels[y0:y1, x0:x1] = colour
        name = f"img{image_id}.png"
        Image.fromarray(pixels).save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "height": HEIGHT, "width": WIDTH})
        if image_id in empty_images:
            continue
        for k, (rect, encoding) in enumerate(zip(RECTS, ENCODINGS)):
            x0, y0, x1, y1 = rect
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": [1, 3, 7][k],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "iscrowd": 0,
                    "segmentation": _segmentation(rect, encoding),
                }
            )
    annotations += [dict(a, id=1000 + i) for i, a in enumerate(extra_annotations)]
    categories = [{"id": c, "name": f"cat{c}"} for c in (1, 3, 7)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, path


def test_masks_decode_exactly_for_polygon_and_both_rle_forms(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=1)
    ds = CocoInstanceDataset(image_dir, ann, transforms=None, train=True)
    sample = ds[0]
    target = sample["target"]
    assert target["labels"].tolist() == [1, 2, 3]  # category ids 1, 3, 7 -> contiguous 1..K
    assert ds.label_to_category_id == {1: 1, 2: 3, 3: 7}
    for k, rect in enumerate(RECTS):
        assert np.array_equal(target["masks"][k].numpy(), _rect_mask(rect)), ENCODINGS[k]
        assert target["boxes"][k].tolist() == [float(v) for v in rect]


@pytest.mark.parametrize("seed", range(6))
def test_train_augmentation_moves_masks_boxes_and_pixels_together(tmp_path, seed):
    image_dir, ann = write_coco(tmp_path, num_images=1)
    ds = CocoInstanceDataset(image_dir, ann, transforms=build_detection_transforms(SMALL_AUG, train=True), train=True)
    sample = ds[SampleKey(0, seed)]
    image, target = sample["image"], sample["target"]
    h, w = sample["image_size"]
    assert image.shape == (3, h, w) and max(h, w) <= SMALL_AUG.train_crop_size
    assert target["masks"].shape == (len(target["boxes"]), h, w)
    for box, label, mask in zip(target["boxes"], target["labels"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) > 0
        # The mask's extent matches the transformed box to within nearest-neighbour rounding,
        # which (floor-style, as OpenCV's in the reference) can shift an edge by one source pixel:
        # up to ~2.7 px at this config's largest upscale (crop 60 -> short side 160).
        mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(mask_box, box, atol=3.0), (mask_box, box)
        # The pixels under the mask are that rectangle's colour (catches a flip applied to one only).
        colour = image[:, ys, xs].float().median(dim=1).values
        assert torch.allclose(colour, torch.tensor(COLOURS[label - 1], dtype=torch.float32), atol=12), colour


def test_flip_mirrors_box_mask_and_image(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=1)

    def flip(inputs):
        return {k: F.horizontal_flip(v) if isinstance(v, torch.Tensor) and k != "labels" else v for k, v in inputs.items()}

    plain = CocoInstanceDataset(image_dir, ann, train=True)[0]
    flipped = CocoInstanceDataset(image_dir, ann, transforms=flip, train=True)[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["target"]["masks"], plain["target"]["masks"].flip(-1))
    x0, y0, x1, y1 = plain["target"]["boxes"].unbind(1)
    assert torch.equal(flipped["target"]["boxes"], torch.stack([WIDTH - x1, y0, WIDTH - x0, y1], 1))


def test_degenerate_boxes_after_crop_are_dropped_and_counted(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=1)

    def crop_left(inputs):  # keeps x in [0, 60): rectangle 0 survives, 1 and 2 collapse to width 0
        return {k: F.crop(v, 0, 0, HEIGHT, 60) if k != "labels" else v for k, v in inputs.items()}

    sample = CocoInstanceDataset(image_dir, ann, transforms=crop_left, train=True)[0]
    assert sample["target"]["labels"].tolist() == [1]
    assert sample["target"]["masks"].shape == (1, HEIGHT, 60)
    assert sample["stats"]["degenerate_boxes_dropped"] == 2
    batch = PadCollate(32)([sample, sample])
    assert batch["data_stats"]["degenerate_boxes_dropped"] == 4


def test_tiny_and_crowd_annotations_left_out_as_the_reference_does(tmp_path):
    extra = [
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 0.5, 10], "segmentation": [[5, 5, 5.5, 5, 5.5, 15, 5, 15]]},
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1, "segmentation": [[5, 5, 15, 5, 15, 15]]},
    ]
    image_dir, ann = write_coco(tmp_path, num_images=1, extra_annotations=extra)
    ds = CocoInstanceDataset(image_dir, ann, train=True)
    assert ds.init_stats["crowd_or_tiny_annotations"] == 2
    assert len(ds[0]["target"]["boxes"]) == 3


def test_images_without_annotations_skipped_for_training_kept_for_eval(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=3, empty_images={2})
    train = CocoInstanceDataset(image_dir, ann, train=True)
    val = CocoInstanceDataset(image_dir, ann, train=False)
    assert train.image_ids == [1, 3] and train.init_stats["images_without_annotations"] == 1
    assert val.image_ids == [1, 2, 3]
    assert val[1]["target"]["boxes"].shape == (0, 4) and val[1]["target"]["masks"].shape[0] == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "top level is list"),
        ('{"images": [], "categories": []}', "`annotations` is missing"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "lacks one of id"),
    ],
)
def test_json_that_is_not_coco_names_the_file(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        CocoInstanceDataset(tmp_path / "images", path)
    assert str(path) in str(info.value)


def test_missing_annotation_file_names_it_and_suggests_make_shapes(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="make-shapes") as info:
        CocoInstanceDataset(tmp_path / "images", tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"bbox": [1, 2, -3, 4]}, "negative width"),
        ({"bbox": [1, 2, float("nan"), 4]}, "not 4 finite"),
        ({"segmentation": [[1, 2, 3, 4]]}, "even list of >= 6"),
        ({"segmentation": {"size": [5, 5], "counts": "x"}}, "RLE size"),
        ({"category_id": 99}, "category_id 99"),
        ({"image_id": 42}, "image_id 42"),
    ],
)
def test_invalid_annotation_errors_or_is_skipped_and_counted(tmp_path, bad, message):
    base = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}
    image_dir, ann = write_coco(tmp_path, num_images=1, extra_annotations=[dict(base, **bad)])
    with pytest.raises(DataError, match=message) as info:
        CocoInstanceDataset(image_dir, ann)
    assert "annotation id 1000" in str(info.value) and str(ann) in str(info.value)
    ds = CocoInstanceDataset(image_dir, ann, bad_data="skip")
    assert ds.init_stats["invalid_annotations"] == 1 and len(ds[0]["target"]["boxes"]) == 3


def test_undecodable_rle_names_annotation_and_image(tmp_path):
    bad = {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "segmentation": {"size": [HEIGHT, WIDTH], "counts": 7}}
    image_dir, ann = write_coco(tmp_path, num_images=1, extra_annotations=[bad])
    with pytest.raises(DataError, match=r"annotation id 1000 \(image id 1\)"):
        CocoInstanceDataset(image_dir, ann)[0]


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_bad_image_errors_name_the_file_or_are_skipped_and_counted(tmp_path, damage):
    image_dir, ann = write_coco(tmp_path, num_images=3)
    bad = image_dir / "img2.png"
    if damage == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    else:
        bad.unlink()
    strict = CocoInstanceDataset(image_dir, ann, train=True)
    with pytest.raises(DataError) as info:
        strict[1]
    assert str(bad) in str(info.value)

    lenient = CocoInstanceDataset(image_dir, ann, train=True, bad_data="skip")
    sample = lenient[1]
    assert sample["image_id"] == 3 and sample["stats"]["skipped_samples"] == 1
    batch = PadCollate(32)([lenient[0], sample])
    assert batch["data_stats"]["skipped_samples"] == 1
    # In evaluation the stand-in must not be scored as an extra copy of image 3.
    val_sample = CocoInstanceDataset(image_dir, ann, train=False, bad_data="skip")[1]
    assert val_sample["is_padding"] and val_sample["image_id"] == 3


def test_image_size_disagreeing_with_json_is_an_error(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=1)
    Image.new("RGB", (WIDTH + 1, HEIGHT)).save(image_dir / "img1.png")
    with pytest.raises(DataError, match="img1.png"):
        CocoInstanceDataset(image_dir, ann)[0]


def test_collate_pads_to_multiple_of_32_normalises_and_keeps_true_sizes(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=2)
    cfg = DataConfig(root=str(tmp_path), train_images="images", train_annotations="instances.json",
                     val_images="images", val_annotations="instances.json", detection=SMALL_AUG)
    ds = build_dataset(cfg, "detection", "val")
    samples = [ds[0], ds[1]]
    batch = build_collate(cfg, "detection", "val")(samples)
    h, w = samples[0]["image_size"]
    assert (h, w) == (128, 171)  # keep-ratio resize to short side 128
    assert batch["images"].shape == (2, 3, 128, 192)
    assert batch["image_sizes"] == [(h, w), (h, w)] and batch["orig_sizes"] == [(HEIGHT, WIDTH)] * 2
    expected = (samples[0]["image"].float() - 127.5) / 127.5
    assert torch.allclose(batch["images"][0, :, :h, :w], expected)
    assert batch["images"][0, :, :, w:].abs().sum() == 0
    assert batch["targets"][0]["masks"].shape[-2:] == (128, 192)
    assert not batch["is_padding"].any() and batch["image_ids"] == [1, 2]


def test_single_image_batches_are_what_batch_size_1_gives():
    collate = PadCollate(32)

    def sample(height, width, image_id):
        return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "image_id": image_id,
                "file_name": f"{image_id}.jpg", "orig_size": (2 * height, 2 * width), "image_size": (height, width),
                "stats": {"skipped_samples": 0, "degenerate_boxes_dropped": 0}, "is_padding": image_id == 2}

    samples = [sample(40, 70, 1), sample(96, 150, 2)]
    singles = single_image_batches(collate(samples), 32)
    for one, alone in zip(singles, (collate([s]) for s in samples)):
        assert one["images"].shape == alone["images"].shape and torch.equal(one["images"], alone["images"])
        for key in ("image_sizes", "orig_sizes", "image_ids", "file_names"):
            assert one[key] == alone[key], key
        assert torch.equal(one["is_padding"], alone["is_padding"])


def test_padding_indices_from_inference_sampler_wrap_and_are_marked(tmp_path):
    image_dir, ann = write_coco(tmp_path, num_images=2)
    ds = CocoInstanceDataset(image_dir, ann, train=False)
    extra = ds[len(ds)]
    assert extra["is_padding"] and extra["image_id"] == 1
