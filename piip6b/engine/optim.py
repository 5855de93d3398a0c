"""AdamW with layer-wise learning-rate decay across PIIP branches (docs/SPEC.md §6).

Every backbone parameter gets the layer id the backbone itself reports (`backbone.lr_layer_id`,
fractional for branches whose depth is stretched onto branch1's by `skip_stride`), and the lr scale
`decay ** (num_layers + 1 - layer_id)`; everything outside the backbone (neck, heads) has scale 1.
Two defects of the reference are fixed on purpose: fractional ids are kept exactly (the reference
keyed groups by `"%d" % layer_id`, flooring them), and the no-decay name rules look at the
parameter's own leaf name (the reference compared the full dotted name with bare `pos_embed`, so
position embeddings were weight-decayed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from piip6b.dist import full_numel, full_shape

log = logging.getLogger(__name__)

# Leaf names that never get weight decay whatever their shape: position tables, class tokens and
# the learnable gates / merge weights (scalars or per-channel vectors whose decay would pull the
# interaction units and branch weights towards zero, i.e. towards switching branches off).
NO_DECAY_LEAVES = frozenset({"pos_embed", "cls_token", "mask_token", "w1", "w2", "w3", "w4",
                             "gamma", "ca_gamma", "cffn_gamma"})


LR_SCALING_RULES = ("linear", "sqrt", "none")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # at `lr_base_batch` images per optimizer step
    # How the lr follows a global batch other than `lr_base_batch` (mmdet's auto_scale_lr): linear
    # (Goyal et al.), sqrt, or none (the lr as written, whatever the batch).
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    lr_base_batch: int | None = None  # the global batch `lr` was tuned at; None: data.global_batch
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0  # 1.0 disables layer-wise decay
    clip_grad_norm: float = 0.0  # 0 disables clipping (DeepSpeed `gradient_clipping`)
    # None: torch's fused AdamW (CUDA and CPU), which updates in place; the per-tensor loop makes
    # two fp32 temporaries as large as the tensor, and under ZeRO the tensor is a whole flat
    # partition: +510 MiB per step for 67 M parameters on one CPU rank (BENCHMARKS.md §5).
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"optim.lr must be positive and finite, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.lr_base_batch is not None and self.lr_base_batch < 1:
            raise ValueError(f"optim.lr_base_batch must be >= 1 (or unset: data.global_batch), got {self.lr_base_batch}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0 = off), got {self.clip_grad_norm}")


def scale_lr(lr: float, rule: str, global_batch: int, base_batch: int | None) -> float:
    """`lr`, stated for `base_batch` images per step, at `global_batch` images per step. Without a
    base batch there is nothing to scale from: the lr is used as written."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"unknown lr scaling rule {rule!r}; choose one of {LR_SCALING_RULES}")
    if rule == "none" or base_batch is None:
        return lr
    ratio = global_batch / base_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if len(full_shape(param)) <= 1 or leaf == "bias" or leaf in NO_DECAY_LEAVES:
        return False
    # Norm weights are 1-d already; this also catches any norm with a matrix-shaped affine.
    return not any("norm" in part for part in name.split(".")[:-1])


def find_submodule_prefix(model: nn.Module, target: nn.Module) -> str | None:
    """The dotted name of `target` inside `model` ('' for the model itself), or None."""
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


@dataclass
class ParamGroupInfo:
    name: str
    layer_id: float | None  # None: outside the backbone
    lr_scale: float
    weight_decay: float
    param_names: list[str]
    numel: int


def build_param_groups(model: nn.Module, backbone: nn.Module | None, cfg: OptimConfig
                       ) -> tuple[list[dict], list[ParamGroupInfo]]:
    """Parameter groups for `model` keyed by (exact layer id, decay or not).

    Each group dict carries `lr_scale`; the scheduler sets `lr = base_lr(step) * lr_scale`.
    """
    prefix = None
    num_layers = 0
    if backbone is not None and cfg.layer_decay < 1.0:
        prefix = find_submodule_prefix(model, backbone)
        if prefix is None:
            raise ValueError("the backbone passed for layer decay is not a submodule of the model")
        num_layers = int(backbone.num_layers)
    groups: dict[tuple, dict] = {}
    infos: dict[tuple, ParamGroupInfo] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id: float | None = None
        if prefix is not None and (prefix == "" or name.startswith(prefix + ".")):
            layer_id = float(backbone.lr_layer_id(name[len(prefix) + 1:] if prefix else name))
            lr_scale = cfg.layer_decay ** (num_layers + 1 - layer_id)
        else:
            lr_scale = 1.0
        decay = uses_weight_decay(name, param)
        key = (layer_id if layer_id is not None else float("inf"), decay)
        if key not in groups:
            group_name = ("head" if layer_id is None else f"layer_{layer_id:.4g}") + (
                "_decay" if decay else "_no_decay")
            wd = cfg.weight_decay if decay else 0.0
            groups[key] = {"params": [], "lr": cfg.lr * lr_scale, "lr_scale": lr_scale,
                           "weight_decay": wd, "name": group_name}
            infos[key] = ParamGroupInfo(group_name, layer_id, lr_scale, wd, [], 0)
        groups[key]["params"].append(param)
        infos[key].param_names.append(name)
        infos[key].numel += full_numel(param)
    order = sorted(groups, key=lambda k: (k[0], not k[1]))
    return [groups[k] for k in order], [infos[k] for k in order]


def format_group_table(infos: Iterable[ParamGroupInfo], base_lr: float) -> str:
    rows = [f"{'group':<24} {'layer':>7} {'lr_scale':>10} {'lr':>10} {'wd':>6} {'tensors':>7} "
            f"{'params':>14}  first parameter"]
    for g in infos:
        layer = "-" if g.layer_id is None else f"{g.layer_id:.4g}"
        rows.append(f"{g.name:<24} {layer:>7} {g.lr_scale:>10.4g} {base_lr * g.lr_scale:>10.3e} "
                    f"{g.weight_decay:>6.3g} {len(g.param_names):>7} {g.numel:>14,}  {g.param_names[0]}")
    return "\n".join(rows)


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW; fused where torch has the fused kernel for the parameters' device."""
    device_type = "cpu"
    for group in param_groups:
        if group["params"]:
            device_type = group["params"][0].device.type
            break
    fused = cfg.fused if cfg.fused is not None else device_type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)
