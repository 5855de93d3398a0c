"""Real `sbatch slurm/train_6b.sh` jobs on a two-node Slurm (tests/slurm_cluster.py), tiny CPU config.

1. 2 nodes x 1 task, ZeRO-3 over gloo across the "nodes": trains, checkpoints, evaluates, exits 0,
   and TensorBoard holds one run.
2. `scancel --signal=USR1 --batch` mid-run: checkpoint, requeue, resume; the losses of every step
   equal the uninterrupted run's bit for bit.
3. A rank killed with SIGKILL: the job fails promptly with a clear message, and submitting it again
   resumes from the last complete checkpoint.
4. Two jobs on the same nodes at the same time rendezvous on different ports and both finish.

The jobs run the real trainer through the real batch script; only the size (tiny preset, synthetic
shapes data, a handful of steps) and the sbatch resources (1 CPU per task, no GPUs) differ.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from piip6b.testing import REPO

from tests.launch.launcher import rank as launcher
from tests.launch.slurm_cluster import SlurmCluster, slurm_cluster

TRAIN_SCRIPT = REPO / "slurm" / "train_6b.sh"
EVAL_SCRIPT = REPO / "slurm" / "eval_6b.sh"
TINY_CONFIG = "configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml"
STEPS = 6
CHECKPOINT_EVERY = 2
# Generous bounds that only catch hangs; nothing asserts on how fast a job was.
JOB_TIMEOUT_S = 300

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster():
    if not (REPO / TINY_CONFIG).is_file():
        pytest.fail(f"{TINY_CONFIG} is missing: the Slurm scenarios train with it")
    with slurm_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def shapes_root(cluster: SlurmCluster) -> Path:
    from piip6b.tasks.data.shapes import ShapesSpec, write_shapes_dataset

    spec = ShapesSpec(num_train=16, num_val=4, min_size=64, max_size=96, max_objects=3, seed=0)
    return Path(write_shapes_dataset(cluster.root / "shapes", spec)) / "coco"


class Runner:
    """Submits train_6b.sh with the tiny config into run folders under the cluster's root."""

    def __init__(self, cluster: SlurmCluster, data_root: Path):
        self.cluster = cluster
        self.data_root = data_root

    def run_dir(self, name: str) -> Path:
        return self.cluster.root / "runs" / name

    def overrides(self, name: str, steps: int, evaluate: bool) -> list[str]:
        return [
            f"run_dir={self.run_dir(name)}",
            f"data.root={self.data_root}",
            f"schedule.max_iters={steps}",
            f"checkpoint.every_steps={CHECKPOINT_EVERY}",
            "logging.interval=1",
            f"evaluation.at_end={'true' if evaluate else 'false'}",
            # The shapes images are 64-96 px: train and test at that size, one image per rank.
            "data.batch_size=1",
            "data.detection.train_short_sides=[64]",
            "data.detection.train_max_size=96",
            "data.detection.detr_crop_short_sides=[]",
            "data.detection.train_crop_size=0",
            "data.detection.test_scale=[96,64]",
        ]

    @staticmethod
    def env() -> dict[str, str]:
        return {
            "PYTHON": sys.executable,
            "PIIP6B_ROOT": str(REPO),
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        }

    def submit(self, name: str, steps: int = STEPS, evaluate: bool = True) -> int:
        options = [
            "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
            "--time=15", f"--job-name={name}", f"--output={self.cluster.root}/{name}-%j.out",
        ]
        return self.cluster.sbatch(TRAIN_SCRIPT, TINY_CONFIG, *self.overrides(name, steps, evaluate),
                                   options=options, env=self.env(), cwd=REPO)

    def submit_eval(self, name: str) -> int:
        """slurm/eval_6b.sh on run `name` (its newest complete checkpoint), as one 2-rank step."""
        options = [
            "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
            "--time=15", f"--job-name={name}-eval", f"--output={self.cluster.root}/{name}-eval-%j.out",
        ]
        return self.cluster.sbatch(EVAL_SCRIPT, TINY_CONFIG, *self.overrides(name, STEPS, True),
                                   options=options, env=self.env(), cwd=REPO)

    def log(self, name: str, job_id: int) -> str:
        path = self.run_dir(name) / "logs" / f"slurm-{job_id}.out"
        submit_log = self.cluster.root / f"{name}-{job_id}.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        if submit_log.exists():
            text = submit_log.read_text(errors="replace") + text
        return text

    def finished(self, name: str, job_id: int, state: str = "COMPLETED") -> str:
        job = self.cluster.wait_finished(job_id, JOB_TIMEOUT_S)
        log = self.log(name, job_id)
        assert job.state == state, f"job {job_id} ended {job.state} ({job.exit_code}):\n{log[-4000:]}"
        return log


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [row for row in metrics_rows(run_dir) if "loss" in row]
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice in {run_dir}: {steps}"
    return {row["step"]: row["loss"] for row in rows}


def tensorboard_loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard run under run_dir (a folder with event files) and its loss curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        runs[str(folder.relative_to(run_dir))] = [(e.step, e.value) for e in acc.Scalars("loss")]
    return runs


def newest_complete_step(run_dir: Path) -> int | None:
    from piip6b.engine.checkpoint import CheckpointManager

    complete = CheckpointManager(run_dir).complete_checkpoints()
    if not complete:
        return None
    return max(int(CheckpointManager.validate(path).step) for path in complete)


@pytest.fixture(scope="module")
def runner(cluster: SlurmCluster, shapes_root: Path) -> Runner:
    return Runner(cluster, shapes_root)


@pytest.fixture(scope="module")
def reference(runner: Runner) -> dict[int, float]:
    """Scenario 1's uninterrupted run; its losses are what scenarios 2 and 3 must reproduce."""
    job_id = runner.submit("reference")
    log = runner.finished("reference", job_id)
    reference_losses = losses(runner.run_dir("reference"))
    assert sorted(reference_losses) == list(range(1, STEPS + 1)), log[-3000:]
    return reference_losses


def test_two_node_zero3_job_trains_checkpoints_evaluates(runner: Runner, reference):
    run_dir = runner.run_dir("reference")
    job_log = "".join(p.read_text() for p in (run_dir / "logs").glob("slurm-*.out"))
    assert "launch: slurm: rank 0/2" in job_log
    assert "finished" in job_log
    assert newest_complete_step(run_dir) == STEPS
    evaluated = [row for row in metrics_rows(run_dir) if any(k.startswith("eval/") for k in row)]
    assert evaluated and evaluated[-1]["step"] == STEPS, "no evaluation was logged at the end"
    curves = tensorboard_loss_curves(run_dir)
    assert len(curves) == 1, f"TensorBoard should show one run, found {list(curves)}"
    (curve,) = curves.values()
    assert [step for step, _ in curve] == list(range(1, STEPS + 1))


def test_eval_script_evaluates_the_finished_run(runner: Runner, reference):
    job_id = runner.submit_eval("reference")
    log = runner.finished("reference", job_id)
    result = runner.run_dir("reference") / f"eval-{job_id}.json"
    assert result.is_file(), log[-3000:]
    metrics = json.loads(result.read_text())
    # Both ranks' shares were gathered: every validation image was evaluated once.
    assert metrics.get("num_images") == 4, metrics
    assert {"bbox/AP", "segm/AP"} <= set(metrics), metrics


def test_usr1_checkpoints_requeues_and_resumes_bit_exact(runner: Runner, reference):
    cluster, name = runner.cluster, "preempted"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name, evaluate=False)
    wait_until(lambda: metrics_rows(run_dir), JOB_TIMEOUT_S, "the first logged step")
    # Keep signalling until the job leaves RUNNING, so further signals land during the save and
    # the exit as well: they must neither corrupt the checkpoint nor stop the requeue.
    sent_at, signals = time.monotonic(), 0
    while (state := cluster.job(job_id)) is not None and state.state == "RUNNING":
        cluster.run("scancel", "--signal=USR1", "--batch", str(job_id), check=False)
        signals += 1
        time.sleep(0.2)
    requeued = cluster.wait_for(job_id, ["PENDING"], JOB_TIMEOUT_S)
    print(f"{signals} x USR1 -> requeued in {time.monotonic() - sent_at:.1f}s "
          f"({requeued.fields.get('Reason')})")
    first_log = runner.log(name, job_id)
    match = re.search(r"preempted at step (\d+)", first_log)
    assert match, f"no 'preempted at step' in the first run's log:\n{first_log[-3000:]}"
    preempted_step = int(match.group(1))
    assert preempted_step < STEPS, "the signal came too late to interrupt the run"
    assert newest_complete_step(run_dir) == preempted_step

    cluster.release(job_id)  # requeued jobs otherwise wait ~2 minutes in PD (BeginTime)
    log = runner.finished(name, job_id)
    assert cluster.job(job_id).restarts == 1
    assert re.search(rf"resumed .*at step {preempted_step}\b", log), log[-3000:]
    assert losses(run_dir) == reference  # every step, bit for bit, same final step
    curves = tensorboard_loss_curves(run_dir)
    assert len(curves) == 1, f"TensorBoard should show one run, found {list(curves)}"
    (curve,) = curves.values()
    assert [step for step, _ in curve] == list(range(1, STEPS + 1))
    assert dict(curve) == pytest.approx(reference, rel=1e-6)  # TensorBoard stores float32


def test_killed_rank_fails_job_promptly_and_resubmission_resumes(runner: Runner, reference):
    cluster, name = runner.cluster, "rank_killed"
    run_dir = runner.run_dir(name)
    job_id = runner.submit(name, evaluate=False)
    wait_until(lambda: newest_complete_step(run_dir), JOB_TIMEOUT_S, "a complete checkpoint")

    def rank1_pid():
        for pid, env, cmdline in cluster.processes_of_job(job_id):
            if env.get("SLURM_PROCID") == "1" and "launch/rank.py" in cmdline:
                return pid
        return None

    pid = wait_until(rank1_pid, 30, "rank 1's process")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Without --kill-on-bad-exit rank 0 would sit in a collective until the 30-minute timeout.
    job = cluster.wait_finished(job_id, 120)
    print(f"SIGKILL of rank 1 -> job {job.state} in {time.monotonic() - killed_at:.1f}s")
    assert job.state == "FAILED"
    log = runner.log(name, job_id)
    assert "FAILED: srun ended with" in log, log[-3000:]
    first_failure = re.search(r"srun: error: \S+: task (\d+): (.+)", log)
    assert first_failure and first_failure.groups() == ("1", "Killed"), log[-3000:]
    assert "submit the same command again" in log

    last_complete = newest_complete_step(run_dir)
    assert last_complete is not None and last_complete < STEPS
    resubmitted = runner.submit(name, evaluate=False)
    log = runner.finished(name, resubmitted)
    assert re.search(rf"resumed .*at step {last_complete}\b", log), log[-3000:]
    assert losses(run_dir) == reference


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this machine (both jobs' masters live here, on n1)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_two_jobs_on_the_same_nodes_use_different_ports(runner: Runner, reference):
    cluster = runner.cluster
    names = ("ports_a", "ports_b")
    jobs = [runner.submit(name, steps=2, evaluate=False) for name in names]
    ports = [launcher.derive_master_port(job_id) for job_id in jobs]
    assert ports[0] != ports[1]

    def both_running():
        states = [cluster.job(job) for job in jobs]
        return all(s is not None and s.state == "RUNNING" for s in states) and states

    running = wait_until(both_running, 60, "both jobs running at once")
    assert running[0].fields["NodeList"] == running[1].fields["NodeList"] == "n[1-2]"
    # Both rendezvous stores serve at the same time, each on its job's port.
    wait_until(lambda: set(ports) <= listening_ports(), JOB_TIMEOUT_S,
               f"both master ports {ports} listening at once", poll=0.2)

    for name, job_id, port in zip(names, jobs, ports):
        log = runner.finished(name, job_id)
        match = re.search(r"launch: slurm: rank 0/2, .* master (\S+):(\d+)", log)
        assert match and int(match.group(2)) == port, log[-3000:]
        assert sorted(losses(runner.run_dir(name))) == [1, 2]
