"""`piip6b eval CONFIG --weights FILE`: loads an exported model exactly and reproduces its metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from piip6b.cli import main
from piip6b.config import load_config
from piip6b.evaluate import load_model_weights
from piip6b.tasks import build_task
from piip6b.tasks.data import ShapesSpec, build_dataloader, write_shapes_dataset
from piip6b.testing import REPO, child_env
from piip6b.weights import save_state_dict

CONFIG = "configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    shapes = write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data",
                                  ShapesSpec(num_train=2, num_val=3, min_size=96, max_size=128))
    return [f"data.root={shapes / 'coco'}", "data.val_batch_size=2", "data.detection.test_scale=[160,96]",
            "engine.bf16=false", "detection.fpn_channels=32", "detection.box_head_dim=64",
            "detection.mask_channels=32", "detection.score_threshold=0.0"]


def _eval(weights, out, overrides) -> int:
    return main(["eval", CONFIG, *overrides, "--weights", str(weights), "--out", str(out)])


def test_eval_command_reproduces_in_memory_metrics(tmp_path, overrides):
    cfg = load_config(CONFIG, overrides)
    task = build_task(cfg)
    torch.manual_seed(123)  # weights the command's own initialisation cannot guess
    model = task.build_model(cfg.model.build()).eval()
    loader = build_dataloader(task.build_dataset("val"), cfg.data, task.eval_collate, train=False)
    expected = task.evaluate(model, loader).to_json()
    weights = tmp_path / "model.safetensors"
    save_state_dict(weights, model.state_dict())

    # The loader fills every tensor exactly (an untrained model's AP alone could not tell).
    fresh = task.build_model(cfg.model.build())
    load_model_weights(fresh, weights, verbose=False)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name

    predictions = tmp_path / "predictions.json"
    assert main(["eval", CONFIG, *overrides, "--weights", str(weights), "--out", str(tmp_path / "metrics.json"),
                 "--out-predictions", str(predictions)]) == 0
    got = json.loads((tmp_path / "metrics.json").read_text())
    per_class = got.pop("per_class")
    assert per_class == expected.pop("per_class")  # by class name; null where not applicable
    assert got == pytest.approx(expected, abs=1e-9)
    assert got["num_images"] == 3 and "segm/AP" in got
    assert {p["image_id"] for p in json.loads(predictions.read_text())} <= set(task.build_dataset("val").image_ids)


def test_backbone_only_file_is_refused(tmp_path, overrides, capsys):
    cfg = load_config(CONFIG, overrides)
    backbone = cfg.model.build()
    weights = tmp_path / "backbone.safetensors"
    save_state_dict(weights, {f"backbone.{k}": v for k, v in backbone.state_dict().items()})
    assert _eval(weights, tmp_path / "metrics.json", overrides) == 2
    err = capsys.readouterr().err
    assert "has no values for neck." in err and "without --backbone-only" in err
    assert not (tmp_path / "metrics.json").exists()


def test_missing_weights_path(tmp_path, overrides, capsys):
    assert _eval(tmp_path / "nope.safetensors", tmp_path / "m.json", overrides) == 2
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_print_and_write_the_metrics_once(tmp_path, overrides):
    """`piip6b eval --nproc 2`: rank 0 alone prints the metrics and writes --out (issue 14, item 12),
    and they are the metrics one process finds (one image per forward: the split into ranks and
    batches does not matter)."""
    cfg = load_config(CONFIG, overrides)
    task = build_task(cfg)
    torch.manual_seed(7)
    model = task.build_model(cfg.model.build()).eval()
    weights = tmp_path / "model.safetensors"
    save_state_dict(weights, model.state_dict())
    assert _eval(weights, tmp_path / "one_rank.json", overrides) == 0

    out = tmp_path / "two_ranks.json"
    done = subprocess.run([sys.executable, "-m", "piip6b.cli", "eval", CONFIG, *overrides, "--weights", str(weights),
                           "--nproc", "2", "--out", str(out)], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count('"num_images"') == 1, done.stdout
    printed = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert printed == json.loads(out.read_text())
    assert out.read_text() == (tmp_path / "one_rank.json").read_text()
