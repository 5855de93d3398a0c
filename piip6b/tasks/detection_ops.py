"""Where the reference's Mask R-CNN recipe differs from what torchvision's components hard-code.

The reference (OpenGVLab/PIIP, an mmdetection 2.25.3 / mmcv 1.7.0 fork) builds every PIIP Mask R-CNN
from `mmdetection/configs/_base_/models/mask_rcnn_r50_fpn.py`, overriding only the FPN's input
widths. Each class here is the smallest change to a torchvision part that makes it compute what
that config and mmdet's code (`mmdet/core/anchor/anchor_generator.py`,
`mmdet/core/bbox/assigners/max_iou_assigner.py`, `mmdet/models/roi_heads/...`) compute; the
torchvision ops themselves (roi_align, nms, box coding, samplers) are reused. None of these parts
owns a parameter, and each runs on every call whatever the batch holds, so the ZeRO-3 rule of
`piip6b.tasks.detection.MaskRCNN` (every partitioned module called on every rank at every step) holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import roi_align

# mmdet's AnchorGenerator strides for P2..P6 and SingleRoIExtractor featmap_strides (P2..P5).
PYRAMID_STRIDES = (4, 8, 16, 32, 64)
# SingleRoIExtractor's default: RoIs smaller than 2 * 56 px (sqrt of the area) pool from P2.
FINEST_SCALE = 56
# Every PIIP detection config pads each image to a multiple of 64 (`Pad size_divisor=64`).
REFERENCE_PAD_DIVISOR = 64
# DeltaXYWHBBoxCoder target_stds of the box head (means 0); torchvision's BoxCoder multiplies by
# weights instead of dividing by stds, so the same encoding is weights (10, 10, 5, 5).
BOX_TARGET_STDS = (0.1, 0.1, 0.2, 0.2)


class StridedAnchorGenerator(AnchorGenerator):
    """mmdet 2.x anchors: each level's fixed stride, centres at (k * stride) (center_offset 0) and
    sizes not rounded.

    torchvision derives a level's stride from the padded image size // the grid size, so an odd
    grid below puts P6's anchors 61 px apart instead of 64 on an 800-px-high batch (P5 25 rows, P6
    13), and it rounds base anchors to whole pixels (32 px at ratio 0.5: 46 x 22 instead of
    45.25 x 22.63).
    """

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], strides: Sequence[int]) -> None:
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per stride: sizes {list(sizes)}, strides {list(strides)}")
        super().__init__(sizes=tuple((size,) for size in sizes), aspect_ratios=(tuple(ratios),) * len(sizes))
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        sizes = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))  # ratio = h / w
        w_ratios = 1 / h_ratios
        widths = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
        heights = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
        return torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=1)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides")
        device = feature_maps[0].device
        grid_sizes = [list(fmap.shape[-2:]) for fmap in feature_maps]
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class MaxIoUMatcher(Matcher):
    """mmdet's MaxIoUAssigner (gt_max_assign_all=True) on torchvision's matcher interface.

    IoU >= `high` is positive (its best gt), < `low` background, between ignored, as in
    torchvision. The low-quality rule differs: mmdet gives each gt whose best IoU is at least
    `min_pos_iou` every prediction that reaches that best IoU, assigned to *that* gt (a later gt
    wins a tie). torchvision's version has no minimum — a 6-px object, IoU at most 36/1024 with
    a 32-px anchor, still gets positives — and keeps such a prediction's own best gt.
    `min_pos_iou=None` turns the rule off.
    """

    def __init__(self, high: float, low: float, min_pos_iou: float | None) -> None:
        super().__init__(high, low, allow_low_quality_matches=False)
        self.min_pos_iou = min_pos_iou

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        matches = super().__call__(match_quality_matrix)
        if self.min_pos_iou is None:
            return matches
        best_per_gt = match_quality_matrix.max(dim=1).values
        reaches_best = (match_quality_matrix == best_per_gt[:, None]) & (best_per_gt[:, None] >= self.min_pos_iou)
        gt_index, pred_index = torch.where(reaches_best)
        if pred_index.numel():
            # The last gt in index order wins, as in mmdet's loop over the gts.
            winner = torch.full_like(matches, -1).scatter_reduce(0, pred_index, gt_index, reduce="amax")
            updated = winner >= 0
            matches[updated] = winner[updated]
        return matches


class ReferenceRPN(RegionProposalNetwork):
    """torchvision's RPN with the reference's training targets and box loss.

    - Assigner: `MaxIoUMatcher` with `min_pos_iou` (0.3 in the reference).
    - Valid anchors: mmdet trains only on anchors whose location lies inside the image's own padded
      shape (AnchorGenerator.valid_flags on `pad_shape`, allowed_border -1); every PIIP config pads
      each image to a multiple of 64 (`Pad size_divisor=64`) before batching. Anchors in the rest of
      the batch padding, which torchvision samples as easy negatives, are ignored here when the
      target carries `image_size` (h, w).
    - Box loss: L1 (mmdet L1Loss, weight 1) on the encoded deltas of the sampled positives, divided
      by the batch's sampled anchors; torchvision hard-codes smooth-L1 with beta 1/9. The objectness
      loss (sigmoid CE, mean over the sampled anchors) is torchvision's.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, *, fg_iou_thresh: float,
                 bg_iou_thresh: float, min_pos_iou: float | None, **kwargs) -> None:
        super().__init__(anchor_generator, head, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh, **kwargs)
        self.proposal_matcher = MaxIoUMatcher(fg_iou_thresh, bg_iou_thresh, min_pos_iou)

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        for image_labels, image_anchors, target in zip(labels, anchors, targets):
            if "image_size" not in target:
                continue
            pad_h, pad_w = (-(-int(s) // REFERENCE_PAD_DIVISOR) * REFERENCE_PAD_DIVISOR
                            for s in target["image_size"])
            # Anchor centres are whole multiples of their stride (>= 4): half a pixel absorbs rounding.
            centres = (image_anchors[:, :2] + image_anchors[:, 2:]) / 2
            outside = (centres[:, 0] >= pad_w - 0.5) | (centres[:, 1] >= pad_h - 0.5)
            image_labels[outside] = -1.0  # ignored by the sampler, as mmdet's zero label weight
        return labels, matched_gt_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(negative))[0]])
        labels = torch.cat(labels)
        targets = torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], targets[positive], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class LevelRoIAlign(nn.Module):
    """mmdet's SingleRoIExtractor with mmcv's RoIAlign (aligned=True, pool 'avg').

    A RoI of scale s = sqrt(w * h) pools from level floor(log2(s / finest_scale + 1e-6)), clamped
    to the levels given (P2 below 112 px, P3 below 224, P4 below 448, P5 above), with spatial scale
    1 / stride. torchvision's MultiScaleRoIAlign maps levels the same way but calls roi_align with
    aligned=False, i.e. samples half a feature cell off (Detectron2 measured the misalignment as an
    AP loss); here torchvision's roi_align runs with aligned=True.
    forward(features, boxes, image_shapes) has MultiScaleRoIAlign's signature (image_shapes unused).
    """

    def __init__(self, names: Sequence[str], strides: Sequence[int], output_size: int, sampling_ratio: int = 0,
                 finest_scale: float = FINEST_SCALE) -> None:
        super().__init__()
        if len(names) != len(strides):
            raise ValueError(f"one stride per feature map: {list(names)} vs {list(strides)}")
        self.names, self.strides = tuple(names), tuple(int(s) for s in strides)
        self.output_size = (int(output_size), int(output_size))
        self.sampling_ratio, self.finest_scale = int(sampling_ratio), float(finest_scale)

    def map_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return level.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        maps = [features[name] for name in self.names]
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)])
        rois = rois.to(maps[0].dtype)
        levels = self.map_levels(rois[:, 1:])
        pooled = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], *self.output_size))
        # Every level is pooled, even with no RoI on it: the output then needs a gradient whatever
        # the batch holds. Under ZeRO-3, DeepSpeed records a module in the backward trace only when
        # its output needs one, so a rank without positive RoIs (an empty mask batch) would otherwise
        # drop this module from its trace and the ranks' traces would disagree (a RuntimeError/hang).
        for level, (fmap, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_align(fmap, rois[index], self.output_size, spatial_scale=1.0 / stride,
                                      sampling_ratio=self.sampling_ratio, aligned=True)
        return pooled


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, gt_index: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's mask targets (mmdet BitmapMasks.crop_and_resize, binarize=True): each RoI's
    matched gt mask, sampled on the RoI by aligned RoIAlign (sampling ratio 0) to size x size, then
    >= 0.5. torchvision samples unaligned and keeps the fractional values."""
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([gt_index[:, None].to(boxes), boxes], dim=1)
    sampled = roi_align(gt_masks[:, None].to(boxes), rois, (size, size), spatial_scale=1.0, sampling_ratio=0,
                        aligned=True)[:, 0]
    return (sampled >= 0.5).to(boxes.dtype)


class MaskRoIHeads(RoIHeads):
    """torchvision's box + mask RoI heads (sampling, box coding, test-time NMS reused) with the
    reference's losses and assigner:

    - box regression: L1 (mmdet L1Loss) on the deltas encoded with target stds (0.1, 0.1, 0.2, 0.2),
      class-specific, divided by all sampled RoIs; torchvision hard-codes smooth-L1, beta 1/9;
    - mask targets: aligned RoIAlign of the gt mask, binarised (`mask_targets`);
    - the proposal matcher: `MaxIoUMatcher` with `min_pos_iou` (mmdet's rcnn assigner, 0.5).

    The mask branch runs on every call, on zero RoIs too (ZeRO-3). In eval each result's `masks`
    holds the 28 x 28 probabilities of its class, [N, M, M], for `paste_masks`.
    """

    def __init__(self, *, fg_iou_thresh: float, bg_iou_thresh: float, min_pos_iou: float | None, **kwargs) -> None:
        super().__init__(fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh, **kwargs)
        self.proposal_matcher = MaxIoUMatcher(fg_iou_thresh, bg_iou_thresh, min_pos_iou)

    @staticmethod
    def box_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor],
                 regression_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax CE over the sampled RoIs, L1 of the true class's deltas of the positives / RoIs)."""
        labels = torch.cat(labels)
        targets = torch.cat(regression_targets)
        classification = F.cross_entropy(class_logits, labels)
        positive = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(labels.shape[0], -1, 4)[positive, labels[positive]]
        regression = F.l1_loss(deltas, targets[positive], reduction="sum") / labels.numel()
        return classification, regression

    @staticmethod
    def mask_loss(mask_logits: torch.Tensor, boxes: list[torch.Tensor], gt_index: list[torch.Tensor],
                  labels: list[torch.Tensor], gt_masks: list[torch.Tensor]) -> torch.Tensor:
        """Per-pixel BCE of the true class's logits against `mask_targets`, mean over all pixels."""
        size = mask_logits.shape[-1]
        targets = torch.cat([mask_targets(m, b, i, size) for m, b, i in zip(gt_masks, boxes, gt_index)])
        if targets.shape[0] == 0:
            return mask_logits.sum() * 0  # keeps every mask-head parameter in the graph
        labels = torch.cat(labels)
        logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
        return F.binary_cross_entropy_with_logits(logits, targets)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, gt_index, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_boxes = [p[keep] for p, keep in zip(proposals, positive)]
        else:
            mask_boxes, scores, det_labels = self.postprocess_detections(class_logits, box_regression, proposals,
                                                                         image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        if self.training:
            loss_classifier, loss_box_reg = self.box_loss(class_logits, box_regression, labels, regression_targets)
            loss_mask = self.mask_loss(mask_logits, mask_boxes, [i[k] for i, k in zip(gt_index, positive)],
                                       [lab[k] for lab, k in zip(labels, positive)], [t["masks"] for t in targets])
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
        all_labels = torch.cat(det_labels)
        probs = mask_logits[torch.arange(all_labels.shape[0], device=all_labels.device), all_labels].sigmoid()
        per_image = probs.split([b.shape[0] for b in mask_boxes])
        results = [{"boxes": b, "labels": lab, "scores": s, "masks": m}
                   for b, lab, s, m in zip(mask_boxes, det_labels, scores, per_image)]
        return results, {}


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Binary image masks [N, h, w] from RoI mask probabilities [N, M, M] and their boxes in the
    image frame, as mmdet's FCNMaskHead pastes them: each pixel centre (x + 0.5, y + 0.5) samples the
    RoI's M x M grid bilinearly (grid_sample, align_corners=False, zero outside), then >= threshold.
    torchvision instead resizes the mask to the box rounded to whole pixels.

    Only a window around each box is sampled: beyond one mask cell outside the box every sample is
    0, as a full-image paste would give.
    """
    height, width = size
    out = torch.zeros((probs.shape[0], height, width), dtype=torch.bool, device=probs.device)
    cells = probs.shape[-1]
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        box_w, box_h = x1 - x0, y1 - y0
        if box_w <= 0 or box_h <= 0:
            continue
        c0, c1 = max(math.floor(x0 - box_w / cells) - 1, 0), min(math.ceil(x1 + box_w / cells) + 1, width)
        r0, r1 = max(math.floor(y0 - box_h / cells) - 1, 0), min(math.ceil(y1 + box_h / cells) + 1, height)
        if c1 <= c0 or r1 <= r0:
            continue
        gx = (torch.arange(c0, c1, device=probs.device, dtype=torch.float32) + 0.5 - x0) / box_w * 2 - 1
        gy = (torch.arange(r0, r1, device=probs.device, dtype=torch.float32) + 0.5 - y0) / box_h * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # [rows, cols, (x, y)]
        window = F.grid_sample(probs[k][None, None].float(), grid[None], mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0, 0]
        out[k, r0:r1, c0:c1] = window >= threshold
    return out
