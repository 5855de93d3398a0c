"""Config loading: `_base_` inheritance, overrides, typed validation, did-you-mean errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from piip6b.testing import REPO

from piip6b.config import (ConfigError, ExperimentConfig, apply_overrides, build_dataclass,
                           config_hash, load_config, load_yaml)

CONFIGS = REPO / "configs"


@dataclass
class Inner:
    lr: float = 1e-4
    sizes: tuple[int, ...] = (1, 2)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int | None = None
    inner: Inner = field(default_factory=Inner)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_inheritance_deep_merges_and_delete_replaces(tmp_path):
    write(tmp_path / "base.yaml", "name: base\ninner: {lr: 0.1, sizes: [3, 4], mode: b}\n")
    write(tmp_path / "mid.yaml", "_base_: base.yaml\ninner: {lr: 0.2}\n")
    child = write(tmp_path / "child.yaml", "_base_: mid.yaml\nsteps: 5\n")
    tree = load_yaml(child)
    assert tree == {"name": "base", "inner": {"lr": 0.2, "sizes": [3, 4], "mode": "b"}, "steps": 5}
    replaced = write(tmp_path / "repl.yaml", "_base_: base.yaml\ninner: {_delete_: true, lr: 0.3}\n")
    assert load_yaml(replaced)["inner"] == {"lr": 0.3}


def test_overrides_are_typed_and_nested(tmp_path):
    tree = apply_overrides({"inner": {"lr": 0.1}}, ["inner.lr=2e-4", "inner.sizes=[5, 6]", "steps=7",
                                                   "name=run1"])
    cfg = build_dataclass(Outer, tree)
    assert cfg.inner.lr == pytest.approx(2e-4) and isinstance(cfg.inner.lr, float)
    assert cfg.inner.sizes == (5, 6) and cfg.steps == 7 and cfg.name == "run1"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr'.*did you mean 'inner.lr'"):
        build_dataclass(Outer, {"inner": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"did you mean 'optim'"):
        build_dataclass(ExperimentConfig, {"optimm": {}})


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"inner.mode: 'c' is not one of"):
        build_dataclass(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"steps: expected an integer"):
        build_dataclass(Outer, {"steps": "many"})
    with pytest.raises(ConfigError, match=r"must look like"):
        apply_overrides({}, ["novalue"])


def test_missing_base_and_cycle_are_reported(tmp_path):
    bad = write(tmp_path / "bad.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_yaml(bad)
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "a.yaml")


def test_section_validation_errors_become_config_errors():
    with pytest.raises(ConfigError, match="layer_decay"):
        build_dataclass(ExperimentConfig, {"optim": {"layer_decay": 1.5}})


def test_experiment_defaults_and_hash(tmp_path):
    cfg = build_dataclass(ExperimentConfig, {"name": "abc", "schedule": {"max_iters": 3}})
    assert cfg.run_dir == str(Path("runs") / "abc")
    other = build_dataclass(ExperimentConfig, {"name": "abc", "schedule": {"max_iters": 4}})
    assert config_hash(cfg) != config_hash(other)
    assert config_hash(cfg) == config_hash(build_dataclass(ExperimentConfig, {"name": "abc", "schedule": {"max_iters": 3}}))
    # Resuming from an explicit checkpoint or moving the run dir is not a changed recipe.
    managed = build_dataclass(ExperimentConfig, {"name": "abc", "schedule": {"max_iters": 3}, "run_dir": "/elsewhere",
                                                 "checkpoint": {"resume": "/old/step_00000010"}})
    assert config_hash(managed) == config_hash(cfg)


SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "_base_")  # _base_/: fragments


def test_every_base_fragment_is_inherited():
    inherited = "\n".join(p.read_text() for p in SHIPPED) + "\n".join(p.read_text() for p in CONFIGS.glob("_base_/*.yaml"))
    for fragment in CONFIGS.glob("_base_/*.yaml"):
        assert fragment.name in inherited, f"{fragment} is not inherited by any shipped config"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name and cfg.task in ("detection", "segmentation")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_build(path):
    """Every shipped config builds its whole model: full-scale ones on the meta device (no memory),
    tiny ones for real."""
    import torch

    from piip6b.tasks import build_task

    cfg = load_config(path)
    device = torch.device("cpu") if path.parent.name == "tiny" else torch.device("meta")
    with device:
        backbone = cfg.model.build()
        model = build_task(cfg).build_model(backbone)
    params = list(model.parameters())
    assert params and all(p.device.type == device.type for p in params)
    if device.type == "meta":
        assert sum(p.numel() for p in backbone.parameters()) > 1e9  # the 6B presets


def test_pad_multiple_is_derived_from_the_backbone():
    cfg = load_config(CONFIGS / "segmentation" / "piip_h6b_192_upernet_80k_ade20k.yaml")
    assert cfg.data.size_divisor == 128  # branch 1 reads 192/512 = 3/8 of the input in 16 px patches
    cfg = load_config(CONFIGS / "detection" / "piip_lh6b_maskrcnn_1x_coco.yaml")
    assert cfg.data.size_divisor == 96
    cfg = load_config(CONFIGS / "detection" / "piip_h6b_maskrcnn_1x_coco.yaml", ["data.size_divisor=64"])
    assert cfg.data.size_divisor == 64  # a larger multiple of the backbone's 32 is kept


# Every count and size of every section, each with a value it must refuse (issue 14, item 13:
# `schedule.max_iters=-3` used to train nothing, write step_00000000 and exit 0).
REFUSED = [
    ("schedule.max_iters=-3", "schedule.max_iters"), ("schedule.max_iters=0", "schedule.max_iters"),
    ("schedule.max_epochs=0", "schedule.max_epochs"), ("schedule.warmup_iters=-1", "schedule.warmup_iters"),
    ("schedule.warmup_ratio=2", "schedule.warmup_ratio"), ("schedule.min_lr_ratio=-0.1", "schedule.min_lr_ratio"),
    ("schedule.gamma=0", "schedule.gamma"), ("schedule.power=0", "schedule.power"),
    ("schedule.milestones=[-1,2]", "schedule.milestones"),
    ("engine.grad_accum_steps=0", "engine.grad_accum_steps"), ("engine.hpz_partition_size=0", "engine.hpz_partition_size"),
    ("engine.reduce_bucket_size=0", "engine.reduce_bucket_size"), ("engine.prefetch_bucket_size=0", "engine.prefetch_bucket_size"),
    ("engine.max_live_parameters=0", "engine.max_live_parameters"),
    ("engine.param_persistence_threshold=-1", "engine.param_persistence_threshold"),
    ("engine.model_persistence_threshold=-1", "engine.model_persistence_threshold"),
    ("engine.max_consecutive_skips=0", "engine.max_consecutive_skips"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"), ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("checkpoint.universal_workers=0", "checkpoint.universal_workers"),
    ("logging.interval=0", "logging.interval"),
    ("evaluation.interval=-1", "evaluation.interval"), ("evaluation.visualize=-2", "evaluation.visualize"),
    ("optim.lr=0", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.betas=[0.9,1.0]", "optim.betas"), ("optim.eps=0", "optim.eps"), ("optim.clip_grad_norm=-1", "clip_grad_norm"),
    ("model.img_sizes=[0,64]", "model.img_sizes"), ("model.img_sizes=[40,64]", "model.img_sizes"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate"), ("model.grad_checkpointing=-1", "model.grad_checkpointing"),
    ("data.batch_size=0", "data.batch_size"), ("data.val_batch_size=0", "data.val_batch_size"),
    ("data.num_workers=-1", "data.num_workers"), ("data.prefetch_factor=0", "data.prefetch_factor"),
    ("data.size_divisor=0", "data.size_divisor"),
    ("data.detection.train_max_size=0", "data.detection.train_max_size"),
    ("data.detection.train_crop_size=-1", "data.detection.train_crop_size"),
    ("data.detection.test_scale=[0,800]", "data.detection.test_scale"),
    ("data.detection.detr_crop_short_sides=[0]", "data.detection.detr_crop_short_sides"),
    ("data.detection.flip_prob=2", "data.detection.flip_prob"),
    ("data.segmentation.crop_size=[0,512]", "data.segmentation.crop_size"),
    ("data.segmentation.scale=[2048,-1]", "data.segmentation.scale"),
    ("data.segmentation.test_scale=[0,0]", "data.segmentation.test_scale"),
    ("data.segmentation.cat_max_ratio=0", "data.segmentation.cat_max_ratio"),
    ("data.segmentation.ignore_index=300", "data.segmentation.ignore_index"),
    ("detection.fpn_channels=0", "detection.fpn_channels"), ("detection.rois_per_image=0", "detection.rois_per_image"),
    ("detection.rpn_post_nms_top_n_test=0", "detection.rpn_post_nms_top_n_test"),
    ("detection.detections_per_image=0", "detection.detections_per_image"),
    ("detection.anchor_sizes=[0,64,128,256,512]", "detection.anchor_sizes"),
    ("detection.mask_channels=0", "detection.mask_channels"),
]
SEG_REFUSED = [
    ("segmentation.norm_groups=0", "segmentation.norm_groups"), ("segmentation.channels=0", "segmentation.channels"),
    ("segmentation.pool_scales=[]", "segmentation.pool_scales"), ("segmentation.crop_size=[0,128]", "segmentation.crop_size"),
    ("segmentation.dropout=1", "segmentation.dropout"), ("segmentation.ignore_index=-1", "segmentation.ignore_index"),
]
TINY_DETECTION = CONFIGS / "tiny" / "piip_h6b_maskrcnn_1x_coco_tiny.yaml"
TINY_SEGMENTATION = CONFIGS / "tiny" / "piip_h6b_192_upernet_80k_ade20k_tiny.yaml"


@pytest.mark.parametrize(("config", "override", "field_name"),
                         [(TINY_DETECTION, *case) for case in REFUSED] + [(TINY_SEGMENTATION, *case) for case in SEG_REFUSED],
                         ids=[case[0] for case in REFUSED + SEG_REFUSED])
def test_every_count_and_size_is_validated_and_named(config, override, field_name):
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert field_name in str(err.value)


def test_train_refuses_an_empty_schedule_before_starting_ranks(tmp_path, capsys):
    from piip6b.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", str(TINY_DETECTION), f"run_dir={run_dir}", "schedule.max_iters=-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["piip6b train: error: schedule.max_iters must be >= 1, got -3"]
    assert not run_dir.exists()
