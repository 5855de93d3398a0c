"""mIoU/mAcc/aAcc from a confusion matrix; whole-image and sliding-window inference."""

from __future__ import annotations

import json

import pytest
import torch

from piip6b.tasks.data import PadCollate
from piip6b.tasks.evaluation import (
    SegmentationMetric,
    evaluate_segmentation,
    logits_to_original,
    metrics_from_confusion,
    slide_inference,
    sliding_windows,
    whole_inference,
)


def test_metrics_match_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    # class 3 never occurs: not applicable (None), left out of the means
    metric = SegmentationMetric(num_classes=4, class_names=["wall", "sky", "road", "boat"])
    metric.update(pred, target)
    assert metric.confusion[:3, :3].tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    result = metric.compute()
    # IoU: 1/(2+2-1), 2/(2+3-2), 0/(1+0-0); Acc: 1/2, 2/2, 0/1; aAcc: 3/5 labelled pixels
    iou, acc = result.per_class["IoU"], result.per_class["Acc"]
    assert list(iou) == ["wall", "sky", "road", "boat"]
    assert iou["wall"] == pytest.approx(100 / 3) and iou["sky"] == pytest.approx(200 / 3)
    assert iou["road"] == 0.0 and iou["boat"] is None
    assert acc == pytest.approx({"wall": 50.0, "sky": 100.0, "road": 0.0, "boat": None})
    # no per-class keys; one image scored
    assert result.metrics == pytest.approx({"num_images": 1, "mIoU": 100 / 3, "mAcc": 50.0, "aAcc": 60.0})


def test_classes_without_names_are_named_by_index_and_the_table_says_n_a():
    result = metrics_from_confusion(torch.tensor([[2, 0, 0], [0, 0, 0], [1, 0, 1]]))
    assert list(result.per_class["IoU"]) == ["0", "1", "2"]
    table = result.class_table().splitlines()
    assert table[0].split() == ["class", "IoU", "Acc"]
    assert table[2].split() == ["1", "n/a", "n/a"]  # never labelled nor predicted
    assert table[3].split() == ["2", "50.00", "50.00"]
    markdown = result.class_table(markdown=True).splitlines()
    assert markdown[:2] == ["| class | IoU | Acc |", "| --- | ---: | ---: |"]
    assert markdown[3] == "| 1 | n/a | n/a |"
    assert json.loads(json.dumps(result.to_json()))["per_class"]["IoU"]["1"] is None  # null in JSON


def test_metric_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="reduce_zero_label"):
        SegmentationMetric(num_classes=2).update(torch.tensor([0, 1]), torch.tensor([0, 2]))


def test_window_grid_follows_mmseg():
    assert sliding_windows(512, 683, (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert sliding_windows(300, 200, (512, 512), (341, 341)) == [(0, 300, 0, 200)]
    for h, w in [(1024, 1366), (700, 513), (512, 512)]:
        cover = torch.zeros(h, w)
        for y1, y2, x1, x2 in sliding_windows(h, w, (512, 512), (341, 341)):
            assert y2 - y1 == 512 and x2 - x1 == 512
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1


class PointwiseSegmentor(torch.nn.Module):
    """Translation-equivariant (a 1x1 conv), so every window sees the same per-pixel logits."""

    def __init__(self, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def test_sliding_window_equals_whole_image_for_an_equivariant_model():
    model = PointwiseSegmentor(5)
    images = torch.randn(2, 3, 96, 160)
    sizes = [(96, 150), (40, 64)]  # one larger than the crop in both directions, one smaller
    with torch.no_grad():
        whole = whole_inference(model, images, sizes)
        model.calls = 0
        slide = slide_inference(model, images, sizes, 5, crop=(64, 64), stride=(43, 43))
    assert model.calls == len(sliding_windows(96, 150, (64, 64), (43, 43))) + 1  # one window per forward
    for w, s, (h, wd) in zip(whole, slide, sizes):
        assert s.shape == (5, h, wd)
        torch.testing.assert_close(s, w, rtol=1e-5, atol=1e-5)


def test_sliding_window_averages_overlaps_for_a_position_dependent_model():
    def left_edge_marker(x):  # logit 1 in each window's first column, else 0
        out = torch.zeros(x.shape[0], 1, *x.shape[2:])
        out[..., 0] = 1.0
        return out

    (logits,) = slide_inference(left_edge_marker, torch.zeros(1, 3, 8, 10), [(8, 10)], 1, crop=(8, 6), stride=(8, 4))
    # windows x in [0,6) and [4,10): column 0 -> 1, column 4 -> (0 + 1) / 2, others 0
    assert logits[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]


class GlobalContextSegmentor:
    """Every pixel's logits depend on the whole input (its mean), as attention or pooling make
    them; records the input shape of every forward."""

    def __init__(self):
        self.shapes = []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.cat([x[:, :2], x[:, :2] - x.mean(dim=(1, 2, 3), keepdim=True)], dim=1)


def test_window_smaller_than_the_crop_runs_at_its_own_size():
    # An elongated image: smaller than the crop in height, three windows wide.
    image = torch.randn(1, 3, 40, 160)
    model = GlobalContextSegmentor()
    (slide,) = slide_inference(model, image, [(40, 160)], 4, crop=(64, 64), stride=(48, 48))
    assert model.shapes == [(1, 3, 40, 64)] * 3  # not zero-padded to 64 x 64
    expected = torch.zeros(4, 40, 160)
    count = torch.zeros(1, 40, 160)
    for y1, y2, x1, x2 in sliding_windows(40, 160, (64, 64), (48, 48)):
        expected[:, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2].contiguous())[0]
        count[:, y1:y2, x1:x2] += 1
    torch.testing.assert_close(slide, expected / count, rtol=0, atol=0)


def test_padding_reaches_only_the_backbone_multiple():
    model = GlobalContextSegmentor()
    images = torch.randn(1, 3, 128, 128)
    (whole,) = whole_inference(model, images, [(40, 70)], size_divisor=32)
    (slide,) = slide_inference(model, images, [(40, 70)], 4, crop=(64, 64), stride=(48, 48), size_divisor=32)
    assert model.shapes == [(1, 3, 64, 96), (1, 3, 64, 64), (1, 3, 64, 64)]
    assert whole.shape == (4, 40, 70) and slide.shape == (4, 40, 70)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_prediction_does_not_depend_on_its_batch_mates(mode):
    torch.manual_seed(0)
    small, large = torch.randn(3, 40, 56), torch.randn(3, 96, 150)
    model = GlobalContextSegmentor()

    def infer(images, sizes):
        if mode == "whole":
            return whole_inference(model, images, sizes, size_divisor=32)
        return slide_inference(model, images, sizes, 4, crop=(64, 64), stride=(43, 43), size_divisor=32)

    # Alone, the small image is padded to 64 x 64; next to the large one, the batch is 96 x 160.
    alone = infer(torch.nn.functional.pad(small, (0, 8, 0, 24))[None], [(40, 56)])[0]
    together = infer(torch.stack([torch.nn.functional.pad(small, (0, 104, 0, 56)), torch.nn.functional.pad(large, (0, 10))]),
                     [(40, 56), (96, 150)])[0]
    assert torch.equal(alone, together)


def test_logits_are_resized_before_the_argmax():
    logits = torch.zeros(2, 2, 2)
    logits[1, :, 1] = 1.0  # class 1 in the right column
    pred = logits_to_original(logits, (4, 4))
    assert pred.shape == (4, 4) and pred[:, 3].eq(1).all() and pred[:, 0].eq(0).all()


def _class_coded_sample(label: torch.Tensor, image_id: int, is_padding: bool = False):
    """An image whose first channel spells its label, so an oracle can segment it exactly."""
    image = torch.zeros(3, *label.shape, dtype=torch.uint8)
    image[0] = label.clamp(max=3).to(torch.uint8) * 60
    return {
        "image": image, "label": label, "orig_label": label, "image_id": image_id, "file_name": f"{image_id}.png",
        "orig_size": tuple(label.shape), "image_size": tuple(label.shape), "is_padding": is_padding,
        "stats": {"skipped_samples": 0, "degenerate_boxes_dropped": 0},
    }


def oracle(x):  # reads the class back from the first channel: (c * 60 - 127.5) / 127.5
    code = (x[:, :1] * 127.5 + 127.5) / 60
    classes = torch.arange(4, dtype=x.dtype).view(1, 4, 1, 1)
    return -(code - classes) ** 2


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_segmentation_scores_an_oracle_perfectly_and_skips_padding(mode):
    torch.manual_seed(0)
    labels = [torch.randint(0, 4, (40, 56)), torch.randint(0, 4, (33, 70))]
    labels[1][:5] = 255
    wrong = _class_coded_sample(torch.randint(0, 4, (40, 56)), 0, is_padding=True)
    wrong["orig_label"] = (wrong["label"] + 1) % 4  # would be scored as all wrong if counted
    collate = PadCollate(32)
    loader = [collate([_class_coded_sample(labels[0], 0), _class_coded_sample(labels[1], 1)]), collate([wrong])]
    result = evaluate_segmentation(oracle, loader, 4, mode=mode, crop=(32, 32), stride=(21, 21))
    assert result.metrics["mIoU"] == pytest.approx(100.0) and result.metrics["aAcc"] == pytest.approx(100.0)
