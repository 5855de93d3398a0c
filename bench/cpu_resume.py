"""Time to first step after resuming early (step 10) vs late (step 100,000), through `piip6b.train`.

The data position is one integer (the global sample count) fed to the sampler, so a late resume
should cost the same as an early one: nothing is replayed. A real late checkpoint would take
days to reach on CPU, so the late one is the step-10 checkpoint re-labelled: same shards, with
the step and consumed-sample count in every rank's client state (and the manifest) moved to the
late step. The trainer reports `perf/time_to_first_step_s` (find + load the checkpoint, build the
loader at the position, run the first step) in metrics.jsonl.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_resume.py --nproc 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATASET_SIZE = 1_000_000  # virtual: samples are generated on demand from their index


def _config(run_dir: Path, max_iters: int) -> dict:
    from piip6b.testing import tiny_experiment

    return tiny_experiment(run_dir, optim={"lr": 1e-3, "layer_decay": 1.0, "clip_grad_norm": 0.0},
                           schedule={"max_iters": max_iters}, checkpoint={"every_steps": 10**9},
                           logging={"print_groups": False})


def _train(cfg: dict, nproc: int) -> None:
    from piip6b.engine.distributed import spawn_local
    from piip6b.testing import train_feature_task

    code = spawn_local(nproc, train_feature_task, (cfg, DATASET_SIZE))
    if code != 0:
        raise SystemExit(f"training run in {cfg['run_dir']} failed with exit code {code}")


def _relabel(checkpoint: Path, step: int, consumed: int) -> Path:
    """Copy `checkpoint` as step `step` of the same run with `consumed` samples drawn."""
    from piip6b.engine.checkpoint import (
        LATEST_NAME, MANIFEST_NAME, CheckpointManager, Manifest, file_digest, tag_for_step, weights_only_loads)

    manifest = CheckpointManager.validate(checkpoint)
    target = checkpoint.parent / tag_for_step(step)
    shutil.copytree(checkpoint, target)
    files, checksums = {}, {}
    for name in manifest.files:
        if name.endswith("model_states.pt"):
            with weights_only_loads():  # DeepSpeed's records are allowed, code is not
                state = torch.load(target / name, map_location="cpu", weights_only=True)
            state.update(step=step, consumed_samples=consumed)
            torch.save(state, target / name)
        files[name] = (target / name).stat().st_size
        checksums[name] = file_digest(target / name)  # the relabelled files must verify on resume
    fields = {**manifest.__dict__, "tag": target.name, "step": step, "files": files, "checksums": checksums}
    (target / MANIFEST_NAME).write_text(Manifest(**fields).to_json())
    (checkpoint.parent / LATEST_NAME).write_text(target.name + "\n")
    shutil.rmtree(checkpoint)
    return target


def _first_step_seconds(run_dir: Path, step: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["step"] == step]
    return float(row["perf/time_to_first_step_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--early-step", type=int, default=10)
    parser.add_argument("--late-step", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))

    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        seed_run = Path(tmp) / "seed"
        _train(_config(seed_run, args.early_step), args.nproc)
        global_batch = 2 * args.nproc
        timings: dict[str, list[float]] = {"early": [], "late": []}
        for repeat in range(args.repeats):
            for label, step in (("early", args.early_step), ("late", args.late_step)):
                run = Path(tmp) / f"{label}{repeat}"
                shutil.copytree(seed_run, run)
                (run / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(run / "tb", ignore_errors=True)
                if label == "late":
                    _relabel(run / "checkpoints" / f"step_{args.early_step:08d}", step, step * global_batch)
                _train(_config(run, step + 1), args.nproc)
                timings[label].append(_first_step_seconds(run, step + 1))
                print(f"{label} (resume at step {step:,}): {timings[label][-1]:.2f} s", flush=True)
    early, late = statistics.median(timings["early"]), statistics.median(timings["late"])
    print(json.dumps({"nproc": args.nproc, "early_step": args.early_step, "late_step": args.late_step,
                      "early_s": timings["early"], "late_s": timings["late"],
                      "median_early_s": round(early, 3), "median_late_s": round(late, 3),
                      "late_over_early": round(late / early, 3)}))


if __name__ == "__main__":
    main()
