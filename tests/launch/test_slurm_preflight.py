"""`sbatch slurm/train_6b.sh` runs the pre-flight (`piip6b check` for the job's ranks) before `srun`,
on a real two-node Slurm (tests/launch/slurm_cluster.py).

The trainer is replaced by a recorder (as in test_slurm_launch.py's sweep test): what is checked is
whether srun started ranks at all. `piip6b check` and `--print-run-dir` run for real.

A full-size config without weights stops at once with the one line in the job's log and nothing in
its run dir; with `model.from_scratch=true` the job passes the pre-flight and starts its ranks. That
second job uses the smallest full-size preset (piip_tsb, a 2.6 GB checkpoint) in the shipped COCO
config: the disk check would refuse PIIP-H6B's ~100 GB checkpoint wherever the test disk is smaller.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from piip6b.testing import REPO
from tests.launch.slurm_cluster import slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

CONFIG = "configs/detection/piip_h6b_maskrcnn_1x_coco.yaml"


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def workdir(cluster) -> Path:
    from piip6b.tasks.data.shapes import ShapesSpec, write_shapes_dataset

    root = cluster.root / "preflight"
    root.mkdir()
    for name in ("slurm", "configs", "launch"):
        (root / name).symlink_to(REPO / name)
    write_shapes_dataset(root / "shapes", ShapesSpec(num_train=8, num_val=2, min_size=64, max_size=96))
    recorder = root / "python"
    recorder.write_text(
        "#!/bin/bash\n"
        f'if [[ $2 == --print-run-dir || $2 == check ]]; then PYTHONPATH={REPO} exec {sys.executable} "$@"; fi\n'
        'echo "rank $SLURM_PROCID started: $*"\n'
    )
    recorder.chmod(0o755)
    return root


def _submit(cluster, workdir: Path, name: str, *overrides: str) -> tuple[str, str, Path]:
    """(final job state, the job's logs, its run dir) of train_6b.sh on the shipped COCO config."""
    run_dir = workdir / "runs" / name
    options = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
               f"--job-name={name}", f"--output={workdir}/{name}-%j.out"]
    job_id = cluster.sbatch(REPO / "slurm" / "train_6b.sh", CONFIG, f"data.root={workdir / 'shapes' / 'coco'}",
                            "detection.num_classes=3", f"run_dir={run_dir}", *overrides, options=options,
                            env={"PYTHON": str(workdir / "python"), "PIIP6B_ROOT": str(workdir),
                                 "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}, cwd=workdir)
    job = cluster.wait_finished(job_id, timeout=240)
    logs = (workdir / f"{name}-{job_id}.out").read_text(errors="replace")
    logs += "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.out")) if run_dir.exists() else ""
    return job.state, logs, run_dir


def test_full_size_config_without_weights_stops_before_srun(cluster, workdir):
    state, logs, run_dir = _submit(cluster, workdir, "no_weights")
    assert state == "FAILED", logs
    assert ("piip6b check: error: model.pretrained is not set and piip_h6b is a full-size preset: it would train "
            "from random initialisation. Set model.pretrained.branch1=FILE model.pretrained.branch2=FILE") in logs
    assert "pre-flight failed: nothing was started" in logs
    assert "started:" not in logs  # srun never ran a rank
    assert not run_dir.exists()


def test_from_scratch_passes_the_preflight_and_starts_the_ranks(cluster, workdir):
    state, logs, run_dir = _submit(cluster, workdir, "from_scratch", "model.preset=piip_tsb", "model.img_sizes=null",
                                   "model.from_scratch=true")
    assert state == "COMPLETED", logs
    assert "piip6b check: error" not in logs
    assert "batch     16 images per step = 2 rank(s) x 2 per forward (derived) x 4 accumulation step(s)" in logs
    for rank in (0, 1):
        assert f"rank {rank} started: {workdir}/launch/rank.py train {CONFIG}" in logs, logs
    assert (run_dir / "logs").is_dir()
