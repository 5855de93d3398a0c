"""The train loop on 2 gloo ranks under DeepSpeed: metrics, exact resume, bf16 dtypes.

The engine is exercised through the feature task (`piip6b.testing`: tiny PIIP backbone + a
mean-of-features loss on deterministic random images), so these tests do not depend on the
detection/segmentation heads. Each run starts its own ranks (`run_ranks`: fresh processes, a free
port, a timeout) and the tests judge the files the run wrote, not only exit codes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from piip6b.testing import FeatureTask, run_ranks, tiny_experiment, train_feature_task

pytestmark = pytest.mark.slow


def _train_recording_dtypes(tree: dict) -> dict:
    """One rank of training that records, in the first forward after the first optimizer step,
    the dtypes of parameters, features, losses and the inputs of bilinear sampling."""
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    cfg = build_dataclass(ExperimentConfig, tree)
    task = FeatureTask(size=max(cfg.model.img_sizes))
    seen: dict[str, list[str]] = {"grid_sample": [], "interpolate_bilinear": [], "features": [], "losses": [],
                                  "params": []}
    second_call = lambda: task.model is not None and task.model.calls == 2  # noqa: E731
    original_grid, original_interp = F.grid_sample, F.interpolate

    def grid_sample(input, grid, *args, **kwargs):
        if second_call():
            seen["grid_sample"].append(f"{input.dtype}/{grid.dtype}")
        return original_grid(input, grid, *args, **kwargs)

    def interpolate(input, *args, **kwargs):
        if second_call() and kwargs.get("mode") == "bilinear":
            seen["interpolate_bilinear"].append(str(input.dtype))
        return original_interp(input, *args, **kwargs)

    def record(module, inputs, output):
        if second_call():
            seen["losses"] = [str(v.dtype) for v in output.values()]
            seen["params"] = sorted({str(p.dtype) for p in module.parameters()})

    def record_features(module, inputs, output):
        if second_call():
            seen["features"] = [str(f.dtype) for f in output]

    F.grid_sample, F.interpolate = grid_sample, interpolate
    original_build = task.build_model

    def build_model(backbone):
        model = original_build(backbone)
        model.register_forward_hook(record)
        backbone.register_forward_hook(record_features)
        return model

    task.build_model = build_model
    return {"code": train(cfg, task=task), **seen}


def _train_nonfinite_at(tree: dict, steps: list[int]) -> int:
    """One rank of training on the feature task whose loss is NaN at the given optimizer steps
    of this process (every rank alike; one forward per step)."""
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    cfg = build_dataclass(ExperimentConfig, tree)
    task = FeatureTask(size=max(cfg.model.img_sizes))
    original_build = task.build_model

    def build_model(backbone):
        model = original_build(backbone)

        def poison(module, inputs, output):
            if module.calls in steps:
                return {name: value * float("nan") for name, value in output.items()}
            return output

        model.register_forward_hook(poison)
        return model

    task.build_model = build_model
    return train(cfg, task=task)


def run(tree: dict, nproc: int = 2, timeout: int = 240):
    return run_ranks(train_feature_task, tree, nproc=nproc, timeout=timeout)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check(ranks) -> None:
    assert ranks.check() == [0] * len(ranks.results), ranks.tails()


# ------------------------------------------------------------------------------ tests
def test_two_rank_zero3_bf16_metrics_and_exact_resume(tmp_path):
    straight = tmp_path / "straight"
    ranks = run_ranks(_train_recording_dtypes, tiny_experiment(straight), nproc=2, timeout=240)
    recorded = ranks.check()
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
    assert "layer_0_decay" in ranks.logs[0]  # the parameter-group table was printed
    assert (straight / "checkpoints" / "step_00000006" / "manifest.json").is_file()

    # bf16 storage, fp32 where it matters, after the engine's first optimizer step
    for d in recorded:
        assert d["code"] == 0
        assert d["params"] == ["torch.bfloat16"]
        assert set(d["features"]) == {"torch.float32"} and set(d["losses"]) == {"torch.float32"}
        assert d["grid_sample"] and all(s == "torch.float32/torch.float32" for s in d["grid_sample"])
        assert d["interpolate_bilinear"] and set(d["interpolate_bilinear"]) == {"torch.float32"}

    # interrupted after 3 steps, resumed automatically for 4-6: the same losses bit for bit
    resumed = tmp_path / "resumed"
    check(run(tiny_experiment(resumed, schedule={"max_iters": 3})))
    check(run(tiny_experiment(resumed)))
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


def test_nonfinite_stop_saves_nothing_and_rerun_resumes_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    tree = tiny_experiment(run_dir)  # checkpoints at step 3 (and 6)
    ranks = run_ranks(_train_nonfinite_at, tree, [4], nproc=2, timeout=240)
    assert not ranks.timed_out and 0 not in ranks.returncodes and ranks.results == [None, None], ranks.tails()
    logs = "".join(ranks.logs)
    assert "non-finite loss or gradient at step 4" in logs
    last_good = run_dir / "checkpoints" / "step_00000003"
    assert f"a rerun resumes from the newest checkpoint, {last_good} (step 3)" in logs
    # The weights that gave the non-finite step are not saved: the newest checkpoint stays step 3.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003"]
    assert [r["step"] for r in read_rows(run_dir)] == [1, 2, 3]

    # Rerun in the same directory (the data fixed): it resumes from step 3 and finishes.
    again = run(tree)
    check(again)
    assert "resumed at step 3" in again.logs[0]
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_nonfinite_skip_is_bounded_by_consecutive_skips(tmp_path):
    run_dir = tmp_path / "skip"
    tree = tiny_experiment(run_dir, engine={"nonfinite": "skip", "max_consecutive_skips": 2})
    # Step 2 is skipped alone; 4 and 5 make two in a row (allowed); 6 is the third: stop.
    ranks = run_ranks(_train_nonfinite_at, tree, [2, 4, 5, 6], nproc=2, timeout=240)
    assert not ranks.timed_out and 0 not in ranks.returncodes and ranks.results == [None, None], ranks.tails()
    logs = "".join(ranks.logs)
    assert "non-finite loss or gradient at step 6" in logs
    assert "3 steps in a row skipped, more than engine.max_consecutive_skips=2" in logs
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003"]
