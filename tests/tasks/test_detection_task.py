"""DetectionTask glue on the synthetic shapes data: dataset checks, COCO evaluation, drawings."""

from __future__ import annotations

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.tasks.data import DataConfig, DetectionAugConfig, ShapesSpec, build_dataloader, write_shapes_dataset
from piip6b.tasks.detection import DetectionConfig, DetectionTask

NUM_VAL = 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    return write_shapes_dataset(out, ShapesSpec(num_train=4, num_val=NUM_VAL, min_size=96, max_size=128))


def make_task(shapes, **overrides) -> DetectionTask:
    data = DataConfig(root=str(shapes / "coco"), num_workers=0, val_batch_size=2,
                      detection=DetectionAugConfig(test_scale=(160, 96)))
    cfg = DetectionConfig(**{**dict(num_classes=3, fpn_channels=32, box_head_dim=64, mask_channels=32,
                                    score_threshold=0.0, rpn_post_nms_top_n_test=50), **overrides})
    return DetectionTask(cfg, data)


def test_evaluate_and_visualize(shapes):
    task = make_task(shapes)
    torch.manual_seed(0)
    model = task.build_model(create_backbone("piip_h6b_tiny")).eval()
    loader = build_dataloader(task.build_dataset("val"), task.data, task.eval_collate, train=False)
    results = task.evaluate(model, loader)
    metrics = results.metrics
    assert metrics["num_images"] == NUM_VAL and metrics["missing_images"] == 0
    for key in ("bbox/AP", "segm/AP", "bbox/AP50"):
        assert 0.0 <= metrics[key] <= 100.0
    batch = next(iter(loader))
    drawn = task.visualize(model, batch)
    assert [tag for tag, _ in drawn] == ["val/detections_0", "val/detections_1"]
    for (tag, image), (h, w) in zip(drawn, batch["image_sizes"]):
        assert image.dtype == torch.uint8 and image.shape == (3, h, w)
    assert task.class_names == ["circle", "square", "triangle"]
    assert list(results.per_class["segm/AP"]) == ["circle", "square", "triangle"]


def test_num_classes_mismatch_is_reported(shapes):
    with pytest.raises(ValueError, match="3 categories but detection.num_classes is 80"):
        make_task(shapes, num_classes=80).build_dataset("val")
