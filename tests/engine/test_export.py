"""`piip6b export`: key mapping, and a ZeRO-3 checkpoint of a model holding the tiny PIIP backbone
exported and loaded back through the weights loader (the checkpoint is written by one rank in a
fresh process, see `_worker`)."""

from __future__ import annotations

import json

import pytest
import torch

from piip6b.cli import main
from piip6b.engine.checkpoint import CheckpointError
from piip6b.engine.consolidate import find_backbone_prefix, rename_to_reference
from piip6b.testing import run_ranks
# A two-branch preset: its 0-d merge weights (w1, w2) must come out of the shards with the
# reference's shape [].
PRESET = "piip_h6b_tiny"


def test_backbone_prefix_is_found_under_any_detector_layout():
    assert find_backbone_prefix(["backbone.w1", "backbone.branch1.pos_embed", "rpn.head.conv.weight"]) == "backbone."
    assert find_backbone_prefix(["backbone.body.branch1.patch_embed.proj.weight",
                                 "backbone.fpn.inner.weight"]) == "backbone.body."
    assert find_backbone_prefix(["patch_embed.proj.weight", "blocks.0.norm1.weight"]) == ""
    assert find_backbone_prefix(["fc1.weight", "my_branch1.weight"]) is None


def test_rename_to_reference_full_model_and_backbone_only():
    names = ["backbone.body.branch1.pos_embed", "backbone.body.w1", "roi_heads.box.fc6.weight"]
    assert rename_to_reference(names, backbone_only=False) == {
        "backbone.body.branch1.pos_embed": "backbone.branch1.pos_embed",
        "backbone.body.w1": "backbone.w1",
        "roi_heads.box.fc6.weight": "roi_heads.box.fc6.weight",
    }
    assert rename_to_reference(names, backbone_only=True) == {
        "backbone.body.branch1.pos_embed": "branch1.pos_embed",
        "backbone.body.w1": "w1",
    }
    with pytest.raises(CheckpointError, match="no backbone found"):
        rename_to_reference(["fc1.weight"], backbone_only=True)


def test_export_of_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(["export", str(tmp_path / "empty_run"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--step", "7", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "step_00000007 does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
class _Detector(torch.nn.Module):
    """Stands in for a task model: the backbone under `backbone.`, a head beside it."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Conv2d(backbone.out_channels, 3, 1)


class _DetectorTask:
    def build_model(self, backbone: torch.nn.Module) -> _Detector:
        return _Detector(backbone)


def _worker(run_dir: str, out: str) -> None:
    """Build the model as the trainer does (every parameter partitioned), save step 1, and write
    the full fp32 masters to `out` for comparison."""
    from deepspeed.utils import safe_get_full_fp32_param

    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.engine import distributed
    from piip6b.engine.build import build_engine
    from piip6b.engine.checkpoint import CheckpointManager
    from piip6b.testing import tiny_experiment

    env = distributed.init_distributed()
    cfg = build_dataclass(ExperimentConfig, tiny_experiment(
        run_dir, seed=0, model={"preset": PRESET, "img_sizes": None}, data={"batch_size": 1},
        engine={"zero_stage": 3, "bf16": True, "param_persistence_threshold": 0}))
    engine = build_engine(cfg, _DetectorTask(), env).engine
    CheckpointManager(run_dir).save(engine, 1, {"config_hash": "beef"})
    full = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    torch.save(full, out)
    distributed.teardown(engine)


@pytest.mark.slow
def test_export_round_trip_through_weights_loader(tmp_path):
    from piip6b.models import create_backbone
    from piip6b.weights import load_pretrained

    params_file = tmp_path / "params.pt"
    run_ranks(_worker, str(tmp_path / "run"), str(params_file), nproc=1, timeout=180).check()
    gathered = torch.load(params_file)

    full_file, backbone_file = tmp_path / "model.safetensors", tmp_path / "backbone.safetensors"
    assert main(["export", str(tmp_path / "run"), "--out", str(full_file), "--dtype", "fp32"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(backbone_file), "--dtype", "fp32", "--backbone-only"]) == 0

    # The whole model, loaded into a fresh copy of it, reproduces the fp32 masters exactly.
    torch.manual_seed(1)
    detector = _Detector(create_backbone(PRESET))
    load_pretrained(detector, full_file, log=None)
    for name, value in detector.named_parameters():
        assert torch.equal(value, gathered[name]), name
    # The backbone-only file holds bare reference keys and loads into a bare backbone.
    from safetensors import safe_open

    with safe_open(backbone_file, "pt") as handle:
        keys = set(handle.keys())
        assert json.loads(json.dumps(handle.metadata()))["piip6b.step"] == "1"
    backbone = create_backbone(PRESET)
    assert keys == set(backbone.state_dict())
    with safe_open(backbone_file, "pt") as handle:
        assert handle.get_slice("w1").get_shape() == []  # the reference's scalar, not [1]
    load_pretrained(backbone, backbone_file, log=None)
    for name, value in backbone.named_parameters():
        assert torch.equal(value, gathered["backbone." + name]), name

