"""Through the real train loop: a run checkpointed by 2 ranks continues on 1 rank.

Exercises what the MLP tests in test_checkpoint.py cannot: the trainer's zero.Init-built tiny PIIP
backbone with layer-decay parameter groups, its client state (consumed samples), and the automatic
universal conversion inside `piip6b.train`. Ranks are started with `spawn_local` in a subprocess
(this file run as a script) with a timeout; the test judges the files the runs wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piip6b.engine.checkpoint import CheckpointManager, tag_for_step
from child_env import child_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


class _RandomImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(index))


class _FeatureLoss(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss_feat": sum(f.float().pow(2).mean() for f in self.backbone(batch["images"]))}


class _FeatureTask:
    """The engine path without a task head (heads are tested by their own tests)."""

    name = "features"

    def build_model(self, backbone):
        return _FeatureLoss(backbone)

    def build_dataset(self, split: str):
        return _RandomImages() if split == "train" else None

    def collate(self, samples):
        return {"images": torch.stack(samples)}


def _rank_main(overrides: dict) -> int:
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    return train(build_dataclass(ExperimentConfig, overrides), task=_FeatureTask())


def _config(run_dir: Path, max_iters: int) -> dict:
    return {
        "name": "ckpt_world_change", "run_dir": str(run_dir), "seed": 5, "task": "detection",
        "model": {"preset": "piip_h6b_tiny", "img_sizes": [32, 64]},
        "data": {"batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "layer_decay": 0.9},
        "schedule": {"policy": "constant", "max_iters": max_iters, "warmup_iters": 1},
        "engine": {"zero_stage": 3, "bf16": True},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
        "logging": {"interval": 1, "print_groups": False},
        "evaluation": {"at_end": False},
    }


def _run(cfg: dict, nproc: int) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run([sys.executable, __file__, json.dumps(cfg), str(nproc)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)


def test_two_rank_run_resumes_on_one_rank(tmp_path):
    run_dir = tmp_path / "run"
    first = _run(_config(run_dir, 3), nproc=2)
    assert (run_dir / "checkpoints" / tag_for_step(3) / "manifest.json").is_file(), first.stderr[-4000:]
    second = _run(_config(run_dir, 5), nproc=1)
    output = second.stdout + second.stderr
    assert "converting it to a DeepSpeed universal checkpoint" in output, output[-4000:]
    assert "resumed at step 3 (12 samples consumed)" in output, output[-4000:]  # 2 ranks x 2 x 3 steps

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    newest = CheckpointManager(run_dir).find_resume()
    assert newest is not None and newest.name == tag_for_step(5)
    assert CheckpointManager.validate(newest).world_size == 1


if __name__ == "__main__":
    from piip6b.engine.distributed import spawn_local

    sys.exit(spawn_local(int(sys.argv[2]), _rank_main, (json.loads(sys.argv[1]),)))
