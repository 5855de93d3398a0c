"""The train loop on 2 gloo ranks under DeepSpeed: metrics, exact resume, bf16 dtypes.

The engine is exercised through a task-less wrapper (tiny PIIP backbone + mean-of-features loss on
deterministic random images) so these tests do not depend on the detection/segmentation heads.
Each test starts its own processes (`spawn_local`, a free port) in a subprocess with a timeout and
judges the files the run wrote, not only exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from child_env import child_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------ the wrapper task
class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + index)
        return torch.randn(3, self.size, self.size, generator=g)


class FeatureLoss(nn.Module):
    """Backbone + a linear head; loss terms: mean square of the pyramid and of the head output."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, 4)
        self.calls = 0
        self.record: dict[str, list[str]] = {}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls += 1
        feats = self.backbone(batch["images"])
        pooled = feats[-1].float().mean(dim=(2, 3))
        head_out = F.linear(pooled, self.head.weight.float(), self.head.bias.float())
        terms = {"loss_feat": sum(f.float().pow(2).mean() for f in feats),
                 "loss_head": head_out.pow(2).mean()}
        if self.calls == 2:  # the first forward after the first optimizer step
            self.record["features"] = [str(f.dtype) for f in feats]
            self.record["losses"] = [str(v.dtype) for v in terms.values()]
            self.record["params"] = sorted({str(p.dtype) for p in self.parameters()})
        return terms


class FeatureTask:
    name = "features"

    def __init__(self, n: int = 16, size: int = 64):
        self.n, self.size, self.model = n, size, None

    def build_model(self, backbone):
        self.model = FeatureLoss(backbone)
        return self.model

    def build_dataset(self, split: str):
        return RandomImages(self.n, self.size) if split == "train" else None

    def collate(self, samples):
        return {"images": torch.stack(samples)}


def _rank_main(overrides: dict, record_dtypes: bool) -> int:
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    cfg = build_dataclass(ExperimentConfig, overrides)
    task = FeatureTask()
    seen: dict[str, list[str]] = {"grid_sample": [], "interpolate_bilinear": []}
    if record_dtypes:
        original_grid, original_interp = F.grid_sample, F.interpolate

        def grid_sample(input, grid, *args, **kwargs):
            if task.model is not None and task.model.calls == 2:
                seen["grid_sample"].append(f"{input.dtype}/{grid.dtype}")
            return original_grid(input, grid, *args, **kwargs)

        def interpolate(input, *args, **kwargs):
            if task.model is not None and task.model.calls == 2 and kwargs.get("mode") == "bilinear":
                seen["interpolate_bilinear"].append(str(input.dtype))
            return original_interp(input, *args, **kwargs)

        F.grid_sample, F.interpolate = grid_sample, interpolate
    code = train(cfg, task=task)
    if record_dtypes:
        rank = int(os.environ["RANK"])
        Path(cfg.run_dir, f"dtypes_rank{rank}.json").write_text(json.dumps({**task.model.record, **seen}))
    return code


def main(argv: list[str]) -> int:
    from piip6b.engine.distributed import spawn_local

    overrides = json.loads(argv[0])
    return spawn_local(int(argv[1]), _rank_main, (overrides, len(argv) > 2))


def base_config(run_dir: Path, **sections) -> dict:
    cfg = {
        "name": "engine_test", "run_dir": str(run_dir), "seed": 3, "task": "detection",
        "model": {"preset": "piip_h6b_tiny", "img_sizes": [32, 64]},
        "data": {"batch_size": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "layer_decay": 0.9, "clip_grad_norm": 1.0},
        "schedule": {"policy": "constant", "max_iters": 6, "warmup_iters": 2},
        "engine": {"zero_stage": 3, "bf16": True},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "logging": {"interval": 1, "print_groups": True},
        "evaluation": {"at_end": False},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def run_ranks(cfg: dict, nproc: int = 2, record_dtypes: bool = False, timeout: int = 240):
    env = child_env()
    args = [sys.executable, "-c", "import sys, test_engine_train as t; sys.exit(t.main(sys.argv[1:]))",
            json.dumps(cfg), str(nproc)] + (["dtypes"] if record_dtypes else [])
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# ------------------------------------------------------------------------------ tests
def test_two_rank_zero3_bf16_metrics_and_exact_resume(tmp_path):
    straight = tmp_path / "straight"
    proc = run_ranks(base_config(straight), record_dtypes=True)
    check(proc)
    rows = read_rows(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        for key in ("loss", "lr", "grad_norm", "loss/loss_feat", "loss/loss_head", "lr/head",
                    "lr/backbone_top", "perf/images_per_s", "perf/mfu", "perf/tflops_per_device",
                    "perf/data_s", "perf/fwd_bwd_s", "perf/optim_s", "memory/peak_gib", "skipped_steps"):
            assert key in row, key
        assert torch.isfinite(torch.tensor(row["loss"])) and row["grad_norm"] > 0
        assert row["lr/backbone_top"] == pytest.approx(row["lr/head"] * 0.9)
    assert rows[0]["lr"] == pytest.approx(1e-3 * 1e-3) and rows[2]["lr"] == pytest.approx(1e-3)
    assert rows[-1]["loss"] != rows[0]["loss"]  # it trains
    assert "layer_0_decay" in proc.stdout  # the parameter-group table was printed
    assert (straight / "checkpoints" / "step_00000006" / "manifest.json").is_file()

    # bf16 storage, fp32 where it matters, after the engine's first optimizer step
    for rank in (0, 1):
        d = json.loads((straight / f"dtypes_rank{rank}.json").read_text())
        assert d["params"] == ["torch.bfloat16"]
        assert set(d["features"]) == {"torch.float32"} and set(d["losses"]) == {"torch.float32"}
        assert d["grid_sample"] and all(s == "torch.float32/torch.float32" for s in d["grid_sample"])
        assert d["interpolate_bilinear"] and set(d["interpolate_bilinear"]) == {"torch.float32"}

    # interrupted after 3 steps, resumed automatically for 4-6: the same losses bit for bit
    resumed = tmp_path / "resumed"
    check(run_ranks(base_config(resumed, schedule={"max_iters": 3})))
    check(run_ranks(base_config(resumed)))
    again = read_rows(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
    assert [r["grad_norm"] for r in again] == [r["grad_norm"] for r in rows]

    # TensorBoard: the tags are there and the curve is continuous across the resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(resumed / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "loss/loss_feat", "lr/head", "lr/backbone_top", "grad_norm", "perf/mfu",
            "perf/images_per_s", "memory/peak_gib", "skipped_steps"} <= tags
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])


def test_nonfinite_stop_saves_and_names_the_step(tmp_path):
    run_dir = tmp_path / "nan"
    # lr = inf: the first update makes every weight non-finite, so step 2's loss is NaN.
    proc = run_ranks(base_config(run_dir, optim={"lr": float("inf"), "clip_grad_norm": 0.0},
                                 schedule={"warmup_iters": 0}))
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step 2" in proc.stderr + proc.stdout
    assert (run_dir / "checkpoints" / "step_00000002" / "manifest.json").is_file()


def test_nonfinite_skip_counts_steps(tmp_path):
    run_dir = tmp_path / "skip"
    proc = run_ranks(base_config(run_dir, optim={"lr": float("inf"), "clip_grad_norm": 0.0},
                                 schedule={"warmup_iters": 0, "max_iters": 3},
                                 engine={"nonfinite": "skip"}))
    check(proc)
    rows = read_rows(run_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]
