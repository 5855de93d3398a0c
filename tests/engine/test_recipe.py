"""Recipes at any world size (issue 12 §1): the batch rule, the lr scaling rule, schedules in samples.

Config resolution only (`piip6b.recipe.resolve`, `BatchLayout.derive`): no rank starts. The trained
counterpart, the shipped tiny recipes at 1, 2 and 4 ranks, is tests/tasks/test_recipes_across_ranks.py.
"""

from __future__ import annotations

import pytest

from piip6b.config import ConfigError, load_config
from piip6b.engine.build import BatchLayout
from piip6b.recipe import apply_plan, describe_lr, resolve
from piip6b.testing import REPO

COCO = REPO / "configs" / "detection" / "piip_h6b_maskrcnn_1x_coco.yaml"
ADE = REPO / "configs" / "segmentation" / "piip_h6b_512_upernet_80k_ade20k.yaml"
COCO_TRAIN_IMAGES = 117_266  # COCO train2017 images with annotations, what mmdet trains on


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_global_batch_is_kept_where_the_world_size_divides_it(world):
    layout = BatchLayout.derive(world, global_batch=16, max_micro_batch=2)
    assert layout.global_batch == 16 and layout.micro_batch <= 2
    assert (layout.micro_batch, layout.grad_accum) == {1: (2, 8), 2: (2, 4), 4: (2, 2), 8: (2, 1), 16: (1, 1)}[world]


def test_global_batch_rises_to_a_multiple_of_the_world_size():
    assert BatchLayout.derive(64, global_batch=16, max_micro_batch=2) == BatchLayout(1, 1, 64)
    assert BatchLayout.derive(24, global_batch=16, max_micro_batch=2) == BatchLayout(1, 1, 24)
    # 3 ranks: 6 images each (18 in all), in forwards of at most 4 that divide 6 evenly: 2 x 3.
    assert BatchLayout.derive(3, global_batch=16, max_micro_batch=4) == BatchLayout(3, 2, 3)
    # 5 images per rank with at most 2 per forward: 5 forwards of 1 (2 does not divide 5).
    assert BatchLayout.derive(2, global_batch=10, max_micro_batch=2) == BatchLayout(1, 5, 2)


def test_pinned_layouts():
    assert BatchLayout.derive(8, global_batch=None, max_micro_batch=2) == BatchLayout(2, 1, 8)
    assert BatchLayout.derive(8, global_batch=None, max_micro_batch=2, grad_accum=3).global_batch == 48
    assert BatchLayout.derive(2, global_batch=16, max_micro_batch=8, grad_accum=2) == BatchLayout(4, 2, 2)
    with pytest.raises(ValueError, match="grad_accum_steps=3 does not divide the 8 images per rank"):
        BatchLayout.derive(2, global_batch=16, max_micro_batch=8, grad_accum=3)
    with pytest.raises(ValueError, match="more than data.batch_size=2"):
        BatchLayout.derive(2, global_batch=16, max_micro_batch=2, grad_accum=2)


@pytest.mark.parametrize("override, message", [
    ("data.global_batch=0", "data.global_batch must be >= 1"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("engine.grad_accum_steps=0", "grad_accum_steps must be >= 1"),
    ("optim.lr_base_batch=0", "lr_base_batch must be >= 1"),
    ("optim.lr_scaling=cubic", "'cubic' is not one of"),
    ("schedule.max_epochs=0", "schedule.max_epochs must be >= 1"),
    ("engine.gpu_mem_gib=-1", "gpu_mem_gib must be positive"),
    ("model.grad_checkpointing=-1", "grad_checkpointing must be >= 0"),
    ("engine.plan=maybe", "'maybe' is not one of"),
])
def test_every_count_is_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(COCO, [override])


def test_coco_recipe_worked_example_8_16_64_512_gpus():
    """The README's table: what the shipped COCO 1x recipe is on 8, 16, 64 and 512 GPUs."""
    expected = {  # world: (global batch, per GPU per forward, accumulation, lr)
        8: (16, 2, 1, 1e-4),
        16: (16, 1, 1, 1e-4),
        64: (64, 1, 1, 4e-4),
        512: (512, 1, 1, 3.2e-3),
    }
    for world, (global_batch, micro, accum, lr) in expected.items():
        recipe = resolve(load_config(COCO), world, COCO_TRAIN_IMAGES)
        assert (recipe.global_batch, recipe.batch.micro_batch, recipe.batch.grad_accum) == (global_batch, micro, accum)
        assert recipe.lr == pytest.approx(lr)
        assert recipe.total_samples == 12 * COCO_TRAIN_IMAGES  # 12 epochs, whatever the world size
        assert recipe.total_steps == -(-12 * COCO_TRAIN_IMAGES // global_batch)
        assert recipe.warmup_samples == 500 * 16  # 500 iterations of the recipe's 16 images
        assert recipe.schedule.milestones == [8 * COCO_TRAIN_IMAGES, 11 * COCO_TRAIN_IMAGES]
        assert bool(recipe.warnings) == (world > 16)
    wide = resolve(load_config(COCO), 64, COCO_TRAIN_IMAGES)
    assert "data.global_batch=16 cannot be kept on 64 ranks" in wide.warnings[0]
    assert "0.0004 = 0.0001 x 64/16 (linear rule, optim.lr_base_batch=16)" in wide.warnings[0]
    assert wide.origins["global_batch"] == "raised" and wide.origins["lr"] == "derived"


def test_ade20k_80k_iterations_are_samples_of_the_recipes_batch():
    for world in (1, 2, 4, 8, 16):
        recipe = resolve(load_config(ADE), world, 20_210)
        assert (recipe.total_samples, recipe.total_steps, recipe.warmup_samples) == (1_280_000, 80_000, 24_000)
        assert recipe.lr == pytest.approx(4e-5)
    wide = resolve(load_config(ADE), 64, 20_210)
    # 1.28 M samples (not 64 x 80k = 5.12 M), 20k steps of 64, lr x 4, warm-up still 24k samples.
    assert (wide.total_samples, wide.total_steps, wide.warmup_samples) == (1_280_000, 20_000, 24_000)
    assert wide.lr == pytest.approx(1.6e-4)


def test_sqrt_rule_none_and_pinning_by_hand():
    sqrt = resolve(load_config(COCO, ["optim.lr_scaling=sqrt"]), 64, COCO_TRAIN_IMAGES)
    assert sqrt.lr == pytest.approx(2e-4) and "sqrt(64/16)" in describe_lr(sqrt)
    kept = resolve(load_config(COCO, ["optim.lr_scaling=none"]), 64, COCO_TRAIN_IMAGES)
    assert kept.lr == 1e-4 and "as written (optim.lr_scaling=none)" in describe_lr(kept)
    # Pinned by hand: 8 GPUs x 4 images x 2 forwards = 64 per step; the lr still follows the rule...
    pinned = load_config(COCO, ["data.global_batch=null", "data.batch_size=4", "engine.grad_accum_steps=2"])
    recipe = resolve(pinned, 8, COCO_TRAIN_IMAGES)
    assert recipe.global_batch == 64 and recipe.lr == pytest.approx(4e-4) and not recipe.warnings
    assert recipe.origins["global_batch"] == recipe.origins["micro_batch"] == "pinned"
    # ...unless silenced; the warm-up (500 iterations) is then 500 steps of the pinned batch.
    silent = resolve(load_config(COCO, ["data.global_batch=null", "optim.lr_scaling=none"]), 64, COCO_TRAIN_IMAGES)
    assert silent.lr == 1e-4 and not silent.warnings and silent.warmup_samples == 500 * 128


def _lr_by_samples(recipe, samples):
    return [recipe.lr * recipe.schedule.factor(s) for s in samples]


@pytest.mark.parametrize("config", [COCO, ADE], ids=["coco", "ade20k"])
def test_same_recipe_same_lr_per_sample_at_1_2_4_ranks_and_with_accumulation(config):
    layouts = [(1, []), (2, []), (4, []), (4, ["data.batch_size=1"]), (2, ["engine.grad_accum_steps=8"])]
    recipes = [resolve(load_config(config, overrides), world, 4_000) for world, overrides in layouts]
    assert {(r.batch.micro_batch, r.batch.grad_accum, r.world_size) for r in recipes} == {
        (2, 8, 1), (2, 4, 2), (2, 2, 4), (1, 4, 4), (1, 8, 2)}
    assert {r.global_batch for r in recipes} == {16} and {r.total_samples for r in recipes} == {recipes[0].total_samples}
    points = range(0, recipes[0].total_samples + 1, 16)  # where every layout starts a step
    curves = [_lr_by_samples(r, points) for r in recipes]
    assert all(curve == curves[0] for curve in curves)
    assert max(curves[0]) > min(curves[0])  # a warm-up and a decay were compared, not a constant


def test_resume_at_a_raised_batch_continues_in_samples():
    eight = resolve(load_config(ADE), 8, 20_210)
    wide = resolve(load_config(ADE), 64, 20_210)
    # 30k steps of 16 on 8 GPUs (480k samples), then resumed on 64: the 800k samples left take 12.5k steps.
    assert wide.last_step(30_000, 30_000 * 16) == 30_000 + 12_500
    assert eight.last_step(30_000, 30_000 * 16) == 80_000
    assert wide.schedule.factor(480_000) == eight.schedule.factor(480_000)


def test_plan_overrides_are_reported_as_the_plans():
    cfg = load_config(COCO)
    planned, keys = apply_plan(cfg, {"engine.zero_stage": 2, "engine.hpz_partition_size": 1,
                                     "model.grad_checkpointing": 0, "model.checkpoint_interactions": False,
                                     "data.batch_size": 1, "engine.grad_accum_steps": 1})
    assert planned.engine.zero_stage == 2 and not planned.model.checkpoint_interactions
    recipe = resolve(planned, 16, COCO_TRAIN_IMAGES, planned=keys)
    assert recipe.origins["zero_stage"] == recipe.origins["micro_batch"] == recipe.origins["grad_accum"] == "plan"
    assert recipe.global_batch == 16
    with pytest.raises(ValueError, match="may only choose"):
        apply_plan(cfg, {"optim.lr": 1.0})
