"""Faults on a real two-node Slurm (tests/launch/slurm_cluster.py), through `sbatch slurm/train_6b.sh`
with the tiny CPU config: signals at the moments that used to lose the job, and what the job says.

1. USR1 while the batch shell resolves the run dir (before any rank exists): requeued, not FAILED.
2. USR1 during the final evaluation: the evaluation stops, the job requeues and evaluates after
   the restart; USR1 during the teardown and a resubmission of the finished run change nothing:
   one evaluation row, one TensorBoard point.
3. `scancel --full --signal=TERM`: srun kills the ranks; the job is requeued from the last
   checkpoint (and says why steps were lost) instead of failing.
4. What the job says: scancel (not requeued, and no rank claims it will be), `scontrol requeue`
   (Slurm requeues; the script does not again), a restart that finds no checkpoint (starts from
   step 0 in one line, and TensorBoard holds each step once).
5. A time limit that comes with no USR1 before it: requeued (not TIMEOUT) from the newest checkpoint.

Each moment is picked by watching the job (a marker file, a checkpoint's manifest, a logged row),
never by a clock; nothing asserts on how fast anything was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from piip6b.testing import REPO
from tests.launch.slurm_cluster import SlurmCluster
from tests.launch.test_slurm_train import (  # noqa: F401 (`cluster`: the same fixture, a cluster per module)
    JOB_TIMEOUT_S,
    TINY_CONFIG,
    Runner,
    cluster,
    losses,
    metrics_rows,
    newest_complete_step,
    tensorboard_loss_curves,
    wait_until,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 4
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED")
VAL_IMAGES = 24  # 12 evaluation batches per rank: a final evaluation long enough to interrupt


@pytest.fixture(scope="module")
def runner(cluster: SlurmCluster) -> FaultRunner:
    from piip6b.tasks.data.shapes import ShapesSpec, write_shapes_dataset

    spec = ShapesSpec(num_train=16, num_val=VAL_IMAGES, min_size=64, max_size=96, max_objects=3, seed=0)
    return FaultRunner(cluster, Path(write_shapes_dataset(cluster.root / "shapes", spec)) / "coco")


class FaultRunner(Runner):
    def submit(self, name: str, steps: int = STEPS, evaluate: bool = False, extra: tuple[str, ...] = (),
               env: dict[str, str] | None = None, run_dir_from_name: bool = False,
               time_limit: tuple[str, ...] = ("--time=15",)) -> int:
        """`run_dir_from_name`: no run_dir= override, so the batch script asks the launcher for the run
        dir (runs/<name> under the cluster's root, where slurm/, configs/ and launch/ are linked)."""
        options = [
            "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
            *time_limit, f"--job-name={name}", f"--output={self.cluster.root}/{name}-%j.out",
        ]
        overrides = self.overrides(name, steps, evaluate)
        env = {**self.env(), **(env or {})}
        if run_dir_from_name:
            overrides = [o for o in overrides if not o.startswith("run_dir=")] + [f"name={name}"]
            for folder in ("slurm", "configs", "launch"):
                if not (self.cluster.root / folder).exists():
                    (self.cluster.root / folder).symlink_to(REPO / folder)
            env["PIIP6B_ROOT"] = str(self.cluster.root)
        return self.cluster.sbatch(REPO / "slurm" / "train_6b.sh", TINY_CONFIG, *overrides,
                                   "data.val_batch_size=1", *extra, options=options, env=env, cwd=REPO)

    def signal_while_running(self, job_id: int, *scancel: str) -> str:
        """Send the signal every 0.2 s while the job runs, so that it also lands on whatever the job
        does next (saving, exiting); returns the state it ends up in (requeued: PENDING)."""
        while (job := self.cluster.job(job_id)) is not None and job.state == "RUNNING":
            with contextlib.suppress(subprocess.TimeoutExpired):  # a slurmctld slowed down by the load
                self.cluster.run("scancel", *scancel, str(job_id), check=False)
            time.sleep(0.2)
        return self.cluster.wait_for(job_id, ("PENDING", *ENDED), JOB_TIMEOUT_S).state


def eval_rows(run_dir: Path) -> list[dict]:
    return [row for row in metrics_rows(run_dir) if any(key.startswith("eval/") for key in row)]


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars(tag)]
    return steps


@pytest.fixture(scope="module")
def early_usr1(runner: FaultRunner) -> dict:
    """Scenario 1, run once: its uninterrupted losses are what the other scenarios reproduce. The
    run dir lookup is made slow (a shared file system having a bad minute; the real lookup takes
    0.4 s since it stopped importing torch), and USR1 arrives while it runs."""
    cluster, name = runner.cluster, "early_usr1"
    markers = cluster.root / "markers"
    markers.mkdir()
    slow_python = cluster.root / "slow_lookup_python"
    slow_python.write_text(
        "#!/bin/bash\n"
        'if [[ $2 == --print-run-dir ]]; then\n'
        f'    touch "{markers}/$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}"\n'
        "    sleep 5\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    slow_python.chmod(0o755)
    job_id = runner.submit(name, env={"PYTHON": str(slow_python)}, run_dir_from_name=True)
    wait_until(lambda: (markers / f"{job_id}.0").exists(), JOB_TIMEOUT_S, "the run dir lookup", poll=0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))
    after_signal = cluster.wait_for(job_id, ("PENDING", *ENDED), JOB_TIMEOUT_S)
    scenario = {"job_id": job_id, "state_after_signal": after_signal.state,
                "first_log": runner.log(name, job_id), "rows_before_restart": metrics_rows(runner.run_dir(name))}
    if after_signal.state == "PENDING":
        cluster.release(job_id)
    scenario["job"] = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    scenario["losses"] = losses(runner.run_dir(name))
    return scenario


def test_usr1_before_the_ranks_start_requeues_the_job(early_usr1):
    first_log = early_usr1["first_log"]
    assert early_usr1["state_after_signal"] == "PENDING", first_log[-3000:]
    assert re.search(r"received USR1 at [-\d: ]+, before the ranks started: not starting them; requeueing",
                     first_log), first_log[-3000:]
    assert early_usr1["rows_before_restart"] == []  # no rank was started
    job = early_usr1["job"]
    assert (job.state, job.restarts) == ("COMPLETED", 1)
    assert sorted(early_usr1["losses"]) == list(range(1, STEPS + 1))


def test_usr1_during_the_final_evaluation_and_the_teardown_then_a_resubmission(runner: FaultRunner):
    cluster, name = runner.cluster, "final_eval"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name, evaluate=True)
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json"
    wait_until(final.exists, JOB_TIMEOUT_S, "the final checkpoint (the final evaluation starts)", poll=0.1)
    assert runner.signal_while_running(job_id, "--signal=USR1", "--batch") == "PENDING", runner.log(name, job_id)[-3000:]
    first = runner.log(name, job_id)
    assert re.search(rf"preempted at step {STEPS} \(stopped before batch \d+ of {VAL_IMAGES // 2}\) on SIGUSR1",
                     first), first[-3000:]
    assert not eval_rows(run_dir) and not (run_dir / "finished.json").exists()

    cluster.release(job_id)
    wait_until(lambda: eval_rows(run_dir), JOB_TIMEOUT_S, "the final evaluation's row")
    state = runner.signal_while_running(job_id, "--signal=USR1", "--batch")  # the teardown
    if state == "PENDING":  # a rank that died of it was requeued: the restart must have nothing to do
        cluster.release(job_id)
    log = runner.finished(name, job_id)
    assert (run_dir / "finished.json").is_file(), log[-3000:]

    resubmitted = runner.submit(name, evaluate=True)
    log = runner.finished(name, resubmitted)
    assert f"run already finished at step {STEPS}" in log and "nothing to do" in log, log[-3000:]
    assert [row["step"] for row in eval_rows(run_dir)] == [STEPS]
    assert tensorboard_steps(run_dir, "eval/bbox/AP") == [STEPS]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_term_to_the_whole_job_requeues_from_the_last_checkpoint(runner: FaultRunner, early_usr1):
    reference = early_usr1["losses"]
    cluster, name = runner.cluster, "term_full"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name)
    wait_until(lambda: newest_complete_step(run_dir), JOB_TIMEOUT_S, "the first checkpoint", poll=0.1)
    cluster.run("scancel", "--full", "--signal=TERM", str(job_id))
    cluster.wait_for(job_id, ["PENDING"], JOB_TIMEOUT_S)
    first = runner.log(name, job_id)
    assert "srun answers its own TERM with SIGKILL to the ranks" in first, first[-3000:]
    assert "scancel --signal=USR1 --batch" in first
    cluster.release(job_id)
    runner.finished(name, job_id)
    assert losses(run_dir) == reference


def test_scancel_is_not_requeued_and_no_line_says_it_will_be(runner: FaultRunner):
    cluster, name = runner.cluster, "cancelled"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name)
    wait_until(lambda: metrics_rows(run_dir), JOB_TIMEOUT_S, "the first logged step", poll=0.1)
    cluster.run("scancel", str(job_id))
    job = cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    log = runner.log(name, job_id)
    assert job.state == "CANCELLED"
    assert "the job was cancelled (scancel), so it is not requeued" in log, log[-3000:]
    assert "requeued" not in log.replace("it is not requeued", ""), log[-3000:]
    assert cluster.job(job_id).restarts == 0


def test_slurm_requeue_is_left_to_slurm_and_resumes(runner: FaultRunner, early_usr1):
    reference = early_usr1["losses"]
    cluster, name = runner.cluster, "slurm_requeue"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name)
    wait_until(lambda: newest_complete_step(run_dir), JOB_TIMEOUT_S, "the first checkpoint", poll=0.1)
    cluster.run("scontrol", "requeue", str(job_id))
    cluster.wait_for(job_id, ["PENDING"], JOB_TIMEOUT_S)
    first = runner.log(name, job_id)
    assert "Slurm is requeueing the job itself" in first, first[-3000:]
    assert "Submit the same command again" not in first and "submit the same command again" not in first
    cluster.release(job_id)
    runner.finished(name, job_id)
    assert cluster.job(job_id).restarts == 1  # requeued once, by Slurm only
    assert losses(run_dir) == reference


def test_restart_without_a_checkpoint_says_so_and_logs_each_step_once(runner: FaultRunner, early_usr1):
    reference = early_usr1["losses"]
    cluster, name = runner.cluster, "no_checkpoint"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name, extra=("checkpoint.every_steps=100",))
    wait_until(lambda: metrics_rows(run_dir), JOB_TIMEOUT_S, "the first logged step", poll=0.1)

    def rank1_pid():
        for pid, env, cmdline in cluster.processes_of_job(job_id):
            if env.get("SLURM_PROCID") == "1" and "launch/rank.py" in cmdline:
                return pid
        return None

    os.kill(wait_until(rank1_pid, 30, "rank 1's process"), signal.SIGKILL)
    assert cluster.wait_finished(job_id, JOB_TIMEOUT_S).state == "FAILED"
    assert newest_complete_step(run_dir) is None

    resubmitted = runner.submit(name, extra=("checkpoint.every_steps=100",))
    log = runner.finished(name, resubmitted)
    assert f"no complete checkpoint in {run_dir}/checkpoints: training starts from step 0" in log, log[-3000:]
    assert losses(run_dir) == reference  # each step once in metrics.jsonl, the same numbers
    curves = tensorboard_loss_curves(run_dir)
    assert [[step for step, _ in curve] for curve in curves.values()] == [list(range(1, STEPS + 1))]
    superseded = run_dir / "metrics.superseded.jsonl"
    assert superseded.is_file() and json.loads(superseded.read_text().splitlines()[0])["step"] == 1


def test_time_limit_without_a_usr1_lead_requeues_instead_of_timing_out(runner: FaultRunner):
    """A one-minute job still training at its limit whose USR1 lead never comes (the lead signal is
    replaced by URG, which the batch shell ignores): Slurm's TERM at the limit is the only warning.
    The job must be requeued from its newest checkpoint, not end as TIMEOUT."""
    cluster, name = runner.cluster, "time_limit"
    job_id = runner.submit(name, steps=500, extra=("checkpoint.every_steps=1000",),
                           time_limit=("--time=1", "--signal=B:URG@1"))
    cluster.wait_for(job_id, ["RUNNING"], JOB_TIMEOUT_S)
    job = cluster.wait_for(job_id, ("PENDING", *ENDED), JOB_TIMEOUT_S)
    log = runner.log(name, job_id)
    cluster.run("scancel", str(job_id), check=False)
    assert job.state == "PENDING", f"{job.state}:\n{log[-3000:]}"
    assert "received TERM at the time limit, before the ranks had saved" in log and "Requeueing now" in log, \
        log[-3000:]
