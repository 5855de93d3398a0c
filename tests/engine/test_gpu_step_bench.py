"""bench/gpu_step.py's CPU dry run: the GPU benchmark's code path (fresh process per configuration,
`build_engine` from the recipe, the trainer's `train_step`, backbone probes, the per-part breakdown)
works end to end, so the one GPU command is known to run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from piip6b.testing import REPO, child_env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_dry_run_times_the_trainers_step_and_the_parts(tmp_path):
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_step.py"), "--cpu-dry-run", "--batches", "1",
                           "--models", "h6b", "--out", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    step = next(j for j in report["jobs"] if j["kind"] == "step")
    assert step["preset"] == "piip_h6b_tiny" and step["zero_stage"] == 3 and step["batch"] == 1
    median = step["median"]
    assert 0 < median["backbone_forward_ms"] and 0 < median["backbone_backward_ms"]
    assert median["backbone_ms"] < median["step_ms"]  # the step also runs the heads and AdamW
    assert step["attention_backend"] == "sdpa"
    # Every interaction runs deformable attention both ways, on the CPU through the PyTorch kernel.
    assert step["deform_kernel_calls_per_step"] == {"pytorch": 2 * 2}
    assert step["planned"]["peak_allocated_bytes"] > 0 and step["backbone_mfu"] > 0
    parts = next(j for j in report["jobs"] if j["kind"] == "parts")
    labels = {p["part"] for p in parts["parts"]}
    assert "interaction block (both directions)" in labels and all(p["ms"] > 0 for p in parts["parts"])
    assert parts["projection_ms"]["h6b"] > 0 and parts["projection_ms"]["baseline"] > 0
    assert any("interaction block" in line for line in report["summary"])
