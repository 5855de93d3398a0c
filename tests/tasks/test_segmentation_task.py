"""SegmentationTask glue on the synthetic shapes data: mIoU evaluation (slide and whole), drawings."""

from __future__ import annotations

import json

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.tasks.data import DataConfig, SegmentationAugConfig, ShapesSpec, build_dataloader, write_shapes_dataset
from piip6b.tasks.segmentation import SegmentationConfig, SegmentationTask


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    return write_shapes_dataset(out, ShapesSpec(num_train=2, num_val=3, min_size=96, max_size=128))


def make_task(shapes, val_batch_size: int = 2, **overrides) -> SegmentationTask:
    data = DataConfig(root=str(shapes / "ade"), num_workers=0, val_batch_size=val_batch_size,
                      segmentation=SegmentationAugConfig(crop_size=(64, 64), test_scale=(160, 96)))
    cfg = SegmentationConfig(**{**dict(num_classes=4, channels=32, aux_channels=32, norm_groups=8,
                                       crop_size=(64, 64), stride=(48, 48)), **overrides})
    return SegmentationTask(cfg, data)


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_evaluate_and_visualize(shapes, mode):
    task = make_task(shapes, test_mode=mode)
    torch.manual_seed(0)
    model = task.build_model(create_backbone("piip_h6b_tiny")).eval()
    loader = build_dataloader(task.build_dataset("val"), task.data, task.eval_collate, train=False)
    results = task.evaluate(model, loader)
    metrics = results.metrics
    assert 0.0 <= metrics["mIoU"] <= 100.0 and 0.0 <= metrics["aAcc"] <= 100.0, metrics
    assert list(results.per_class["IoU"]) == task.class_names  # the shapes data set's classes.json
    batch = next(iter(loader))
    drawn = task.visualize(model, batch)
    assert [tag for tag, _ in drawn] == ["val/segmentation_0", "val/segmentation_1"]
    for (_, image), (h, w) in zip(drawn, batch["image_sizes"]):
        assert image.dtype == torch.uint8 and image.shape == (3, h, 3 * w + 2 * 4)  # image | prediction | truth


def test_class_count_mismatch_is_reported(shapes):
    with pytest.raises(ValueError, match="names 4 classes but segmentation.num_classes is 150"):
        make_task(shapes, num_classes=150).build_dataset("val")


def test_ade20k_without_classes_json_is_named_by_the_ade20k_class_list(shapes, tmp_path):
    """ADEChallengeData2016 ships no classes.json: a 150-class set without one gets ADE20K's names
    for its per-class tables; another class count stays unnamed (tables then show indices)."""
    import shutil

    from piip6b.tasks.data.ade import ADE20K_CLASSES

    bare = tmp_path / "shapes"
    shutil.copytree(shapes / "ade", bare / "ade")
    (bare / "ade" / "classes.json").unlink()
    task = make_task(bare, num_classes=150)
    task.build_dataset("val")
    assert task.class_names == list(ADE20K_CLASSES) and task.class_names[:3] == ["wall", "building", "sky"]
    task = make_task(bare)
    task.build_dataset("val")
    assert task.class_names is None


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_prediction_is_the_same_at_val_batch_size_1_and_2(shapes, mode):
    """A model with global context (the PIIP backbone's attention) predicts each image exactly as
    it would alone: neither a batch-mate's size nor the crop size pads it (issue 14, item 19)."""
    from piip6b.tasks.evaluation import slide_inference, whole_inference

    torch.manual_seed(0)
    model = make_task(shapes).build_model(create_backbone("piip_h6b_tiny")).eval()
    segment = lambda images: model({"images": images})  # noqa: E731
    logits, metrics = {}, {}
    for batch_size in (1, 2):
        task = make_task(shapes, val_batch_size=batch_size, test_mode=mode)
        loader = build_dataloader(task.build_dataset("val"), task.data, task.eval_collate, train=False)
        logits[batch_size] = {}
        with torch.no_grad():
            for batch in loader:
                if mode == "whole":
                    out = whole_inference(segment, batch["images"], batch["image_sizes"], task.data.size_divisor)
                else:
                    out = slide_inference(segment, batch["images"], batch["image_sizes"], 4, task.cfg.crop_size,
                                          task.cfg.stride, task.data.size_divisor)
                logits[batch_size].update(zip(batch["image_ids"], out))
        metrics[batch_size] = task.evaluate(model, loader).to_json()
    assert sorted(logits[1]) == sorted(logits[2]) == [0, 1, 2]
    for image_id, logit in logits[1].items():
        assert torch.equal(logit, logits[2][image_id]), image_id
    assert json.dumps(metrics[1], sort_keys=True) == json.dumps(metrics[2], sort_keys=True)
    assert metrics[1]["num_images"] == 3
