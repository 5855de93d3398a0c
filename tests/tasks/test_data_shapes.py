"""The synthetic shapes data set: written in both layouts, readable by both real loaders, consistent."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from piip6b.cli import main
from piip6b.tasks.data import (
    AdeSegmentationDataset,
    CocoInstanceDataset,
    DataConfig,
    DetectionAugConfig,
    SegmentationAugConfig,
    ShapesSpec,
    build_collate,
    build_dataloader,
    build_dataset,
    ensure_shapes_dataset,
    write_shapes_dataset,
)
from piip6b.tasks.data.shapes import SEGMENTATION_CLASSES, SHAPE_CLASSES, is_complete

SPEC = ShapesSpec(num_train=6, num_val=3, min_size=64, max_size=96, seed=1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", SPEC)


def test_layouts_and_manifest(shapes):
    assert is_complete(shapes, SPEC) and not is_complete(shapes, ShapesSpec())
    instances = json.loads((shapes / "coco/annotations/instances_train2017.json").read_text())
    assert len(instances["images"]) == 6 and [c["name"] for c in instances["categories"]] == list(SHAPE_CLASSES)
    assert all(isinstance(a["segmentation"], list) for a in instances["annotations"])
    assert len(list((shapes / "ade/annotations/validation").glob("*.png"))) == 3
    assert json.loads((shapes / "ade/classes.json").read_text())["classes"] == list(SEGMENTATION_CLASSES)


def test_coco_masks_agree_with_ade_labels(shapes):
    coco = CocoInstanceDataset(shapes / "coco/val2017", shapes / "coco/annotations/instances_val2017.json", train=False)
    ade = AdeSegmentationDataset(shapes / "ade/images/validation", shapes / "ade/annotations/validation",
                                 num_classes=len(SEGMENTATION_CLASSES), train=False)
    assert ade.class_names == list(SEGMENTATION_CLASSES)
    for i in range(len(coco)):
        det, seg = coco[i], ade[i]
        assert det["file_name"].rsplit("/", 1)[1] == seg["file_name"].rsplit("/", 1)[1]
        for label in range(1, len(SHAPE_CLASSES) + 1):
            # detection label k (1..3) is segmentation class k after reduce_zero_label (0 = background)
            from_coco = det["target"]["masks"][det["target"]["labels"] == label].any(dim=0)
            assert torch.equal(from_coco, seg["label"] == label)


def test_loads_through_both_loaders_with_workers(shapes):
    cfg = DataConfig(
        root=str(shapes / "coco"),
        batch_size=2,
        num_workers=2,
        detection=DetectionAugConfig(train_short_sides=(64, 80), train_max_size=160, detr_crop_short_sides=(56,),
                                     detr_crop_range=(48, 64), train_crop_size=96, test_scale=(160, 80)),
        segmentation=SegmentationAugConfig(scale=(256, 64), crop_size=(64, 64), test_scale=(256, 64)),
    )
    for task, root in (("detection", shapes / "coco"), ("segmentation", shapes / "ade")):
        cfg.root = str(root)
        for split in ("train", "val"):
            ds = build_dataset(cfg, task, split, num_classes=len(SEGMENTATION_CLASSES))
            loader = build_dataloader(ds, cfg, build_collate(cfg, task, split), train=split == "train", rank=0, world_size=1)
            batch = next(itertools.islice(iter(loader), 1, None))  # second batch: exercises the workers
            images = batch["images"]
            assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0 and -1.0 <= images.min() <= images.max() <= 1.0
            if task == "detection":
                assert all(t["masks"].shape[-2:] == images.shape[-2:] for t in batch["targets"])
                assert all(t["labels"].min() >= 1 for t in batch["targets"] if len(t["labels"]))
            else:
                assert batch["labels"].shape == (images.shape[0], *images.shape[2:])
                valid = batch["labels"][batch["labels"] != 255]
                assert valid.max() < len(SEGMENTATION_CLASSES)


def _make_shapes(out, *extra: str) -> int:
    return main(["make-shapes", str(out), "--num-train", "2", "--num-val", "1", "--min-size", "64",
                 "--max-size", "64", *extra])


def test_make_shapes_command_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _make_shapes(out) == 0
    assert "coco" in capsys.readouterr().out
    assert _make_shapes(out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _make_shapes(out, "--overwrite") == 0
    assert main(["make-shapes", str(tmp_path / "other"), "--min-size", "8"]) == 2
    assert "min_size" in capsys.readouterr().err


def test_ensure_reuses_a_complete_dataset_and_never_clobbers_foreign_files(tmp_path):
    spec = ShapesSpec(num_train=2, num_val=1, min_size=64, max_size=64)
    out = ensure_shapes_dataset(tmp_path / "s", spec)
    stamp = (out / "shapes.json").stat().st_mtime_ns
    assert ensure_shapes_dataset(out, spec) == out and (out / "shapes.json").stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_shapes_dataset(foreign, spec)
    assert (foreign / "notes.txt").read_text() == "keep me"
