"""`piip6b export`: key mapping, and a ZeRO-3 checkpoint of a model holding the tiny PIIP backbone
exported and loaded back through the weights loader (one rank in a subprocess, this file run as a
script; see `_worker`)."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piip6b.commands.export import find_backbone_prefix, rename_to_reference
from piip6b.engine.checkpoint import CheckpointError
from child_env import child_env

REPO = Path(__file__).resolve().parent.parent
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
    from piip6b.commands import export

    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    assert export.run(parser.parse_args([str(tmp_path / "nope"), "--out", str(tmp_path / "m.safetensors")])) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert export.run(parser.parse_args([str(tmp_path), "--step", "7", "--out", str(tmp_path / "m.safetensors")])) == 2
    assert "step_00000007 does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
class _Detector(torch.nn.Module):
    """Stands in for a task model: the backbone under `backbone.`, a head beside it."""

    def __init__(self) -> None:
        super().__init__()
        from piip6b.models import create_backbone

        self.backbone = create_backbone(PRESET)
        self.head = torch.nn.Conv2d(self.backbone.out_channels, 3, 1)


def _worker(run_dir: str, out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from piip6b.engine.checkpoint import CheckpointManager

    from piip6b.engine.sharding import EngineConfig, cast_partitioned_params, initialize, model_construction

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    with model_construction(EngineConfig(zero_stage=3), config):  # as the trainer builds it
        model = _Detector()
    cast_partitioned_params(model, torch.bfloat16)
    engine, _ = initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), config)
    CheckpointManager(run_dir).save(engine, 1, {"config_hash": "beef"})
    full = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    torch.save(full, out)
    engine.destroy()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_export_round_trip_through_weights_loader(tmp_path):
    from piip6b.commands import export
    from piip6b.models import create_backbone
    from piip6b.weights import load_pretrained

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = child_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    params_file = tmp_path / "params.pt"
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "run"), str(params_file)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert params_file.is_file(), f"worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    gathered = torch.load(params_file)

    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    full_file, backbone_file = tmp_path / "model.safetensors", tmp_path / "backbone.safetensors"
    assert export.run(parser.parse_args([str(tmp_path / "run"), "--out", str(full_file), "--dtype", "fp32"])) == 0
    assert export.run(parser.parse_args([str(tmp_path / "run"), "--out", str(backbone_file), "--dtype", "fp32",
                                         "--backbone-only"])) == 0

    # The whole model, loaded into a fresh copy of it, reproduces the fp32 masters exactly.
    torch.manual_seed(1)
    detector = _Detector()
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


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
