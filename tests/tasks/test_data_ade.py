"""ADE20K layout loading: zero-label reduction, augmentation keeping labels on their pixels, bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from piip6b.tasks.data import (AdeSegmentationDataset, DataConfig, DataError, SampleKey, SegmentationAugConfig,
                               build_collate, build_dataset)
from piip6b.tasks.data.transforms import CategoryBalancedCrop, PhotoMetricDistortion, build_segmentation_transforms

HEIGHT, WIDTH = 96, 128
# label value -> colour; 0 is ADE's "other" (becomes ignore)
PALETTE = {0: (128, 128, 128), 1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 70, 220)}
SMALL_SEG = SegmentationAugConfig(scale=(256, 64), ratio_range=(0.5, 2.0), crop_size=(64, 64), test_scale=(256, 64))


def _label_map(seed: int) -> np.ndarray:
    label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    label[:, : WIDTH // 3] = 1
    label[HEIGHT // 2 :, WIDTH // 3 :] = 2
    y, x = rng.integers(0, HEIGHT - 30), rng.integers(WIDTH // 3, WIDTH - 30)
    label[y : y + 30, x : x + 30] = 3
    return label


def write_ade(root, split: str = "training", count: int = 3):
    images, labels = root / "images" / split, root / "annotations" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = _label_map(i)
        pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        for value, colour in PALETTE.items():
            pixels[label == value] = colour
        Image.fromarray(pixels).save(images / f"ADE_{i:04d}.png")
        Image.fromarray(label, mode="L").save(labels / f"ADE_{i:04d}.png")
    return images, labels


def test_zero_label_reduced_to_ignore(tmp_path):
    images, labels = write_ade(tmp_path, count=1)
    sample = AdeSegmentationDataset(images, labels, num_classes=3, train=True)[0]
    expected = _label_map(0).astype(np.int64) - 1
    expected[expected == -1] = 255
    assert torch.equal(sample["label"], torch.from_numpy(expected))
    raw = AdeSegmentationDataset(images, labels, num_classes=4, train=True, reduce_zero_label=False)[0]
    assert torch.equal(raw["label"], torch.from_numpy(_label_map(0)).long())


@pytest.mark.parametrize("seed", range(5))
def test_train_augmentation_keeps_labels_on_their_pixels(tmp_path, seed):
    images, labels = write_ade(tmp_path, count=1)
    cfg = SegmentationAugConfig(**{**SMALL_SEG.__dict__, "photometric": False})
    ds = AdeSegmentationDataset(images, labels, num_classes=3, transforms=build_segmentation_transforms(cfg, train=True))
    sample = ds[SampleKey(0, seed)]
    image, label = sample["image"], sample["label"]
    assert image.shape[1:] == label.shape and max(label.shape) <= 64
    for value, colour in PALETTE.items():
        reduced = 255 if value == 0 else value - 1
        inside = label == reduced
        if inside.sum() < 20:
            continue
        median = image[:, inside].float().median(dim=1).values
        assert torch.allclose(median, torch.tensor(colour, dtype=torch.float32), atol=10), (value, median)


def test_augmentation_is_a_function_of_the_sample_key_alone(tmp_path):
    """Which process loads a sample, and what it drew before, does not change its augmentation;
    loading it does not move the caller's random stream (issue 14, item 20)."""
    images, labels = write_ade(tmp_path, count=2)
    ds = AdeSegmentationDataset(images, labels, num_classes=3, transforms=build_segmentation_transforms(SMALL_SEG, train=True))
    torch.manual_seed(0)
    first = ds[SampleKey(1, 1234)]
    state = torch.random.get_rng_state()
    torch.rand(100)  # a worker that has drawn other things since
    again = ds[SampleKey(1, 1234)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    torch.random.set_rng_state(state)
    ds[SampleKey(0, 99)]
    assert torch.equal(torch.random.get_rng_state(), state)
    others = [ds[SampleKey(1, seed)]["image"] for seed in range(6)]
    assert any(o.shape != first["image"].shape or not torch.equal(o, first["image"]) for o in others)


def test_photometric_distortion_changes_pixels_only_and_stays_uint8():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    label = tv_tensors.Mask(torch.randint(0, 4, (1, 20, 30), dtype=torch.uint8))
    changed = 0
    for _ in range(10):
        out = PhotoMetricDistortion()({"image": image, "label": label})
        assert out["image"].dtype == torch.uint8 and torch.equal(out["label"], label)
        changed += int(not torch.equal(out["image"], image))
    assert changed >= 5


def test_category_balanced_crop_avoids_single_dominant_class():
    label = torch.zeros(1, 100, 100, dtype=torch.uint8)
    label[:, :, 80:] = 1  # class 1 only in the right fifth: most 30x30 crops hold class 0 only
    crop = CategoryBalancedCrop((30, 30), cat_max_ratio=0.75, ignore_index=255, tries=200)
    torch.manual_seed(0)
    for _ in range(20):
        params = crop.make_params([tv_tensors.Image(torch.zeros(3, 100, 100)), tv_tensors.Mask(label)])
        window = label[0, params["top"] : params["top"] + 30, params["left"] : params["left"] + 30]
        counts = torch.bincount(window.flatten().long(), minlength=2)
        assert counts.max() / counts.sum() < 0.75


def test_val_samples_carry_original_labels_and_collate_pads_with_ignore(tmp_path):
    write_ade(tmp_path, split="validation", count=2)
    write_ade(tmp_path, split="training", count=2)
    cfg = DataConfig(root=str(tmp_path), segmentation=SMALL_SEG)
    val = build_dataset(cfg, "segmentation", "val", num_classes=3)
    batch = build_collate(cfg, "segmentation", "val")([val[0], val[1]])
    assert batch["image_sizes"] == [(64, 85)] * 2  # keep-ratio resize to short side 64
    assert batch["images"].shape == (2, 3, 64, 96) and batch["labels"].shape == (2, 64, 96)
    assert (batch["labels"][:, :, 85:] == 255).all()
    assert [tuple(x.shape) for x in batch["orig_labels"]] == [(HEIGHT, WIDTH)] * 2
    train = build_dataset(cfg, "segmentation", "train", num_classes=3)
    batch = build_collate(cfg, "segmentation", "train")([train[0], train[1]])
    assert batch["images"].shape == (2, 3, 64, 64) and "orig_labels" not in batch  # padded to the crop


def test_missing_label_errors_or_is_skipped(tmp_path):
    images, labels = write_ade(tmp_path, count=3)
    (labels / "ADE_0001.png").unlink()
    with pytest.raises(DataError, match="ADE_0001"):
        AdeSegmentationDataset(images, labels, num_classes=3)
    ds = AdeSegmentationDataset(images, labels, num_classes=3, bad_data="skip")
    assert len(ds) == 2 and ds.init_stats["images_without_label"] == 1


def test_images_without_label_are_logged_once_and_counted(tmp_path, caplog):
    images, labels = write_ade(tmp_path, split="validation", count=4)
    (labels / "ADE_0001.png").unlink()
    (labels / "ADE_0003.png").unlink()
    with caplog.at_level("WARNING", logger="piip6b.tasks.data.ade"):
        ds = AdeSegmentationDataset(images, labels, num_classes=3, train=False, bad_data="skip")
    assert len(ds) == 2 and ds.init_stats["images_without_label"] == 2
    (record,) = caplog.records  # one line for the data set, not one per image
    assert "left out 2 of 4 images" in record.getMessage()
    assert "ADE_0001.png, ADE_0003.png" in record.getMessage() and "data.bad_data=skip" in record.getMessage()


def _write_label(path, label: np.ndarray, palette: bool) -> None:
    if palette:
        image = Image.fromarray(label, mode="P")
        image.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
        image.save(path)
    else:
        Image.fromarray(label, mode="L").save(path)


@pytest.mark.parametrize("palette", [False, True], ids=["L", "P"])
def test_label_value_outside_the_classes_names_the_file(tmp_path, palette):
    # ADE20K's 150 classes are file values 1..150; a stray 151 becomes class 150 after the
    # zero-label reduction: out of range, which used to surface only inside cross_entropy.
    images, labels = write_ade(tmp_path, count=3)
    bad = _label_map(1)
    bad[:4, :4] = 4  # class 3 of a 3-class set
    _write_label(labels / "ADE_0001.png", bad, palette)
    strict = AdeSegmentationDataset(images, labels, num_classes=3)
    strict[0]
    with pytest.raises(DataError, match=r"ADE_0001.png has class values 3 \(file values 4 before the zero-label "
                                         r"reduction\) outside the 3 classes 0..2"):
        strict[1]
    lenient = AdeSegmentationDataset(images, labels, num_classes=3, bad_data="skip", train=False)
    sample = lenient[1]  # the bad-data policy applies: the next sample stands in, marked
    assert sample["file_name"].endswith("ADE_0002.png") and sample["is_padding"]
    assert sample["stats"]["skipped_samples"] == 1
    # Values equal to ignore_index stay ignored; without the reduction, file values are classes.
    ignored = _label_map(1)
    ignored[:4, :4] = 255
    _write_label(labels / "ADE_0001.png", ignored, palette)
    AdeSegmentationDataset(images, labels, num_classes=3)[1]
    raw = AdeSegmentationDataset(images, labels, num_classes=3, reduce_zero_label=False)
    with pytest.raises(DataError, match=r"class values 3 outside the 3 classes"):
        raw[0]  # file value 3 is out of range when values are classes as they are


def test_corrupt_image_and_rgb_label_name_the_file(tmp_path):
    images, labels = write_ade(tmp_path, count=2)
    (images / "ADE_0000.png").write_bytes(b"garbage")
    Image.new("RGB", (WIDTH, HEIGHT)).save(labels / "ADE_0001.png")
    ds = AdeSegmentationDataset(images, labels, num_classes=3)
    with pytest.raises(DataError, match="ADE_0000.png"):
        ds[0]
    with pytest.raises(DataError, match="ADE_0001.png.*mode RGB"):
        ds[1]
    lenient = AdeSegmentationDataset(images, labels, num_classes=3, bad_data="skip")
    with pytest.raises(DataError, match="consecutive samples"):  # every sample is bad: say so
        lenient[0]


def test_unset_root_and_missing_folders_explain_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.root is not set"):
        build_dataset(DataConfig(), "segmentation", "train", num_classes=3)
    with pytest.raises(DataError, match="make-shapes"):
        build_dataset(DataConfig(root=str(tmp_path)), "segmentation", "train", num_classes=3)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="bad_data"):
        DataConfig(bad_data="ignore")
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationAugConfig(crop_size=(1, 2, 3))
    assert DataConfig(segmentation={"crop_size": [64, 64]}).segmentation.crop_size == (64, 64)
