"""Parameter groups (layer-wise lr decay, no-decay rules) and lr schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from piip6b.engine.optim import OptimConfig, build_optimizer, build_param_groups, format_group_table, scale_lr
from piip6b.engine.schedule import LRSchedule, ScheduleConfig, apply_lr
from piip6b.models import ModelConfig


class WithHead(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, 3)


def hand_layer_id(name: str) -> float | None:
    """SPEC §6 ids for piip_h6b_tiny written out by hand: branch1 has 4 blocks, branch2 (ViT-H) 3,
    so branch2's block i sits at (i + 1) * 4/3 (no flooring); new modules get num_layers + 1 = 5."""
    if not name.startswith("backbone."):
        return None
    parts = name.split(".")[1:]
    if parts[0] in ("branch1", "branch2") and parts[1] in ("pos_embed", "patch_embed", "cls_token"):
        return 0.0
    if parts[0] == "branch1" and parts[1] == "blocks":
        return int(parts[2]) + 1.0
    if parts[0] == "branch2" and parts[1] == "blocks":
        return {0: 4 / 3, 1: 8 / 3, 2: 4.0}[int(parts[2])]
    return 5.0


def test_layer_decay_groups_match_hand_computed_ids():
    torch.manual_seed(0)
    model = WithHead(ModelConfig(preset="piip_h6b_tiny").build())
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    groups, infos = build_param_groups(model, model.backbone, cfg)
    seen = set()
    for info, group in zip(infos, groups):
        assert len(info.param_names) == len(group["params"])
        for name in info.param_names:
            seen.add(name)
            expected_id = hand_layer_id(name)
            if expected_id is None:
                assert info.layer_id is None and info.lr_scale == 1.0, name
            else:
                assert info.layer_id == pytest.approx(expected_id), name
                assert info.lr_scale == pytest.approx(0.8 ** (5 - expected_id)), name
            assert group["lr"] == pytest.approx(1e-3 * info.lr_scale)
    assert seen == {n for n, _ in model.named_parameters()}
    # the fractional ids are distinct groups (the reference floored 2.67 into layer 2)
    ids = {info.layer_id for info in infos}
    assert 4 / 3 in ids and 8 / 3 in ids
    table = format_group_table(infos, cfg.lr)
    assert "layer_2.667_decay" in table and "head_decay" in table


def test_no_weight_decay_rules():
    model = WithHead(ModelConfig(preset="piip_h6b_tiny").build())
    _, infos = build_param_groups(model, model.backbone, OptimConfig(weight_decay=0.05, layer_decay=0.9))
    wd = {name: info.weight_decay for info in infos for name in info.param_names}
    params = dict(model.named_parameters())
    for name, value in wd.items():
        leaf = name.rsplit(".", 1)[-1]
        no_decay = (params[name].ndim <= 1 or leaf in ("bias", "pos_embed", "cls_token", "w1", "w2")
                    or "gamma" in leaf or "norm" in name)
        assert value == (0.0 if no_decay else 0.05), name
    assert wd["backbone.branch1.pos_embed"] == 0.0 and wd["backbone.branch2.pos_embed"] == 0.0
    assert wd["backbone.w1"] == 0.0 and wd["backbone.branch1.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0


def test_no_layer_decay_means_one_scale():
    model = WithHead(ModelConfig(preset="piip_h6b_tiny").build())
    groups, _ = build_param_groups(model, model.backbone, OptimConfig(layer_decay=1.0))
    assert {g["lr_scale"] for g in groups} == {1.0} and len(groups) == 2


def test_warmup_then_step_schedule_matches_mmcv_formula():
    """mmcv's per-iteration formula at the recipe's batch (16 images, 100 steps an epoch), in samples."""
    cfg = ScheduleConfig(policy="step", max_epochs=12, milestones=(8, 11), warmup_iters=10,
                         warmup_ratio=1e-3)
    sched = LRSchedule(cfg, samples_per_iter=16, samples_per_epoch=1600)
    assert sched.total_samples == 12 * 1600 and sched.warmup_samples == 160
    assert sched.factor(0) == pytest.approx(1e-3)
    assert sched.factor(5 * 16) == pytest.approx(1 - 0.5 * (1 - 1e-3))
    assert sched.factor(10 * 16) == 1.0 and sched.factor(799 * 16) == 1.0
    assert sched.factor(800 * 16) == pytest.approx(0.1) and sched.factor(1100 * 16) == pytest.approx(0.01)


def test_iterations_are_at_the_recipes_batch():
    """ADE20K 80k: 80,000 iterations of 16 images are 1.28 M samples, its warm-up 1500 x 16."""
    cfg = ScheduleConfig(policy="poly", max_iters=80_000, warmup_iters=1500, warmup_ratio=1e-6)
    sched = LRSchedule(cfg, samples_per_iter=16, samples_per_epoch=20_210)
    assert (sched.total_samples, sched.warmup_samples) == (1_280_000, 24_000)
    assert sched.factor(640_000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reach past the end"):
        LRSchedule(ScheduleConfig(max_iters=10, milestones=(8, 11)), samples_per_iter=2, samples_per_epoch=5)


def test_poly_and_cosine():
    poly = LRSchedule(ScheduleConfig(policy="poly", max_iters=100, warmup_iters=0, power=1.0),
                      samples_per_iter=1, samples_per_epoch=1)
    assert poly.factor(0) == 1.0 and poly.factor(50) == pytest.approx(0.5) and poly.factor(100) == 0.0
    cos = LRSchedule(ScheduleConfig(policy="cosine", max_iters=100, warmup_iters=0, min_lr_ratio=0.1),
                     samples_per_iter=1, samples_per_epoch=1)
    assert cos.factor(50) == pytest.approx(0.1 + 0.9 * 0.5) and cos.factor(100) == pytest.approx(0.1)
    assert cos.factor(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_apply_lr_uses_group_scale():
    model = WithHead(ModelConfig(preset="piip_h6b_tiny").build())
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5)
    groups, _ = build_param_groups(model, model.backbone, cfg)
    opt = build_optimizer(groups, cfg)
    apply_lr(opt, cfg.lr, 0.25)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * 0.25 * g["lr_scale"])


def test_schedule_needs_a_length():
    with pytest.raises(ValueError, match="neither"):
        LRSchedule(ScheduleConfig(), samples_per_iter=16, samples_per_epoch=10)
    with pytest.raises(ValueError, match="only one"):
        ScheduleConfig(max_iters=1, max_epochs=1)
    for bad in ({"max_iters": 0}, {"max_epochs": 0}, {"warmup_iters": -1}, {"milestones": (0, 3)},
                {"gamma": 0.0}, {"min_lr_ratio": 1.5}):
        with pytest.raises(ValueError, match="schedule"):
            ScheduleConfig(**bad)


def test_lr_scaling_rules():
    assert scale_lr(1e-4, "linear", 64, 16) == pytest.approx(4e-4)
    assert scale_lr(1e-4, "sqrt", 64, 16) == pytest.approx(2e-4)
    assert scale_lr(1e-4, "none", 64, 16) == 1e-4
    assert scale_lr(1e-4, "linear", 64, None) == 1e-4  # nothing stated to scale from
    assert scale_lr(4e-5, "linear", 8, 16) == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="lr_base_batch"):
        OptimConfig(lr_base_batch=0)
