"""Checkpoints: atomicity, retention, discovery, exact resume, 2 -> 1 rank resume, export;
checksums and what corruption, planted pickles and a full disk do.

The multi-rank runs use a tiny MLP under DeepSpeed ZeRO-3 + bf16 on gloo. Each rank runs
`_worker` in a fresh process (`run_ranks`) and returns its results; the tests judge those results
and the files the ranks wrote rather than exit codes. Three launches are shared by all
tests (module fixtures): A trains steps 1-6 on 2 ranks saving at 1, 2, 3, 6 (keep_last=3);
B resumes A's step 3 on 2 ranks and trains 4-6; C resumes A's step 6 on 1 rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from piip6b.engine.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointManager,
    CheckpointSpaceError,
    Manifest,
    file_digest,
    load_rng_file,
    tag_for_step,
    weights_only_loads,
)
from piip6b.testing import fill_filesystem, run_ranks, small_filesystem

SEED = 1234
MICRO_BATCH = 4
SAVE_STEPS = (1, 2, 3, 6)


# ---------------------------------------------------------------------------------------------
# The worker (one rank), started by `_launch`
# ---------------------------------------------------------------------------------------------
def _ds_config(zero_stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.05, "torch_adam": True}},
        # The lr changes every step, so a scheduler restored wrongly shows in the losses.
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                      "warmup_num_steps": 8}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def _build_model() -> torch.nn.Module:
    class TinyMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 32)
            self.drop = torch.nn.Dropout(0.2)  # draws from the rank's torch RNG every step
            self.fc2 = torch.nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.fc1.weight.dtype)
            return self.fc2(self.drop(torch.nn.functional.gelu(self.fc1(x)))).float()

    torch.manual_seed(0)  # identical initial weights on every rank
    return TinyMLP()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-local batch from all three global RNGs, so each must be restored per rank."""
    import random

    import numpy as np

    x = torch.randn(MICRO_BATCH, 16)
    y = torch.from_numpy(np.random.standard_normal((MICRO_BATCH, 8))).float() * random.uniform(0.5, 1.5)
    return x, y


def _probe(engine) -> float:
    """Loss on a fixed batch in eval mode: the same number on any world size for equal weights."""
    engine.eval()
    x = torch.linspace(-2, 2, MICRO_BATCH * 16).reshape(MICRO_BATCH, 16)
    y = torch.linspace(-1, 1, MICRO_BATCH * 8).reshape(MICRO_BATCH, 8)
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.train()
    return loss.item()


def _probe_step(engine) -> None:
    """One optimizer step on the fixed batch on every rank (eval mode: no dropout), so the mean
    gradient equals the single-rank one and the step exercises the restored optimizer state."""
    engine.eval()
    x = torch.linspace(-2, 2, MICRO_BATCH * 16).reshape(MICRO_BATCH, 16)
    y = torch.linspace(-1, 1, MICRO_BATCH * 8).reshape(MICRO_BATCH, 8)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    engine.train()


def _worker(argv: list[str], params_out: str) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from piip6b.seeding import derive_seed, seed_everything

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", default="")
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--zero-stage", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _build_model()
    seed_everything(derive_seed(SEED, rank))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_ds_config(args.zero_stage))
    manager = CheckpointManager(args.run_dir, keep_last=args.keep_last)
    save_steps = {int(s) for s in args.save_steps.split(",") if s}

    result: dict = {"rank": rank, "world": world, "losses": {}}
    start = 0
    path = manager.find_resume(args.resume)
    if path is not None:
        state = manager.load(engine, path)
        start = state["step"]
        result["resumed"] = {"path": str(path), "step": start, "epoch": state["epoch"],
                             "consumed_samples": state["consumed_samples"]}
        result["probe_after_load"] = _probe(engine)
    for step in range(start + 1, args.steps + 1):
        x, y = _batch(step)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        result["losses"][str(step)] = loss.item()
        if step in save_steps:
            manager.save(engine, step, {"epoch": 0, "consumed_samples": step * MICRO_BATCH * world,
                                        "seed": SEED, "config": {"lr": 1e-2}, "config_hash": "cafe"})
    result["probe_end"] = _probe(engine)
    full = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(full, params_out)
    _probe_step(engine)
    result["probe_after_step"] = _probe(engine)
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()
    result["done"] = True
    return result


# ---------------------------------------------------------------------------------------------
# Launching ranks
# ---------------------------------------------------------------------------------------------
def _launch(world: int, out_dir: Path, extra: list[str], timeout: float = 240) -> list[dict]:
    """Run `_worker` on `world` ranks; rank 0's full parameters go to out_dir/rank0.params.pt and
    every rank's log to out_dir/rank<r>.log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = run_ranks(_worker, extra, str(out_dir / "rank0.params.pt"), nproc=world, timeout=timeout)
    for rank, log in enumerate(ranks.logs):
        (out_dir / f"rank{rank}.log").write_text(log)
    results = ranks.check()
    assert all(result.get("done") for result in results), ranks.tails()
    return results


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt_a")
    results = _launch(2, base / "out", ["--run-dir", str(base / "run"), "--steps", "6",
                                        "--save-steps", ",".join(map(str, SAVE_STEPS)), "--keep-last", "3"])
    return base, results


@pytest.fixture(scope="module")
def run_b(run_a, tmp_path_factory):
    base_a, _ = run_a
    base = tmp_path_factory.mktemp("ckpt_b")
    resume = base_a / "run" / "checkpoints" / tag_for_step(3)
    results = _launch(2, base / "out", ["--run-dir", str(base / "run"), "--steps", "6",
                                        "--resume", str(resume)])
    return base, results


@pytest.fixture(scope="module")
def run_c(run_a, tmp_path_factory):
    base_a, _ = run_a
    base = tmp_path_factory.mktemp("ckpt_c")
    resume = base_a / "run" / "checkpoints" / tag_for_step(6)
    results = _launch(1, base / "out", ["--run-dir", str(base / "run"), "--steps", "6",
                                        "--resume", str(resume)])
    return base, results


# ---------------------------------------------------------------------------------------------
# Multi-rank tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_save_writes_manifest_latest_and_applies_retention(run_a):
    base, results = run_a
    root = base / "run" / "checkpoints"
    # keep_last=3 of saves at 1, 2, 3, 6: step 1 deleted once step 6 was complete.
    assert sorted(p.name for p in root.glob("step_*")) == [tag_for_step(s) for s in (2, 3, 6)]
    assert (root / "latest").read_text().strip() == tag_for_step(6)
    manifest = CheckpointManager.validate(root / tag_for_step(6))
    assert (manifest.step, manifest.world_size, manifest.zero_stage) == (6, 2, 3)
    assert manifest.config_hash == "cafe"
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(manifest.files)
    assert sum(name.endswith("optim_states.pt") for name in manifest.files) == 2
    # The two ranks drew different data: their RNG streams really are per rank.
    assert results[0]["losses"]["1"] != results[1]["losses"]["1"]


@pytest.mark.slow
def test_resume_is_bit_exact_at_same_world_size(run_a, run_b):
    _, results_a = run_a
    _, results_b = run_b
    for rank in range(2):
        a, b = results_a[rank], results_b[rank]
        assert b["resumed"]["step"] == 3
        assert b["resumed"]["consumed_samples"] == 3 * MICRO_BATCH * 2
        assert sorted(b["losses"]) == ["4", "5", "6"]
        for step in ("4", "5", "6"):
            assert b["losses"][step] == a["losses"][step], (rank, step)  # bit for bit
        assert b["probe_end"] == a["probe_end"]


@pytest.mark.slow
def test_resume_on_fewer_ranks_converts_to_universal(run_a, run_c):
    base_a, results_a = run_a
    base_c, results_c = run_c
    (c,) = results_c
    assert c["world"] == 1 and c["resumed"]["step"] == 6 and c["losses"] == {}
    # Same weights (probe loss on a fixed batch), then the same optimizer step on the same data.
    assert c["probe_after_load"] == results_a[0]["probe_end"]
    assert c["probe_after_step"] == results_a[0]["probe_after_step"]
    universal = base_c / "run" / "checkpoints" / "universal" / tag_for_step(6)
    assert (universal / "zero").is_dir()
    log = (base_c / "out" / "rank0.log").read_text()
    assert "converting it to a DeepSpeed universal checkpoint" in log
    # The source run's folder is left as it was.
    assert not (base_a / "run" / "checkpoints" / "universal").exists()


@pytest.mark.slow
def test_export_round_trip(run_a, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from piip6b.cli import main

    base, _ = run_a
    gathered = torch.load(base / "out" / "rank0.params.pt")  # full fp32 masters after step 6
    out32 = tmp_path / "model32.safetensors"
    assert main(["export", str(base / "run"), "--out", str(out32), "--dtype", "fp32"]) == 0
    tensors = load_file(out32)
    assert set(tensors) == set(gathered)
    for name, value in gathered.items():
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name], value), name
    with safe_open(out32, "pt") as handle:
        meta = handle.metadata()
    assert meta["piip6b.step"] == "6" and meta["piip6b.config_hash"] == "cafe"

    out16 = tmp_path / "model16.safetensors"
    assert main(["export", str(base / "run"), "--step", "3", "--out", str(out16)]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_file(out16).values())


# ---------------------------------------------------------------------------------------------
# Discovery and atomicity on copies of run A's checkpoints (no processes needed)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def run_copy(run_a, tmp_path):
    base, _ = run_a
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    return run


@pytest.mark.slow
def test_auto_resume_picks_newest_complete(run_copy):
    assert CheckpointManager(run_copy).find_resume() == run_copy / "checkpoints" / tag_for_step(6)
    assert CheckpointManager(run_copy.parent / "fresh").find_resume() is None


@pytest.mark.slow
def test_missing_manifest_is_skipped_with_a_message(run_copy, caplog):
    newest = run_copy / "checkpoints" / tag_for_step(6)
    (newest / MANIFEST_NAME).unlink()  # as if the job died before all ranks had written
    with caplog.at_level("WARNING"):
        found = CheckpointManager(run_copy).find_resume()
    assert found == run_copy / "checkpoints" / tag_for_step(3)
    assert f"{newest} is incomplete" in caplog.text


@pytest.mark.slow
def test_truncated_shard_is_skipped_with_a_message(run_copy, caplog):
    newest = run_copy / "checkpoints" / tag_for_step(6)
    shard = next(newest.glob("*optim_states.pt"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        found = CheckpointManager(run_copy).find_resume()
    assert found == run_copy / "checkpoints" / tag_for_step(3)
    assert f"{shard.name} has" in caplog.text and "truncated" in caplog.text


@pytest.mark.slow
def test_manifest_records_each_files_sha256(run_copy):
    newest = run_copy / "checkpoints" / tag_for_step(6)
    manifest = CheckpointManager.validate(newest)
    assert manifest.format == 2 and set(manifest.checksums) == set(manifest.files)
    for name, digest in manifest.checksums.items():
        assert hashlib.sha256((newest / name).read_bytes()).hexdigest() == digest, name
    assert "model_shapes.json" in manifest.files


@pytest.mark.slow
def test_corruption_that_keeps_the_size_falls_back_to_the_newest_that_verifies(run_copy, caplog):
    """Zeroed blocks at the end of a shard keep its size: only the checksums tell. Every restart
    must pass over such checkpoints (one line each), not crash in the loader."""
    checkpoints = run_copy / "checkpoints"
    damaged = {}
    for step in (6, 3):
        shard = next((checkpoints / tag_for_step(step)).glob("*optim_states.pt"))
        size = shard.stat().st_size
        with open(shard, "r+b") as handle:
            handle.seek(-4096, os.SEEK_END)
            handle.write(bytes(4096))
        assert shard.stat().st_size == size
        damaged[step] = shard.name
    with caplog.at_level("WARNING"):
        found = CheckpointManager(run_copy).find_resume()
    assert found == checkpoints / tag_for_step(2)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 2, skipped
    for message, (step, shard) in zip(skipped, damaged.items()):
        assert tag_for_step(step) in message and shard in message and "sha256" in message and "\n" not in message
    with pytest.raises(CheckpointError, match=f"{tag_for_step(6)} is corrupt: {damaged[6]}"):
        CheckpointManager(run_copy).find_resume(checkpoints / tag_for_step(6))


@pytest.mark.slow
def test_deepspeed_shards_load_with_the_weights_only_unpickler(run_copy):
    """What DeepSpeed 0.19's loader reads with weights_only=False reads under `weights_only_loads`
    too: the model and optimizer states hold tensors, plain data and the allow-listed DeepSpeed
    records only (the resume tests above load through it end to end)."""
    newest = run_copy / "checkpoints" / tag_for_step(6)
    shards = sorted(newest.glob("*_states.pt"))
    assert len(shards) == 4
    with weights_only_loads():
        for shard in shards:
            state = torch.load(shard, map_location="cpu", weights_only=False)  # what DeepSpeed asks for
            assert isinstance(state, dict)


@pytest.mark.slow
def test_explicit_resume_that_cannot_be_loaded_raises(run_copy, tmp_path):
    manager = CheckpointManager(tmp_path / "other")
    with pytest.raises(CheckpointError, match="no such file"):
        manager.find_resume(tmp_path / "does_not_exist")
    broken = run_copy / "checkpoints" / tag_for_step(6)
    (broken / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        manager.find_resume(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        manager.find_resume(tmp_path / "empty")
    # A run dir means its newest complete checkpoint.
    assert manager.find_resume(run_copy) == run_copy / "checkpoints" / tag_for_step(3)
    for path in (run_copy / "checkpoints").glob("step_*"):
        (path / MANIFEST_NAME).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        manager.find_resume(run_copy)


# ---------------------------------------------------------------------------------------------
# Pure unit tests (fast)
# ---------------------------------------------------------------------------------------------
class _FakeEngine:
    """Writes one model-states file per save, like a 1-rank DeepSpeed engine would."""

    module = torch.nn.Linear(4, 2)

    def zero_optimization_stage(self) -> int:
        return 3

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is the manager's, replaced only when complete
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(dict(client_state), folder / "mp_rank_00_model_states.pt")


def test_save_retention_and_leftovers_without_deepspeed(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2)
    root = tmp_path / "checkpoints"
    engine = _FakeEngine()
    manager.save(engine, 1, {"config_hash": "x"})
    manager.save(engine, 2, {"config_hash": "x"})
    (root / tag_for_step(3)).mkdir()  # a save that died before its manifest
    corrupt = root / tag_for_step(0)  # complete once, then damaged: kept for inspection
    shutil.copytree(root / tag_for_step(1), corrupt)
    (corrupt / MANIFEST_NAME).write_text((corrupt / MANIFEST_NAME).read_text().replace('"step": 1', '"step": 0'))
    (corrupt / "mp_rank_00_model_states.pt").write_bytes(b"")
    (root / tag_for_step(5)).mkdir()  # an unfinished save at the step about to be written
    (root / tag_for_step(5) / "mp_rank_00_model_states.pt").write_bytes(b"partial")

    with caplog.at_level("INFO"):
        manager.save(engine, 4, {"config_hash": "x"})
    assert sorted(p.name for p in root.glob("step_*")) == [tag_for_step(s) for s in (0, 2, 4, 5)]
    assert "deleting unfinished checkpoint" in caplog.text and "retention (keep_last=2)" in caplog.text
    assert (root / "latest").read_text().strip() == tag_for_step(4)

    manager.save(engine, 5, {"config_hash": "x"})  # replaces the unfinished folder
    assert CheckpointManager.validate(root / tag_for_step(5)).step == 5
    written = (root / tag_for_step(5) / MANIFEST_NAME).stat().st_mtime_ns
    manager.save(engine, 5, {"config_hash": "x"})  # e.g. preempted right after a periodic save
    assert (root / tag_for_step(5) / MANIFEST_NAME).stat().st_mtime_ns == written
    assert [p.name for p in manager.complete_checkpoints()] == [tag_for_step(5), tag_for_step(4)]
    state = torch.load(root / tag_for_step(5) / "mp_rank_00_model_states.pt", weights_only=True)
    assert state["step"] == 5 and state["world_size"] == 1 and state["code_version"]


def test_manifest_round_trip_and_format_check():
    manifest = Manifest(tag="step_00000005", step=5, world_size=2, zero_stage=3,
                        files={"mp_rank_00_model_states.pt": 10}, config_hash=None,
                        code_version="0.1.0", created="2025-01-01T00:00:00+00:00")
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(ValueError, match="unknown manifest format"):
        Manifest.from_json(json.dumps({"format": 99}))


def test_rng_state_round_trip():
    import random

    import numpy as np

    from piip6b.engine.rng import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_newer_checkpoints_are_set_aside_not_reused_or_deleted(tmp_path):
    """Resuming from an older checkpoint (or starting afresh in a used run dir) moves the newer
    ones aside: a later save at the same step must write, and retention must not count them.
    An unfinished one (no manifest: its save was cut short, e.g. by a full disk) cannot be loaded
    and is deleted, which gives its space back."""
    from piip6b.engine.checkpoint import ABANDONED_SUBDIR, CheckpointManager, tag_for_step

    manager = CheckpointManager(tmp_path, keep_last=1)
    for step in (2, 4, 6, 7):
        folder = manager.root / tag_for_step(step)
        folder.mkdir(parents=True)
        (folder / "marker").write_text(str(step))
        if step != 7:
            (folder / MANIFEST_NAME).write_text("{}")  # finished once (its contents do not matter here)
    manager.set_aside_newer_than(2)
    assert sorted(p.name for p in manager.root.iterdir() if p.name.startswith("step_")) == [tag_for_step(2)]
    aside = sorted(p.name.split("-")[0] for p in (manager.root / ABANDONED_SUBDIR).iterdir())
    assert aside == [tag_for_step(4), tag_for_step(6)]
    assert all((p / "marker").is_file() for p in (manager.root / ABANDONED_SUBDIR).iterdir())
    manager.set_aside_newer_than(0)  # a fresh start: everything goes aside
    assert not any(p.name.startswith("step_") for p in manager.root.iterdir())


class _Payload:
    """Unpickling it writes a file: what a planted pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


def test_planted_pickle_in_an_rng_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "payload_ran"
    rng_file = tmp_path / "step_00000004" / "rng" / "rank_00000.pt"
    rng_file.parent.mkdir(parents=True)
    from piip6b.engine.rng import capture_rng_state

    torch.save({**capture_rng_state(), "python": _Payload(marker)}, rng_file)
    with pytest.raises(CheckpointError, match="holds more than tensors and plain data") as error:
        load_rng_file(rng_file)
    assert "\n" not in str(error.value) and "rng/rank_00000.pt" in str(error.value)
    assert not marker.exists()
    torch.save(capture_rng_state(), rng_file)  # what the trainer writes loads
    assert set(load_rng_file(rng_file)) >= {"python", "numpy", "torch_cpu"}


def test_planted_pickle_in_a_deepspeed_shard_is_refused_not_run(tmp_path):
    """DeepSpeed's loader asks torch.load for weights_only=False; inside `weights_only_loads` that
    is overridden, so a shard with code in it fails to load instead of running it."""
    marker = tmp_path / "payload_ran"
    shard = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": _Payload(marker)}}, shard)
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(shard, weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # only inside


def test_rng_files_of_earlier_checkpoints_still_load(tmp_path):
    """Before RNG states were plain data they held NumPy's own state tuple (an ndarray)."""
    import numpy as np

    from piip6b.engine.rng import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    state["numpy"] = np.random.get_state()
    legacy = tmp_path / "rank_00000.pt"
    torch.save(state, legacy)
    expected = np.random.rand(3)
    restore_rng_state(load_rng_file(legacy))
    assert np.array_equal(np.random.rand(3), expected)


class _LargeEngine(_FakeEngine):
    """Writes a 2 MiB model-states file."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": torch.zeros(2**19), **client_state}, folder / "mp_rank_00_model_states.pt")


@pytest.fixture
def small_disk(tmp_path):
    try:
        with small_filesystem(tmp_path / "disk", 1 << 20) as mount:
            yield mount
    except PermissionError as error:
        pytest.skip(str(error))


def test_full_disk_before_a_save_is_one_line_and_nothing_is_written(small_disk):
    manager = CheckpointManager(small_disk / "run", keep_last=2)
    manager.save(_FakeEngine(), 1, {})
    needed = sum(CheckpointManager.validate(manager.root / tag_for_step(1)).files.values())
    fill_filesystem(small_disk, leave_bytes=needed // 2)
    with pytest.raises(CheckpointSpaceError) as error:
        manager.save(_FakeEngine(), 2, {})
    message = str(error.value)
    assert "\n" not in message
    assert f"no room for checkpoint {tag_for_step(2)}" in message and f"mounted at {small_disk}" in message
    assert "checkpoint.keep_last" in message and f"resumes from {tag_for_step(1)}" in message
    assert not (manager.root / tag_for_step(2)).exists()


def test_full_disk_during_a_save_is_one_line_and_the_restart_recovers(small_disk, caplog):
    """torch.save on a full disk says "basic_ios::clear: iostream error" (or "file write failed"):
    the error names the disk and what to free, and a restart on the still-full disk deletes the
    partial checkpoint (getting its space back) and keeps going through the metrics bookkeeping."""
    from piip6b.engine.metrics import LoggingConfig, MetricsWriter

    run = small_disk / "run"
    manager = CheckpointManager(run, keep_last=2)
    manager.save(_FakeEngine(), 1, {})
    writer = MetricsWriter(run, LoggingConfig(console=False), True, total_steps=3)
    for step in (1, 2):
        writer.log(step, {"loss": float(step)})
    writer.close()
    with pytest.raises(CheckpointSpaceError) as error:
        manager.save(_LargeEngine(), 2, {})  # 2 MiB into a 1 MiB file system
    message = str(error.value)
    assert "\n" not in message
    assert f"writing checkpoint {manager.root / tag_for_step(2)} failed, the disk is full" in message
    assert f"mounted at {small_disk}" in message and f"resumes from {tag_for_step(1)}" in message
    assert (manager.root / tag_for_step(2)).is_dir() and not CheckpointManager(run).complete_checkpoints()[0].name.endswith("2")

    fill_filesystem(small_disk)  # still full when the job restarts
    restarted = CheckpointManager(run, keep_last=2)
    with caplog.at_level("WARNING"):
        assert restarted.find_resume() == manager.root / tag_for_step(1)
        restarted.set_aside_newer_than(1)
        (small_disk / "filler").unlink()
        fill_filesystem(small_disk)
        writer = MetricsWriter(run, LoggingConfig(console=False), True, total_steps=3, resume_step=1)
        writer.log(2, {"loss": 2.0})
        writer.close()
    assert not (manager.root / tag_for_step(2)).exists()
    assert "deleting unfinished checkpoint" in caplog.text
    assert "could not move 1 rows after step 1" in caplog.text or "cannot write to" in caplog.text
