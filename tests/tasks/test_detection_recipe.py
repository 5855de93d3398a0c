"""The Mask R-CNN head follows the reference's recipe (mmdetection 2.25 mask_rcnn_r50_fpn, the base of
every PIIP Mask R-CNN config) where torchvision's defaults differ. Each expected value below is
computed from mmdet's formula, written out in the test, not from this package's code."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList

from piip6b.tasks.detection import DetectionConfig
from piip6b.tasks.detection_ops import mask_targets, paste_masks
from tests.tasks.test_detection import make_batch, make_model

LEVELS = ("0", "1", "2", "3")


def level_maps(fill, size=(256, 256), channels=2, batch=1):
    """P2..P5 maps for `batch` inputs of `size`: fill(level, h, w) -> [h, w] values in every channel."""
    maps = OrderedDict()
    for level, name in enumerate(LEVELS):
        h, w = size[0] >> (level + 2), size[1] >> (level + 2)
        maps[name] = fill(level, h, w)[None, None].expand(batch, channels, h, w).contiguous()
    return maps


def test_box_roi_align_is_aligned():
    """mmcv's RoIAlign(aligned=True): a box on a map holding its column index x samples at the bin
    centres shifted by half a cell: x0 / stride - 0.5 + (j + 0.5) * bin_width. aligned=False would give
    0.5 more everywhere."""
    pool = make_model().roi_heads.box_roi_pool
    maps = level_maps(lambda level, h, w: torch.arange(w, dtype=torch.float32).expand(h, w).clone())
    box = torch.tensor([[16.0, 16.0, 72.0, 72.0]])  # scale 56 -> P2 (stride 4); 14 cells, bins of 2
    out = pool(maps, [box], [(256, 256)])
    assert out.shape == (1, 2, 7, 7)
    expected = 16 / 4 - 0.5 + (torch.arange(7) + 0.5) * 2.0
    torch.testing.assert_close(out[0, 0], expected.expand(7, 7))


def test_roi_level_mapping_is_finest_scale_56():
    pool = make_model().roi_heads.mask_roi_pool
    maps = level_maps(lambda level, h, w: torch.full((h, w), float(level)), size=(1024, 1024), batch=2)
    scales = [20.0, 111.0, 112.5, 223.0, 224.5, 447.0, 448.5, 900.0]
    boxes = torch.tensor([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in scales])
    out = pool(maps, [boxes[:4], boxes[4:]], [(1024, 1024)] * 2)
    assert out.shape == (8, 2, 14, 14)
    # mmdet SingleRoIExtractor.map_roi_levels: floor(log2(scale / 56 + 1e-6)) clamped to 0..3.
    expected = [min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), 3) for s in scales]
    assert out[:, 0, 7, 7].tolist() == expected == [0, 0, 1, 1, 2, 2, 3, 3]


def test_anchors_follow_mmdet_strides_and_sizes():
    """mmdet AnchorGenerator (strides 4..64, scale 8, center_offset 0): on a 96 x 160 batch P6 is a
    2 x 3 grid and its anchors sit 64 px apart (torchvision: 96 // 2 = 48 and 160 // 3 = 53), and
    base anchors are not rounded (32 px at ratio 0.5 is 45.25 x 22.63, torchvision 46 x 22)."""
    model = make_model()
    ratios = torch.tensor(model.cfg.anchor_ratios)
    grids = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    features = [torch.zeros(1, 4, *g) for g in grids]
    anchors = model.rpn.anchor_generator(ImageList(torch.zeros(2, 3, 96, 160), [(96, 160), (90, 150)]), features)
    assert len(anchors) == 2 and torch.equal(anchors[0], anchors[1])
    expected = []
    for stride, (h, w) in zip((4, 8, 16, 32, 64), grids):
        h_ratios = ratios.sqrt()
        ws, hs = stride * 8 / h_ratios, stride * 8 * h_ratios
        base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)  # (A, 4), ratios in order
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()  # row-major locations
        expected.append((shifts + base[None]).reshape(-1, 4))
    torch.testing.assert_close(anchors[0], torch.cat(expected), rtol=0, atol=1e-4)
    p6 = expected[-1]
    assert p6[3 + 1].tolist() == pytest.approx([64 - 256, -256, 64 + 256, 256], abs=1e-4)  # 2nd location, ratio 1
    assert anchors[0][0].tolist() == pytest.approx([-22.627417, -11.313708, 22.627417, 11.313708], abs=1e-4)


def test_rpn_trains_only_on_anchors_inside_the_padded_image():
    """mmdet's valid flags: anchors located outside the image's own shape padded to 64 (the
    reference's Pad size_divisor) are ignored, not sampled as negatives from the batch padding."""
    model = make_model()
    grids = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]  # a 256 x 256 batch
    anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, 256, 256), [(100, 60)]),
                                         [torch.zeros(1, 4, *g) for g in grids])
    target = {"boxes": torch.tensor([[10.0, 10.0, 42.0, 42.0]]), "labels": torch.tensor([1])}
    centres = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
    outside = (centres[:, 0] >= 64) | (centres[:, 1] >= 128)  # (100, 60) padded to (128, 64)
    labels, _ = model.rpn.assign_targets_to_anchors(anchors, [dict(target, image_size=(100, 60))])
    assert bool((labels[0][outside] == -1).all())
    assert set(labels[0][~outside].unique().tolist()) == {-1.0, 0.0, 1.0}
    unrestricted, _ = model.rpn.assign_targets_to_anchors(anchors, [target])
    assert torch.equal(unrestricted[0][~outside], labels[0][~outside])
    assert bool((unrestricted[0][outside] == 0).all())


def test_p6_is_mmdet_max_pool_of_p5_on_odd_grids():
    model = make_model()
    width = model.backbone.out_channels
    grids = [(24, 40), (12, 20), (6, 10), (3, 5)]  # a 96 x 160 input: an odd stride-32 grid
    maps = OrderedDict((name, torch.randn(1, width, *g)) for name, g in zip(LEVELS, grids))
    with torch.no_grad():
        out = model.neck(maps)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    # mmdet FPN, num_outs=5 without extra convs: F.max_pool2d(P5, 1, stride=2) -> ceil(3/2) x ceil(5/2)
    torch.testing.assert_close(out["pool"], F.max_pool2d(out["3"], 1, stride=2))
    assert out["pool"].shape[-2:] == (2, 3)


def test_box_coder_uses_reference_target_stds():
    """DeltaXYWHBBoxCoder(means 0, stds (0.1, 0.1, 0.2, 0.2)) for the box head; the RPN's stds are 1."""
    model = make_model()
    proposal = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    gt = torch.tensor([[14.0, 16.0, 70.0, 90.0]])
    px, py, pw, ph = 30.0, 60.0, 40.0, 80.0
    gx, gy, gw, gh = 42.0, 53.0, 56.0, 74.0
    raw = torch.tensor([(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)])
    rcnn = model.roi_heads.box_coder.encode([gt], [proposal])[0][0]
    torch.testing.assert_close(rcnn, raw / torch.tensor([0.1, 0.1, 0.2, 0.2]))
    torch.testing.assert_close(model.rpn.box_coder.encode([gt], [proposal])[0][0], raw)
    decoded = model.roi_heads.box_coder.decode(rcnn[None], [proposal]).reshape(1, 4)
    torch.testing.assert_close(decoded, gt)


def test_rpn_box_loss_is_l1_over_sampled_anchors():
    """mmdet RPNHead: CE (sigmoid) + L1Loss, both averaged over the sampled anchors."""
    model = make_model()  # 64 anchors sampled per image: all four below are taken
    labels = [torch.tensor([1.0, 1.0, 0.0, 0.0])]
    targets = [torch.tensor([[0.05, -0.02, 0.3, 0.0], [1.0, 0.0, 0.0, -0.5], [9.0, 9, 9, 9], [9.0, 9, 9, 9]])]
    deltas = torch.tensor([[0.0, 0.0, 0.25, 0.01], [0.0, 0.0, 0.0, 0.0], [0.0, 0, 0, 0], [0.0, 0, 0, 0]])
    objectness = torch.tensor([[2.0], [0.0], [-1.0], [0.5]])
    cls_loss, box_loss = model.rpn.compute_loss(objectness, deltas, labels, targets)
    l1 = (0.05 + 0.02 + 0.05 + 0.01) + (1.0 + 0.5)
    assert box_loss.item() == pytest.approx(l1 / 4, rel=1e-6)
    assert cls_loss.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(objectness.flatten(), labels[0]).item(), rel=1e-6)


def test_rcnn_box_loss_is_l1_over_sampled_rois():
    """mmdet BBoxHead.loss: softmax CE over the sampled RoIs + L1 on the true class's deltas of the
    positives divided by all sampled RoIs (avg_factor = bbox_targets.size(0))."""
    model = make_model()
    num_classes = model.cfg.num_classes + 1
    labels = [torch.tensor([2, 0]), torch.tensor([5])]
    targets = [torch.tensor([[0.05, 0.1, -0.02, 0.3], [7.0, 7, 7, 7]]), torch.tensor([[1.0, -1.0, 0.0, 0.0]])]
    logits = torch.randn(3, num_classes)
    regression = torch.zeros(3, num_classes * 4)
    regression[0, 2 * 4:3 * 4] = torch.tensor([0.0, 0.1, 0.0, 0.25])
    regression[1] = 100.0  # a negative: no box loss whatever it predicts
    cls_loss, box_loss = model.roi_heads.box_loss(logits, regression, labels, targets)
    l1 = (0.05 + 0.0 + 0.02 + 0.05) + (1.0 + 1.0)
    assert box_loss.item() == pytest.approx(l1 / 3, rel=1e-6)
    assert cls_loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([2, 0, 5])).item(), rel=1e-6)


def test_rpn_assigner_is_mmdet_max_iou():
    """MaxIoUAssigner(pos 0.7, neg 0.3, min_pos_iou 0.3, match_low_quality): a gt's best anchor goes
    to that gt (the later gt wins), and only when that best IoU reaches 0.3."""
    matcher = make_model().rpn.proposal_matcher
    iou = torch.tensor([
        [0.9, 0.6, 0.0, 0.0],   # gt 0: anchor 0 is positive for it by IoU ...
        [0.8, 0.2, 0.0, 0.0],   # gt 1: ... but anchor 0 is gt 1's best, so it is gt 1's
        [0.0, 0.0, 0.1, 0.0],   # gt 2: best IoU 0.1 < 0.3: no positive, anchor 2 stays background
        [0.0, 0.0, 0.0, 0.35],  # gt 3: best IoU 0.35 >= 0.3: anchor 3 becomes positive
    ])
    assert matcher(iou).tolist() == [1, -2, -1, 3]


def test_rcnn_assigner_low_quality_minimum_is_pos_iou():
    matcher = make_model().roi_heads.proposal_matcher
    iou = torch.tensor([
        [0.9, 0.45, 0.0],
        [0.8, 0.0, 0.3],   # best IoU 0.8 at proposal 0 -> proposal 0 is gt 1's
        [0.0, 0.0, 0.45],  # best 0.45 < min_pos_iou 0.5: proposal 2 stays background
    ])
    assert matcher(iou).tolist() == [1, -1, -1]


def test_mask_targets_are_aligned_and_binary():
    """mmdet BitmapMasks.crop_and_resize (roi_align aligned=True, sampling 0) then >= 0.5: a RoI on
    exactly the gt's rectangle gives all ones (unaligned sampling would blur its border to 0.5)."""
    gt = torch.zeros(2, 32, 32, dtype=torch.uint8)
    gt[1, 8:24, 8:24] = 1
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 16.0, 16.0]])
    targets = mask_targets(gt, boxes, torch.tensor([1, 1]), 28)
    assert targets.shape == (2, 28, 28) and targets.dtype == torch.float32
    assert torch.equal(targets[0], torch.ones(28, 28))
    assert set(targets.unique().tolist()) == {0.0, 1.0}
    # The second RoI covers [0, 16) where the mask starts at 8: exactly its second half in each axis.
    expected = torch.zeros(28, 28)
    expected[14:, 14:] = 1
    assert torch.equal(targets[1], expected)
    assert mask_targets(gt, boxes[:0], torch.tensor([], dtype=torch.long), 28).shape == (0, 28, 28)


def test_mask_loss_is_bce_against_aligned_targets():
    model = make_model()
    gt = torch.zeros(1, 32, 32, dtype=torch.uint8)
    gt[0, 8:24, 8:24] = 1
    logits = torch.full((1, model.cfg.num_classes + 1, 28, 28), -20.0)
    logits[0, 3] = 20.0
    loss = model.roi_heads.mask_loss(logits, [torch.tensor([[8.0, 8.0, 24.0, 24.0]])], [torch.tensor([0])],
                                     [torch.tensor([3])], [gt])
    assert loss.item() < 1e-6  # the target is all ones exactly


def _mmdet_paste_full_image(probs, boxes, height, width):
    """FCNMaskHead's pasting written out: pixel centres mapped into each box's [-1, 1] frame."""
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.split(1, dim=1)
    gx = ((xs - x0) / (x1 - x0) * 2 - 1)[:, None, :].expand(-1, height, width)
    gy = ((ys - y0) / (y1 - y0) * 2 - 1)[:, :, None].expand(-1, height, width)
    return F.grid_sample(probs[:, None], torch.stack([gx, gy], dim=3), align_corners=False)[:, 0]


def test_masks_pasted_as_mmdet():
    """FCNMaskHead.get_seg_masks: bilinear sampling at pixel centres, then >= mask_thr_binary. A mask
    of ones covers exactly the pixels whose centres lie in the box (torchvision's paste rounds the
    box to whole pixels first)."""
    model = make_model().eval()
    det = {"boxes": torch.tensor([[5.15, 10.35, 15.1, 20.45]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9]), "masks": torch.ones(1, 28, 28)}
    masks = model._finish(det, (32, 24), (64, 48))["masks"]  # boxes double on the way to the file's size
    assert masks.shape == (1, 64, 48) and masks.dtype == torch.bool
    expected = torch.zeros(64, 48, dtype=torch.bool)
    expected[21:41, 10:30] = True  # pixel centres inside the box
    assert torch.equal(masks[0], expected)

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 28, 28, generator=gen)
    boxes = torch.tensor([[3.2, 4.1, 40.7, 30.3], [-5.0, 10.0, 20.0, 70.0], [30.5, 2.5, 47.9, 12.1],
                          [0.0, 0.0, 48.0, 64.0], [12.0, 12.0, 12.6, 13.1]])
    full = _mmdet_paste_full_image(probs, boxes, 64, 48)
    for threshold in (0.5, 0.3):
        assert torch.equal(paste_masks(probs, boxes, (64, 48), threshold), full >= threshold)


def test_test_time_thresholds_reach_postprocess():
    """Reference test_cfg: rpn nms_pre 1000 / max_per_img 1000 / nms 0.7; rcnn score_thr 0.05, nms 0.5,
    max_per_img 100, mask_thr_binary 0.5 — the defaults, and what is configured is what runs."""
    cfg = DetectionConfig()
    assert (cfg.rpn_pre_nms_top_n_test, cfg.rpn_post_nms_top_n_test, cfg.rpn_nms_iou) == (1000, 1000, 0.7)
    assert (cfg.rpn_pre_nms_top_n_train, cfg.rpn_post_nms_top_n_train) == (2000, 1000)
    assert (cfg.score_threshold, cfg.nms_iou, cfg.detections_per_image, cfg.mask_threshold) == (0.05, 0.5, 100, 0.5)
    assert (cfg.rpn_anchors_per_image, cfg.rpn_positive_fraction, cfg.rois_per_image, cfg.roi_positive_fraction) \
        == (256, 0.5, 512, 0.25)
    assert (cfg.rpn_fg_iou, cfg.rpn_bg_iou, cfg.rpn_min_pos_iou, cfg.roi_fg_iou, cfg.roi_bg_iou) \
        == (0.7, 0.3, 0.3, 0.5, 0.5)

    model = make_model(score_threshold=0.02, nms_iou=0.3, detections_per_image=3, mask_threshold=0.9,
                       rpn_nms_iou=0.6, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=40).eval()
    assert (model.rpn.nms_thresh, model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (0.6, 150, 40)
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) \
        == (0.02, 0.3, 3)
    seen = {}
    original = model.roi_heads.postprocess_detections

    def spy(*args):
        seen["proposals"] = [p.shape[0] for p in args[2]]
        return original(*args)

    model.roi_heads.postprocess_detections = spy
    with torch.no_grad():
        predictions = model(make_batch())
    assert max(seen["proposals"]) <= 40
    for pred in predictions:
        assert pred["boxes"].shape[0] <= 3 and bool((pred["scores"] > 0.02).all())
    probs = torch.full((1, 28, 28), 0.8)
    det = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9]), "masks": probs}
    assert not model._finish(det, (64, 64), (64, 64))["masks"].any()  # 0.8 < mask_threshold 0.9
    model.cfg.mask_threshold = 0.5
    assert model._finish(det, (64, 64), (64, 64))["masks"].sum() == 36 * 36


def test_rpn_min_pos_iou_is_validated():
    with pytest.raises(ValueError, match="rpn_min_pos_iou"):
        DetectionConfig(rpn_min_pos_iou=1.5)
