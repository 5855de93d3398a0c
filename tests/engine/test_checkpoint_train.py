"""Through the real train loop: a run checkpointed by 2 ranks continues on 1 rank.

Exercises what the MLP tests in test_checkpoint.py cannot: the trainer's zero.Init-built tiny PIIP
backbone with layer-decay parameter groups, its client state (consumed samples), and the automatic
universal conversion inside `piip6b.train`, on the feature task (`piip6b.testing`). The test
judges the files the runs wrote.
"""

from __future__ import annotations

import json

import pytest
import torch

from piip6b.engine.checkpoint import CheckpointManager, tag_for_step
from piip6b.testing import run_ranks, tiny_experiment, train_feature_task

pytestmark = pytest.mark.slow


def _config(run_dir, max_iters: int) -> dict:
    # A recipe of 4 images per step: 2 ranks x 2, then 1 rank x 2 forwards of 2 after the resume.
    return tiny_experiment(run_dir, seed=5, data={"global_batch": 4, "batch_size": 2},
                           optim={"lr": 1e-3, "layer_decay": 0.9, "clip_grad_norm": 0.0},
                           schedule={"max_iters": max_iters, "warmup_iters": 1},
                           checkpoint={"every_steps": 100}, logging={"print_groups": False})


def test_two_rank_run_resumes_on_one_rank(tmp_path):
    run_dir = tmp_path / "run"
    first = run_ranks(train_feature_task, _config(run_dir, 3), 64, nproc=2)
    assert first.check() == [0, 0]
    assert (run_dir / "checkpoints" / tag_for_step(3) / "manifest.json").is_file(), first.tails()
    second = run_ranks(train_feature_task, _config(run_dir, 5), 64, nproc=1)
    assert second.check() == [0]
    output = second.logs[0]
    assert "converting it to a DeepSpeed universal checkpoint" in output, output[-4000:]
    assert "resumed at step 3 (12 samples consumed)" in output, output[-4000:]  # 2 ranks x 2 x 3 steps

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["samples"] for r in rows] == [4, 8, 12, 16, 20]  # the same global batch on either side
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    newest = CheckpointManager(run_dir).find_resume()
    assert newest is not None and newest.name == tag_for_step(5)
    assert CheckpointManager.validate(newest).world_size == 1
