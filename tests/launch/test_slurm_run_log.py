"""`sbatch slurm/train_6b.sh` on the two-node test cluster (tests/launch/slurm_cluster.py) writes
the run's `train.log` in addition to Slurm's own log: rank 0's console lines, the evaluation's
progress and its per-class table, behind a start marker that names the Slurm job."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from piip6b.testing import REPO

from tests.launch.slurm_cluster import slurm_cluster

TINY_CONFIG = "configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml"
STEPS = 2
JOB_TIMEOUT_S = 300  # only catches hangs
# More than train_6b.sh's `--signal=B:USR1@600`: a shorter limit would ask for a checkpoint at once.
TIME_LIMIT_MIN = 15

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]


def test_slurm_job_writes_train_log_next_to_its_slurm_log():
    from piip6b.tasks.data.shapes import ShapesSpec, write_shapes_dataset

    with slurm_cluster() as cluster:
        data = Path(write_shapes_dataset(cluster.root / "shapes", ShapesSpec(
            num_train=8, num_val=2, min_size=64, max_size=96, max_objects=3, seed=0))) / "coco"
        run_dir = cluster.root / "runs" / "watched"
        overrides = [
            f"run_dir={run_dir}", f"data.root={data}", f"schedule.max_iters={STEPS}", f"checkpoint.every_steps={STEPS}",
            "logging.interval=1", "evaluation.at_end=true", "data.batch_size=1",
            "data.detection.train_short_sides=[64]", "data.detection.train_max_size=96",
            "data.detection.detr_crop_short_sides=[]", "data.detection.train_crop_size=0",
            "data.detection.test_scale=[96,64]",
        ]
        env = {"PYTHON": sys.executable, "PIIP6B_ROOT": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
        options = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", f"--time={TIME_LIMIT_MIN}",
                   "--job-name=watched", f"--output={cluster.root}/watched-%j.out"]
        job_id = cluster.sbatch(REPO / "slurm" / "train_6b.sh", TINY_CONFIG, *overrides, options=options, env=env,
                                cwd=REPO)
        job = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
        slurm_log = run_dir / "logs" / f"slurm-{job_id}.out"
        assert job.state == "COMPLETED", slurm_log.read_text(errors="replace")[-4000:] if slurm_log.exists() else job
        assert slurm_log.is_file()  # Slurm's log stays where slurm/common.sh sends it
        log = (run_dir / "train.log").read_text()  # read before the cluster's folder goes

    assert re.search(rf"===== start: 2 rank\(s\), Slurm job {job_id} \(restart 0\), host ", log), log[:2000]
    assert re.findall(r"INFO piip6b.metrics: step (\d)/2 \| loss ", log) == ["1", "2"]
    assert re.search(r"INFO piip6b.evaluate: COCO evaluation: 1/1 batches, [\d.]+ s/batch, eta ", log)
    table = log[log.index("step 2 eval/per_class:"):].splitlines()[1:5]
    assert [row.split()[0] for row in table] == ["class", "circle", "square", "triangle"]
    assert table[0].split() == ["class", "bbox/AP", "segm/AP"]
