"""Mask R-CNN on the PIIP pyramid, assembled from torchvision's detection components.

The head recipe is the reference's (mmdetection 2.25 `configs/_base_/models/mask_rcnn_r50_fpn.py`,
which every PIIP Mask R-CNN config inherits): where torchvision hard-codes something else, a small
subclass in `piip6b.tasks.detection_ops` restores it (anchors, assigner, L1 box losses, aligned
RoIAlign, mask targets and pasting). What still differs is listed in the README ("Detection head
vs the reference"). Labels are torchvision's: 1..num_classes, 0 is background (the data's
convention too).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from piip6b.devices import model_device, to_device
from piip6b.tasks.heads import (
    float32_compute,
    initialize_parameters,
    kaiming_normal_fan_out_,
    layer_init_rules,
    normal_,
    xavier_uniform_,
    zeros_,
)
from piip6b.tasks.data import DataConfig, build_collate, build_dataset, denormalize, single_image_batches
from piip6b.tasks.detection_ops import (
    BOX_TARGET_STDS,
    PYRAMID_STRIDES,
    LevelRoIAlign,
    MaskRoIHeads,
    ReferenceRPN,
    StridedAnchorGenerator,
    paste_masks,
)
from piip6b.tasks.evaluation import CocoEvaluator, EvalResults, evaluate_detection
from piip6b.tasks.visualize import draw_detections

# Backbone maps at strides 4/8/16/32 are named like torchvision's FPN inputs; the FPN adds "pool"
# (P6, stride 64: max_pool2d(P5, kernel 1, stride 2) as mmdet's FPN with num_outs=5 makes it).
_LEVELS = ("0", "1", "2", "3")


@dataclasses.dataclass
class DetectionConfig:
    """Mask R-CNN settings; defaults are the reference's 1x recipe (mmdet 2.x mask_rcnn_fpn_1x)."""

    num_classes: int = 80  # object classes, background not counted
    fpn_channels: int = 256
    # One per level P2..P6 (strides 4..64: mmdet's scale 8 x stride); ratios are height / width.
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # RPN: assigner IoUs (a gt whose best anchor IoU reaches rpn_min_pos_iou also gets that anchor,
    # mmdet's match_low_quality), sampled anchors per image, proposals kept per level before NMS and
    # per image after it.
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_min_pos_iou: float = 0.3
    rpn_anchors_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_nms_iou: float = 0.7
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    # RoI heads: sampling of proposals for the box/mask losses (the gt boxes join the proposals;
    # mmdet's low-quality matching here uses roi_fg_iou as its minimum, as the reference's config).
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    rois_per_image: int = 512
    roi_positive_fraction: float = 0.25
    box_head_dim: int = 1024
    # Test-time post-processing.
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    detections_per_image: int = 100
    # Mask branch: 4 convs of 256 channels on 14x14 RoIs, 28x28 mask logits.
    mask_convs: int = 4
    mask_channels: int = 256
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        self.anchor_sizes = tuple(int(s) for s in self.anchor_sizes)
        self.anchor_ratios = tuple(float(r) for r in self.anchor_ratios)
        if len(self.anchor_sizes) != len(_LEVELS) + 1:
            raise ValueError(
                f"detection.anchor_sizes needs one size per pyramid level P2..P6 (5), got {list(self.anchor_sizes)}"
            )
        if self.num_classes < 1:
            raise ValueError(f"detection.num_classes must be >= 1, got {self.num_classes}")
        for name in ("fpn_channels", "rpn_anchors_per_image", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                     "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "rois_per_image", "box_head_dim",
                     "detections_per_image", "mask_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"detection.{name} must be >= 1, got {getattr(self, name)}")
        if self.mask_convs < 0:
            raise ValueError(f"detection.mask_convs must be >= 0, got {self.mask_convs}")
        for name in ("anchor_sizes", "anchor_ratios"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"detection.{name} must be positive, got {list(getattr(self, name))}")
        for name in ("rpn_positive_fraction", "roi_positive_fraction", "mask_threshold", "score_threshold",
                     "rpn_min_pos_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"detection.{name} must lie in [0, 1], got {value}")
        for name in ("rpn_fg_iou", "rpn_bg_iou", "roi_fg_iou", "roi_bg_iou", "rpn_nms_iou", "nms_iou"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"detection.{name} must lie in (0, 1], got {value}")


class MaskRCNN(nn.Module):
    """Backbone (4 maps at strides 4..32) -> FPN (P2..P6) -> RPN -> box and mask RoI heads.

    forward(batch) takes the data collate's dict: `images` [B,3,H,W] already normalised and padded,
    `image_sizes` (true h, w per image) and, in training, `targets` (per image `boxes` xyxy in
    image pixels, `labels` int64 1..K, `masks` uint8 [N,H,W] in the same frame). It returns the
    loss terms in training and, in eval, one dict per image with `boxes`, `labels`, `scores` and
    `masks` (bool [N,h,w]) in the frame of `orig_sizes` when the batch has it (the image file's
    size: boxes rescaled, masks pasted there directly), else of `image_sizes`.

    Every partitioned module runs on every call, whatever the batch holds (no objects, no
    detections): ZeRO-3 all-gathers each module's parameters when it runs, so a rank that skipped
    one would deadlock the others. torchvision's heads and the parts in `detection_ops` behave so;
    keep it that way.
    """

    def __init__(self, backbone: nn.Module, cfg: DetectionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        width = backbone.out_channels
        self.neck = FeaturePyramidNetwork([width] * len(_LEVELS), cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
        self.rpn = ReferenceRPN(
            StridedAnchorGenerator(cfg.anchor_sizes, cfg.anchor_ratios, PYRAMID_STRIDES),
            RPNHead(cfg.fpn_channels, len(cfg.anchor_ratios)),
            fg_iou_thresh=cfg.rpn_fg_iou,
            bg_iou_thresh=cfg.rpn_bg_iou,
            batch_size_per_image=cfg.rpn_anchors_per_image,
            positive_fraction=cfg.rpn_positive_fraction,
            pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
            nms_thresh=cfg.rpn_nms_iou,
            min_pos_iou=cfg.rpn_min_pos_iou,
        )
        roi_strides = PYRAMID_STRIDES[: len(_LEVELS)]
        self.roi_heads = MaskRoIHeads(
            box_roi_pool=LevelRoIAlign(_LEVELS, roi_strides, output_size=7, sampling_ratio=0),
            box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim),
            box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes + 1),
            fg_iou_thresh=cfg.roi_fg_iou,
            bg_iou_thresh=cfg.roi_bg_iou,
            min_pos_iou=cfg.roi_fg_iou,
            batch_size_per_image=cfg.rois_per_image,
            positive_fraction=cfg.roi_positive_fraction,
            bbox_reg_weights=tuple(1.0 / std for std in BOX_TARGET_STDS),
            score_thresh=cfg.score_threshold,
            nms_thresh=cfg.nms_iou,
            detections_per_img=cfg.detections_per_image,
            mask_roi_pool=LevelRoIAlign(_LEVELS, roi_strides, output_size=14, sampling_ratio=0),
            mask_head=MaskRCNNHeads(cfg.fpn_channels, (cfg.mask_channels,) * cfg.mask_convs, dilation=1),
            mask_predictor=MaskRCNNPredictor(cfg.mask_channels, cfg.mask_channels, cfg.num_classes + 1),
        )
        self._init_heads()

    def _init_heads(self) -> None:
        # The reference's initialisation (mmdet 2.x): Xavier-uniform FPN convs and shared FCs,
        # N(0, 0.01) RPN convs and classifier, N(0, 0.001) box regressor, Kaiming-normal
        # (fan-out) mask convs and deconvs; zero biases.
        predictor = self.roi_heads.box_predictor
        rules = [
            *layer_init_rules(self.neck, xavier_uniform_),
            *layer_init_rules(self.rpn.head, normal_(0.01)),
            *layer_init_rules(self.roi_heads.box_head, xavier_uniform_),
            (predictor.cls_score.weight, normal_(0.01)),
            (predictor.cls_score.bias, zeros_),
            (predictor.bbox_pred.weight, normal_(0.001)),
            (predictor.bbox_pred.bias, zeros_),
            *layer_init_rules(self.roi_heads.mask_head, kaiming_normal_fan_out_),
            *layer_init_rules(self.roi_heads.mask_predictor, kaiming_normal_fan_out_),
        ]
        initialize_parameters(rules)

    def head_modules(self) -> list[nn.Module]:
        return [self.neck, self.rpn, self.roi_heads]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        images = batch["images"]
        image_sizes = [(int(h), int(w)) for h, w in batch["image_sizes"]]
        maps = self.backbone(images)
        targets = None
        if self.training:
            targets = _to_torchvision_targets(batch["targets"], image_sizes, self.cfg.num_classes)
        with float32_compute(images.device.type):
            features = self.neck(OrderedDict((name, m.float()) for name, m in zip(_LEVELS, maps)))
            # torchvision reads only the padded size, device and dtype from the ImageList's tensor.
            image_list = ImageList(images.float(), image_sizes)
            proposals, rpn_losses = self.rpn(image_list, features, targets)
            detections, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        out_sizes = [(int(h), int(w)) for h, w in batch.get("orig_sizes", image_sizes)]
        return [self._finish(det, size, out) for det, size, out in zip(detections, image_sizes, out_sizes)]

    def _finish(self, det: dict[str, torch.Tensor], size: tuple[int, int], out: tuple[int, int]) -> dict[str, torch.Tensor]:
        scale = det["boxes"].new_tensor([out[1] / size[1], out[0] / size[0]] * 2)
        boxes = det["boxes"] * scale
        masks = paste_masks(det["masks"], boxes, out, self.cfg.mask_threshold)
        return {"boxes": boxes, "labels": det["labels"], "scores": det["scores"], "masks": masks}


def _to_torchvision_targets(targets: list[dict[str, torch.Tensor]], image_sizes: list[tuple[int, int]],
                            num_classes: int) -> list[dict[str, Any]]:
    """fp32 boxes and int64 labels, degenerate boxes reported; `image_size` for the RPN's valid anchors."""
    converted = []
    for index, (target, image_size) in enumerate(zip(targets, image_sizes)):
        boxes = target["boxes"].float()
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            # Raise here rather than let the box coder take log(0) and NaN the whole job.
            raise ValueError(
                f"batch image {index}: {int(degenerate.sum())} box(es) with zero width or height "
                f"(first {boxes[degenerate][0].tolist()}); the dataset must drop degenerate boxes"
            )
        labels = target["labels"].long()
        if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(
                f"batch image {index}: labels must lie in 1..{num_classes} (0 is background), got "
                f"{labels.min().item()}..{labels.max().item()}; check detection.num_classes against the data"
            )
        converted.append({"boxes": boxes, "labels": labels, "masks": target["masks"], "image_size": image_size})
    return converted


class DetectionTask:
    """COCO instance segmentation with Mask R-CNN (see `piip6b.tasks.base.Task`)."""

    name = "detection"

    def __init__(self, cfg: DetectionConfig, data: DataConfig) -> None:
        self.cfg, self.data = cfg, data
        self.collate = build_collate(data, "detection", "train")
        self.eval_collate = build_collate(data, "detection", "val")
        self.class_names: list[str] | None = None

    def build_model(self, backbone: nn.Module) -> MaskRCNN:
        return MaskRCNN(backbone, self.cfg)

    def build_dataset(self, split: str):
        dataset = build_dataset(self.data, "detection", split)
        if dataset.num_classes != self.cfg.num_classes:
            raise ValueError(
                f"{dataset.annotation_file} has {dataset.num_classes} categories but detection.num_classes is "
                f"{self.cfg.num_classes}; set detection.num_classes={dataset.num_classes}"
            )
        self.class_names = dataset.class_names
        return dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, predictions_file: str | Path | None = None) -> EvalResults:
        dataset = loader.dataset
        evaluator = CocoEvaluator(dataset.coco_api(), dataset.label_to_category_id, predictions_file=predictions_file)
        device = model_device(model)

        def predict(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
            # One image per forward (every rank has as many images, so as many forwards, as the
            # others): a detection never depends on the images that share its batch.
            return [prediction for single in single_image_batches(batch, self.data.size_divisor)
                    for prediction in model(to_device(single, device))]

        return evaluate_detection(predict, loader, evaluator)

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """Predictions drawn on each image of the batch (every rank must call it under ZeRO-3)."""
        device = model_device(model)
        in_image_frame = {k: v for k, v in batch.items() if k != "orig_sizes"}
        predictions = model(to_device(in_image_frame, device))
        images = denormalize(batch["images"].cpu())
        drawn = []
        for index, ((h, w), prediction) in enumerate(zip(batch["image_sizes"], predictions)):
            image = images[index, :, : int(h), : int(w)]
            drawn.append((f"val/detections_{index}",
                          draw_detections(image, prediction, self.class_names, self.cfg.num_classes)))
        return drawn
