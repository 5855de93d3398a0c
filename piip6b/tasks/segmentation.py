"""UperNet (PPM + FPN fusion) with an auxiliary FCN head on the PIIP pyramid, as mmseg's UPerHead /
FCNHead in the reference's ADE20K configs (1536 channels for the 6B presets, aux weight 0.4).

Norm layer: GroupNorm(32) where the reference uses SyncBN. Per-rank batches are 2 images, too few
for plain BatchNorm statistics, and SyncBN needs a cross-rank all-reduce inside every forward
(no CPU/gloo kernel in torch; under ZeRO-3 it would also add collectives whose count must match
across ranks). GroupNorm needs no statistics across images or ranks and has no running buffers
(DeepSpeed does not partition buffers and checkpoints rank 0's only).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from piip6b.devices import model_device
from piip6b.tasks.heads import (
    float32_compute,
    initialize_parameters,
    kaiming_normal_fan_out_,
    layer_init_rules,
    normal_,
)
from piip6b.tasks.data import DataConfig, build_collate, build_dataset, denormalize
from piip6b.tasks.data.ade import ADE20K_CLASSES
from piip6b.tasks.evaluation import EvalResults, evaluate_segmentation, whole_inference
from piip6b.tasks.visualize import draw_label_map, side_by_side


@dataclasses.dataclass
class SegmentationConfig:
    """UperNet settings; defaults are the reference's ADE20K configs for the 6B presets."""

    num_classes: int = 150
    channels: int = 1536
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = 1536
    aux_level: int = 2  # index into the backbone maps: stride 16
    aux_loss_weight: float = 0.4
    dropout: float = 0.1
    norm_groups: int = 32
    ignore_index: int = 255
    # Test (piip6b.tasks.evaluation): "slide" runs crop_size windows every `stride` pixels and
    # averages the logits; "whole" runs the padded image at once.
    test_mode: str = "slide"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)

    def __post_init__(self) -> None:
        self.pool_scales = tuple(int(s) for s in self.pool_scales)
        self.crop_size = tuple(int(s) for s in self.crop_size)
        self.stride = tuple(int(s) for s in self.stride)
        if self.num_classes < 1:
            raise ValueError(f"segmentation.num_classes must be >= 1, got {self.num_classes}")
        for name in ("channels", "aux_channels", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"segmentation.{name} must be >= 1, got {getattr(self, name)}")
        if not self.pool_scales or min(self.pool_scales) < 1:
            raise ValueError(f"segmentation.pool_scales needs at least one positive size, got {list(self.pool_scales)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"segmentation.dropout must lie in [0, 1), got {self.dropout}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"segmentation.aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError(f"segmentation.ignore_index must fit the 8-bit label maps (0..255), got {self.ignore_index}")
        for name in ("channels", "aux_channels"):
            if getattr(self, name) % self.norm_groups:
                raise ValueError(
                    f"segmentation.{name}={getattr(self, name)} is not divisible by "
                    f"segmentation.norm_groups={self.norm_groups} (GroupNorm)"
                )
        if self.test_mode not in ("slide", "whole"):
            raise ValueError(f"segmentation.test_mode must be 'slide' or 'whole', got {self.test_mode!r}")
        if len(self.crop_size) != 2 or len(self.stride) != 2 or min(self.stride) < 1 or min(self.crop_size) < 1:
            raise ValueError(
                f"segmentation.crop_size {self.crop_size} and stride {self.stride} need (height, width) > 0"
            )
        if not 0 <= self.aux_level <= 3:
            raise ValueError(f"segmentation.aux_level indexes the 4 backbone maps (0..3), got {self.aux_level}")


class UperNet(nn.Module):
    """Backbone maps (strides 4/8/16/32) -> PPM on stride 32 + top-down FPN -> fused logits.

    forward(batch): `images` [B,3,H,W] normalised and padded; in training `labels` long [B,H,W]
    with `ignore_index` for unlabeled/padded pixels -> {"loss_seg", "loss_aux"}; in eval the
    class logits [B,K,H,W] (fp32) at the input size.
    """

    def __init__(self, backbone: nn.Module, cfg: SegmentationConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        width, ch = backbone.out_channels, cfg.channels
        conv = functools.partial(
            Conv2dNormActivation,
            norm_layer=lambda c: nn.GroupNorm(cfg.norm_groups, c),
            activation_layer=nn.ReLU,
        )
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv(width, ch, 1)) for s in cfg.pool_scales)
        self.ppm_bottleneck = conv(width + len(cfg.pool_scales) * ch, ch, 3)
        self.lateral_convs = nn.ModuleList(conv(width, ch, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv(ch, ch, 3) for _ in range(3))
        self.fpn_bottleneck = conv(4 * ch, ch, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(cfg.dropout), nn.Conv2d(ch, cfg.num_classes, 1))
        self.aux_head = nn.Sequential(
            conv(width, cfg.aux_channels, 3), nn.Dropout2d(cfg.dropout), nn.Conv2d(cfg.aux_channels, cfg.num_classes, 1)
        )
        self._init_heads()

    def _init_heads(self) -> None:
        # mmseg: Kaiming-normal (fan-out) ConvModules, N(0, 0.01) classifiers, zero biases.
        convs = [self.ppm, self.ppm_bottleneck, self.lateral_convs, self.fpn_convs, self.fpn_bottleneck, self.aux_head[0]]
        rules = [rule for module in convs for rule in layer_init_rules(module, kaiming_normal_fan_out_)]
        rules += layer_init_rules(self.classifier, normal_(0.01))
        rules += layer_init_rules(self.aux_head[2], normal_(0.01))
        initialize_parameters(rules)

    def head_modules(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name != "backbone"]

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[3]
        pooled = [_resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        laterals = [conv(m) for conv, m in zip(self.lateral_convs, maps[:3])]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(fused)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | torch.Tensor:
        images = batch["images"]
        maps = self.backbone(images)
        with float32_compute(images.device.type):
            maps = [m.float() for m in maps]
            logits = _resize(self.decode(maps), images.shape[-2:])
            if not self.training:
                return logits
            aux_logits = _resize(self.aux_head(maps[self.cfg.aux_level]), images.shape[-2:])
            labels = batch["labels"]
            return {
                "loss_seg": self._loss(logits, labels),
                "loss_aux": self.cfg.aux_loss_weight * self._loss(aux_logits, labels),
            }

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Mean over all pixels, ignored ones counting as zero (mmseg's default, avg_non_ignore=False):
        # finite even when a crop holds no labeled pixel at all.
        per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=self.cfg.ignore_index, reduction="none")
        return per_pixel.mean()


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationTask:
    """ADE20K semantic segmentation with UperNet (see `piip6b.tasks.base.Task`)."""

    name = "segmentation"

    def __init__(self, cfg: SegmentationConfig, data: DataConfig) -> None:
        if data.segmentation.ignore_index != cfg.ignore_index:
            raise ValueError(
                f"data.segmentation.ignore_index={data.segmentation.ignore_index} differs from "
                f"segmentation.ignore_index={cfg.ignore_index}; set both to the same value"
            )
        self.cfg, self.data = cfg, data
        # Training pads every batch up to the crop size (mmseg's Pad); evaluation pads only to the
        # backbone's multiple and runs each image alone (`piip6b.tasks.evaluation.sliding_window`).
        self.collate = build_collate(data, "segmentation", "train")
        self.eval_collate = build_collate(data, "segmentation", "val")
        self.class_names: list[str] | None = None  # known once a split is built

    def build_model(self, backbone: nn.Module) -> UperNet:
        return UperNet(backbone, self.cfg)

    def build_dataset(self, split: str):
        dataset = build_dataset(self.data, "segmentation", split, num_classes=self.cfg.num_classes)
        names = getattr(dataset, "class_names", None)
        if names is not None and len(names) != self.cfg.num_classes:
            raise ValueError(
                f"the data set names {len(names)} classes but segmentation.num_classes is "
                f"{self.cfg.num_classes}; set segmentation.num_classes={len(names)}"
            )
        if names is None and self.cfg.num_classes == len(ADE20K_CLASSES):
            names = list(ADE20K_CLASSES)  # ADEChallengeData2016 ships no classes.json
        self.class_names = names
        return dataset

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, predictions_file: str | Path | None = None) -> EvalResults:
        if predictions_file is not None:
            raise ValueError("predictions files are COCO results (detection); segmentation has no such format")
        device = model_device(model)
        return evaluate_segmentation(
            lambda images: model({"images": images}), loader, self.cfg.num_classes,
            ignore_index=self.cfg.ignore_index, mode=self.cfg.test_mode, crop=self.cfg.crop_size,
            stride=self.cfg.stride, size_divisor=self.data.size_divisor, device=device,
            class_names=self.class_names,
        )

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """image | prediction | ground truth for each image of the batch (every rank must call it
        under ZeRO-3)."""
        device = model_device(model)
        logits = whole_inference(lambda x: model({"images": x}), batch["images"].to(device), batch["image_sizes"],
                                 self.data.size_divisor)
        predicted = [logit.argmax(dim=0).cpu() for logit in logits]
        images = denormalize(batch["images"].cpu())
        labels = batch.get("labels")
        drawn = []
        for index, (h, w) in enumerate(batch["image_sizes"]):
            h, w = int(h), int(w)
            image = images[index, :, :h, :w]
            panels = [image, draw_label_map(image, predicted[index], self.cfg.num_classes, self.cfg.ignore_index)]
            if labels is not None:
                panels.append(draw_label_map(image, labels[index, :h, :w], self.cfg.num_classes, self.cfg.ignore_index))
            drawn.append((f"val/segmentation_{index}", side_by_side(panels)))
        return drawn
