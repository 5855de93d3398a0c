"""`launch/rank.py`: launcher detection, env:// variables, port derivation; `piip6b.dist`'s distributed
defaults (no Slurm daemons)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from piip6b import dist
from piip6b.dist import (
    CPU_ENV_DEFAULTS,
    NCCL_ENV_DEFAULTS,
    TIMEOUT_VAR,
    apply_env_defaults,
    process_group_options,
)
from piip6b.testing import REPO, child_env
from tests.launch.launcher import LAUNCHER
from tests.launch.launcher import rank as launcher



def srun_env(**changes: str) -> dict[str, str]:
    """What srun exports to task 5 of a 2-node x 4-task step of job 4242 (as Slurm 22.05 writes it)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    env.update(changes)
    return env


def fake_hostnames(nodelist: str) -> list[str]:
    return {"gpu[07-08]": ["gpu07", "gpu08"], "gpu08": ["gpu08"], "n[1-2]": ["n1", "n2"]}[nodelist]


def detect_with(env: dict[str, str]):
    return launcher.detect(env, hostnames=fake_hostnames, resolve=lambda name: f"addr-of-{name}")


def test_srun_task_gets_rank_layout_and_first_node_as_master():
    layout = detect_with(srun_env())
    assert (layout.launcher, layout.rank, layout.local_rank, layout.world_size, layout.local_world_size) == (
        "slurm", 5, 1, 8, 4)
    assert layout.master_addr == "addr-of-gpu07"
    assert layout.master_port == launcher.derive_master_port(4242)
    assert layout.torch_environ() == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "addr-of-gpu07", "MASTER_PORT": str(launcher.PORT_BASE + 4242),
    }


def test_step_variables_win_over_job_variables():
    # `srun -N1 -n2` inside a 2-node job: the step has one node and two tasks.
    env = srun_env(SLURM_PROCID="1", SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="2",
                   SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="gpu08")
    layout = detect_with(env)
    assert (layout.world_size, layout.local_world_size, layout.master_addr) == (2, 2, "addr-of-gpu08")


def test_uneven_tasks_per_node():
    assert launcher.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launcher.parse_tasks_per_node("8") == [8]
    env = srun_env(SLURM_NODEID="3", SLURM_STEP_TASKS_PER_NODE="2(x3),1",
                   SLURM_STEP_NODELIST="n[1-2]", SLURM_PROCID="6", SLURM_LOCALID="0")
    assert detect_with(env).local_world_size == 1
    with pytest.raises(launcher.LaunchEnvError, match="tasks-per-node"):
        launcher.parse_tasks_per_node("2(y3)")


def test_port_differs_between_jobs_and_can_be_overridden():
    ports = {detect_with(srun_env(SLURM_JOB_ID=str(job))).master_port for job in range(1000, 1100)}
    assert len(ports) == 100
    assert all(launcher.PORT_BASE <= port < launcher.PORT_BASE + launcher.PORT_SPAN for port in ports)
    # Below Linux's ephemeral range, so no outgoing connection holds it.
    assert launcher.PORT_BASE + launcher.PORT_SPAN <= 32768
    assert launcher.derive_master_port(7) == launcher.derive_master_port(7 + launcher.PORT_SPAN)
    assert detect_with(srun_env(**{launcher.PORT_OVERRIDE_VAR: "29511"})).master_port == 29511
    with pytest.raises(launcher.LaunchEnvError, match=launcher.PORT_OVERRIDE_VAR):
        detect_with(srun_env(**{launcher.PORT_OVERRIDE_VAR: "http"}))


def test_batch_shell_without_step_is_a_single_process():
    # The batch script itself has SLURM_JOB_ID/SLURM_PROCID but no step id: not a rank of a step.
    env = srun_env()
    del env["SLURM_STEP_ID"]
    layout = detect_with(env)
    assert layout.launcher == "single"
    assert layout.torch_environ() == {}


def test_torchrun_variables_are_kept_even_inside_slurm():
    torchrun = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16",
                "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    layout = detect_with({**srun_env(), **torchrun})
    assert (layout.launcher, layout.rank, layout.world_size, layout.master_port) == ("torchrun", 3, 16, 29500)
    environ = {**torchrun}
    launcher.export(layout, environ)
    assert environ == torchrun


def test_stale_torch_variables_do_not_override_slurm():
    # Variables inherited from the submitting shell must not beat the step's real layout.
    stale = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    environ = {**srun_env(), **stale}
    layout = detect_with(environ)
    assert layout.launcher == "slurm"
    launcher.export(layout, environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["MASTER_ADDR"]) == ("5", "8", "addr-of-gpu07")


def test_plain_process_is_single():
    assert detect_with({}).launcher == "single"


def test_missing_slurm_variable_is_named():
    env = srun_env()
    del env["SLURM_LOCALID"]
    with pytest.raises(launcher.LaunchEnvError, match="SLURM_LOCALID"):
        detect_with(env)
    with pytest.raises(launcher.LaunchEnvError, match="SLURM_PROCID"):
        detect_with(srun_env(SLURM_PROCID="five"))


def test_env_defaults_never_override_the_user():
    environ = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    applied = apply_env_defaults(environ, gpu=True)
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in applied
    assert all(environ[name] == value for name, value in applied.items())
    assert set(environ) == set(NCCL_ENV_DEFAULTS)
    cpu: dict[str, str] = {}
    apply_env_defaults(cpu, gpu=False)
    assert cpu == CPU_ENV_DEFAULTS


def test_process_group_options():
    assert process_group_options("cuda", {}).backend == "nccl"
    options = process_group_options("cpu", {TIMEOUT_VAR: "90"})
    assert (options.backend, options.timeout) == ("gloo", timedelta(seconds=90))
    with pytest.raises(ValueError, match=TIMEOUT_VAR):
        process_group_options("cpu", {TIMEOUT_VAR: "soon"})


def test_print_env_entry_point(tmp_path):
    """`python launch/rank.py --print-env` in a fresh process: one JSON line with the derived variables."""
    if subprocess.run(["sh", "-c", "command -v scontrol"], capture_output=True).returncode != 0:
        pytest.skip("scontrol is not installed: apt-get install slurm-wlm munge (what .ci/run does)")
    # `scontrol show hostnames` expands locally but still wants a slurm.conf to exist.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost\n")
    env = {**srun_env(SLURM_STEP_NODELIST="localhost,gpu09", SLURM_NODEID="0"),
           "PATH": "/usr/bin:/bin", "SLURM_CONF": str(conf), launcher.PORT_OVERRIDE_VAR: "23456"}
    result = subprocess.run([sys.executable, str(LAUNCHER), "--print-env"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == {"launcher": "slurm", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                       "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "localhost", "MASTER_PORT": "23456"}


def test_bad_layout_is_a_clear_error_from_the_entry_point():
    env = {**srun_env(), "PATH": "/usr/bin:/bin"}
    del env["SLURM_NODEID"]
    result = subprocess.run([sys.executable, str(LAUNCHER), "train", "x.yaml"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "SLURM_NODEID" in result.stderr


def test_launcher_recognises_exactly_the_torch_rendezvous_variables():
    """The launcher keeps its own copy (so `--print-env` needs no torch): it must stay the same set."""
    assert set(launcher.TORCH_VARS) == set(dist.ENV_VARS) - {"LOCAL_WORLD_SIZE"}


@pytest.mark.parametrize("overrides", [[], ["name=renamed"], ["run_dir=/scratch/somewhere"]])
def test_print_run_dir_resolves_as_the_trainer_without_importing_torch(overrides):
    """The batch scripts ask before any rank starts (their USR1 window): the answer must be the
    trainer's own, and cheap — importing torch there took 17-20 s on a loaded node."""
    from piip6b.config import load_config

    probe = (
        "import runpy, sys\n"
        "try:\n"
        f"    runpy.run_path({str(LAUNCHER)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('torch_imported' if 'torch' in sys.modules else 'torch_not_imported')\n"
    )
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        if config.parent.name == "_base_":
            continue
        result = subprocess.run([sys.executable, "-c", probe, "--print-run-dir", str(config), *overrides],
                                capture_output=True, text=True, cwd=REPO, env=child_env(), check=False)
        assert result.returncode == 0, result.stderr
        printed, verdict = result.stdout.split()
        assert printed == load_config(config, overrides).run_dir, config
        assert verdict == "torch_not_imported"
