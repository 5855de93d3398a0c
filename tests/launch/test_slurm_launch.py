"""`python launch/rank.py` under a real two-node Slurm (tests/launch/slurm_cluster.py), without the trainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from piip6b.testing import REPO

from tests.launch.launcher import LAUNCHER
from tests.launch.launcher import rank as launcher
from tests.launch.slurm_cluster import slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as running:
        yield running


def test_each_srun_task_gets_its_rank_and_a_reachable_master(cluster):
    script = cluster.root / "print_env.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"srun {sys.executable} {LAUNCHER} --print-env\n"
    )
    job_id = cluster.sbatch(
        script,
        options=["--nodes=2", "--ntasks-per-node=1", f"--output={cluster.root}/print-%j.out"],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
    )
    job = cluster.wait_finished(job_id, timeout=60)
    output = (cluster.root / f"print-{job_id}.out").read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), output
    ranks = sorted((json.loads(line) for line in output.splitlines() if line.startswith("{")),
                   key=lambda env: int(env["RANK"]))
    assert [env["RANK"] for env in ranks] == ["0", "1"]
    for env in ranks:
        assert env["launcher"] == "slurm"
        assert (env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("2", "0", "1")
        # n1 is known only to Slurm: its NodeAddr stands in for the name.
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["MASTER_PORT"] == str(launcher.derive_master_port(job_id))


def test_sweep_array_runs_one_config_per_task_in_its_own_run_dir(cluster, tmp_path_factory):
    """The ADE20K array job maps each task to one config and its own run dir and log.

    The trainer is replaced by a recorder (this checks the script, not training); the run dir is
    still resolved by the real `python launch/rank.py --print-run-dir`.
    """
    workdir = cluster.root / "sweep"
    workdir.mkdir()
    for name in ("slurm", "configs", "launch"):
        (workdir / name).symlink_to(REPO / name)
    recorder = workdir / "python"
    recorder.write_text(
        "#!/bin/bash\n"
        f'if [[ $2 == --print-run-dir ]]; then PYTHONPATH={REPO} exec {sys.executable} "$@"; fi\n'
        'echo "task $SLURM_ARRAY_TASK_ID job $SLURM_JOB_ID rank $SLURM_PROCID: $*"\n'
    )
    recorder.chmod(0o755)
    sizes = (192, 256)
    configs = [f"configs/tiny/piip_h6b_{size}_upernet_80k_ade20k_tiny.yaml" for size in sizes]
    job_id = cluster.sbatch(
        REPO / "slurm" / "sweep_ade20k_h6b.sh", "optim.lr=1e-5",
        options=["--array=0-1", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                 "--gpus-per-node=0", f"--output={cluster.root}/sweep-%A_%a.out"],
        env={"PYTHON": str(recorder), "PIIP6B_ROOT": str(workdir), "SWEEP_CONFIGS": " ".join(configs)},
        cwd=workdir,
    )
    for task, (size, config) in enumerate(zip(sizes, configs)):
        job = cluster.wait_finished(f"{job_id}_{task}", timeout=120)
        run_dir = workdir / "runs" / f"piip_h6b_{size}_upernet_80k_ade20k_tiny"
        logs = list((run_dir / "logs").glob("slurm-*.out"))
        submit_log = (cluster.root / f"sweep-{job_id}_{task}.out").read_text()
        assert job.state == "COMPLETED" and len(logs) == 1, submit_log
        text = logs[0].read_text()
        for rank in (0, 1):
            expected = f"task {task} job {job.fields['JobId']} rank {rank}: {workdir}/launch/rank.py train {config} optim.lr=1e-5"
            assert expected in text, text
