"""Under srun (`sbatch slurm/train_6b.sh` on the two-node test cluster), a failure inside the ranks
is one `piip6b train: error:` line in the job log, from the rank that failed, and the job's exit
code is ours (issue 14, item 11; the other launchers: tests/launch/test_rank_errors.py).

The cause is the hardest of them for the launcher: an image that only rank 1 (on node n2) reads,
so rank 0 (on n1, the host of the job's rendezvous store) only sees its peer leave, and srun
(--kill-on-bad-exit) stops whichever rank is still running when the first one exits: that rank
must still end with code 2, or srun reports 143 (SIGTERM) for the job. srun adds its own
"task N: Exited with exit code 2" line and the batch script its FAILED summary; ours is the line
that names the file.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from piip6b.testing import REPO

from tests.launch.slurm_cluster import slurm_cluster
from tests.launch.test_rank_errors import CONFIG, assert_one_line, copy_data, image_read_first_by, overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

JOB_TIMEOUT_S = 300  # only catches a hang


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


def test_missing_image_on_rank_1_is_one_line_and_exit_code_2(cluster, tmp_path_factory):
    from piip6b.tasks.data import ShapesSpec, write_shapes_dataset

    spec = ShapesSpec(num_train=6, num_val=2, min_size=64, max_size=96, max_objects=2, seed=0)
    shapes = write_shapes_dataset(cluster.root / "shapes", spec) / "coco"
    data = copy_data(shapes, cluster.root / "coco_missing")
    missing = image_read_first_by(1, data)
    missing.unlink()
    run_dir = cluster.root / "runs" / "missing_image"
    env = {"PYTHON": sys.executable, "PIIP6B_ROOT": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    options = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15",
               "--job-name=missing_image", f"--output={cluster.root}/missing_image-%j.out"]
    job_id = cluster.sbatch(REPO / "slurm" / "train_6b.sh", CONFIG, *overrides(run_dir, data), options=options,
                            env=env, cwd=REPO)
    job = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    log = "".join(p.read_text(errors="replace") for p in
                  [Path(cluster.root) / f"missing_image-{job_id}.out", *(run_dir / "logs").glob("slurm-*.out")]
                  if p.exists())
    assert job.state == "FAILED" and job.exit_code == "2:0", f"{job.fields}\n{log[-4000:]}"
    line = assert_one_line(log, f"image {missing} does not exist", run_dir)
    assert line.startswith("piip6b train: error: rank 1: ")
    assert re.search(r"srun: error: n[12]: task [01]: Exited with exit code 2", log), log[-4000:]
