"""A real two-node Slurm cluster on this machine, for tests.

`slurm_cluster(root)` writes a slurm.conf with two emulated nodes (n1, n2: two `slurmd -N` daemons on
this host, each with its own port), starts a private `munged` (own key and socket, so nothing of the
system's munge is touched), `slurmctld` and both `slurmd`, waits until `sinfo` shows the nodes idle,
and at the end cancels every job, stops the daemons and ends every process it left behind — each by
pid. All daemons run in the foreground (`-D`/`-F`) as children of the test, so their pids are known.

Only where `slurmctld` is not installed does it skip (`.ci/run` installs slurm-wlm and munge); any
other failure to start is an error that shows the daemon logs.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from piip6b.dist import free_port

NODES = ("n1", "n2")
# Each emulated node declares both cores: two 1-CPU-per-node jobs then run side by side (the
# port-collision scenario needs that) and one job can still place one task per node.
CPUS_PER_NODE = 2
DAEMON_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol")
INSTALL_HINT = "apt-get install -y slurm-wlm munge (what .ci/run does)"


def missing_binaries() -> list[str]:
    return [name for name in DAEMON_BINARIES if shutil.which(name) is None]


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Job:
    """The final or current record of a job, from `scontrol show job -o`."""

    job_id: int | str
    fields: dict[str, str]

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "UNKNOWN")

    @property
    def exit_code(self) -> str:
        return self.fields.get("ExitCode", "")

    @property
    def restarts(self) -> int:
        return int(self.fields.get("Restarts", "0"))


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: tuple[str, ...]
    daemon_logs: dict[str, Path]
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (and, through sbatch's --export=ALL, for jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def sbatch(
        self,
        script: str | Path,
        *args: str,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """Submit `script args...` with extra sbatch `options`; returns the job id."""
        full_env = {**self.env, **(env or {})}
        result = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            env=full_env, cwd=cwd, capture_output=True, text=True, timeout=30, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> Job | None:
        """The job's record, or None once slurmctld has forgotten it (MinJobAge below)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return None
        fields = dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        return Job(job_id, fields)

    def wait_for(
        self, job_id: int | str, states: Sequence[str], timeout: float, *, poll: float = 0.5
    ) -> Job:
        """Wait until the job is in one of `states` (Slurm names: RUNNING, PENDING, COMPLETED...)."""
        deadline = time.monotonic() + timeout
        last: Job | None = None
        while time.monotonic() < deadline:
            last = self.job(job_id)
            if last is not None and last.state in states:
                return last
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not in {list(states)} after {timeout:.0f}s; last state "
            f"{last.state if last else 'gone'}: {last.fields if last else ''}"
        )

    def wait_finished(self, job_id: int | str, timeout: float) -> Job:
        return self.wait_for(
            job_id,
            ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
             "BOOT_FAIL", "DEADLINE", "PREEMPTED"),
            timeout,
        )

    def release(self, job_id: int, timeout: float = 60) -> None:
        """Start a requeued job now instead of after Slurm's hold in PD (BeginTime).

        Slurm holds requeued jobs because slurmd revokes the old run's credential with a
        one-second timestamp: a restart within the same second fails with "Job credential revoked"
        (seen here). So wait until the nodes have finished the old run, then into the next seconds.
        """
        deadline = time.monotonic() + timeout
        while sorted(self.idle_nodes()) != sorted(self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes still busy {timeout:.0f}s after job {job_id} was requeued")
            time.sleep(0.3)
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def processes_of_job(self, job_id: int) -> list[tuple[int, dict[str, str], str]]:
        """(pid, environment, command line) of this host's processes that belong to the job."""
        return [
            (pid, env, cmdline) for pid, env, cmdline in _processes()
            if env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURM_CONF") == str(self.conf)
        ]

    def idle_nodes(self) -> list[str]:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        return [line.split()[0] for line in result.stdout.splitlines() if line.split()[1:] == ["idle"]]

    def _stray_pids(self) -> list[int]:
        """Processes of this cluster still alive: its daemons are marked through the environment,
        its jobs carry its SLURM_CONF."""
        return [
            pid for pid, env, _ in _processes()
            if pid != os.getpid() and (
                env.get("PIIP6B_TEST_SLURM_ROOT") == str(self.root) or env.get("SLURM_CONF") == str(self.conf)
            )
        ]


def _processes() -> Iterator[tuple[int, dict[str, str], str]]:
    """(pid, environment, command line) of every process this user may inspect."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw_env = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        env = dict(
            item.split("=", 1) for item in raw_env.decode(errors="replace").split("\0") if "=" in item
        )
        yield int(entry.name), env, cmdline.strip()


def _slurm_conf(root: Path, ctld_port: int, node_ports: Mapping[str, int]) -> str:
    host = socket.gethostname()
    user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else str(os.geteuid()))
    lines = [
        f"ClusterName=piip6btest{os.getpid()}",
        # Job ids (and so the master ports derived from them) differ between clusters that run at
        # the same time on this machine, e.g. two test sessions.
        f"FirstJobId={random.randrange(1, 14000)}",
        # `host(addr)` spares slurmctld from resolving this machine's name.
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmUser={user}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={root / 'munge-run' / 'munge.sock'}",
        "CredType=cred/munge",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        # Keep finished jobs visible to `scontrol show job` long enough for the tests to read them.
        "MinJobAge=600",
        # Seconds between SIGTERM and SIGKILL when a step or job is ended; the default 30 s only
        # slows the tests down.
        "KillWait=5",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        "MessageTimeout=20",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, port in node_ports.items():
        lines.append(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN"
        )
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _start_munged(root: Path, env: Mapping[str, str]) -> subprocess.Popen:
    # munged insists on a private key folder and a socket folder that everyone may enter.
    key_dir, run_dir = root / "munge-key", root / "munge-run"
    key_dir.mkdir(mode=0o700)
    run_dir.mkdir(mode=0o755)
    key = key_dir / "munge.key"
    # What `mungekey --create` writes (128 random bytes, owner-only), without needing that tool.
    key.touch(mode=0o600)
    key.write_bytes(os.urandom(128))
    with open(root / "log" / "munged.err", "w") as err:
        proc = subprocess.Popen(
            ["munged", "--foreground", f"--socket={run_dir / 'munge.sock'}", f"--key-file={key}",
             f"--log-file={root / 'log' / 'munged.log'}", f"--pid-file={key_dir / 'munged.pid'}",
             f"--seed-file={key_dir / 'munged.seed'}"],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    deadline = time.monotonic() + 15
    while not (run_dir / "munge.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"munged did not start:\n{_tail(root / 'log' / 'munged.err')}")
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextlib.contextmanager
def slurm_cluster(
    root: Path | None = None, nodes: Sequence[str] = NODES, start_timeout: float = 60
) -> Iterator[SlurmCluster]:
    """Start the cluster under `root`, yield it, and tear it down by pid.

    Without `root`, a fresh folder directly under the temp dir is used (munged refuses a socket
    below a folder others cannot enter, such as pytest's 0700 tmp_path) and removed afterwards
    unless PIIP6B_KEEP_SLURM_DIR is set.
    """
    missing = missing_binaries()
    if missing:
        import pytest

        pytest.skip(f"a real Slurm needs {', '.join(missing)}: {INSTALL_HINT}")

    owns_root = root is None
    root = Path(tempfile.mkdtemp(prefix="piip6b-slurm-") if root is None else root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged checks every folder above its socket
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(exist_ok=True)
    for name in nodes:
        (root / "spool" / name).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, free_port(), {name: free_port() for name in nodes}))

    logs = {"slurmctld": root / "log" / "slurmctld.log", "munged": root / "log" / "munged.log"}
    logs.update({f"slurmd-{name}": root / "log" / f"slurmd-{name}.log" for name in nodes})
    cluster = SlurmCluster(root=root, conf=conf, nodes=tuple(nodes), daemon_logs=logs)
    daemon_env = {**cluster.env, "PIIP6B_TEST_SLURM_ROOT": str(root)}

    def spawn(key: str, cmd: list[str]) -> None:
        with open(root / "log" / f"{key}.out", "w") as out:
            cluster._procs[key] = subprocess.Popen(
                cmd, env=daemon_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    try:
        cluster._procs["munged"] = _start_munged(root, daemon_env)
        spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        for name in nodes:
            spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(conf)])
        deadline = time.monotonic() + start_timeout
        while sorted(cluster.idle_nodes()) != sorted(nodes):
            dead = [key for key, proc in cluster._procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                details = "\n".join(
                    f"--- {key} ---\n{_tail(path)}\n{_tail(root / 'log' / (key + '.out'), 10)}"
                    for key, path in logs.items()
                )
                raise RuntimeError(
                    f"Slurm did not come up ({'exited: ' + ', '.join(dead) if dead else 'timeout'});"
                    f" sinfo: {cluster.run('sinfo', check=False).stdout}\n{details}"
                )
            time.sleep(0.3)
        yield cluster
    finally:
        _teardown(cluster)
        if owns_root and not os.environ.get("PIIP6B_KEEP_SLURM_DIR"):
            shutil.rmtree(root, ignore_errors=True)


def _teardown(cluster: SlurmCluster) -> None:
    if "slurmctld" in cluster._procs and cluster._procs["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                queue = cluster.run("squeue", "-h", "-o", "%i %T", check=False).stdout.strip()
                if not queue:
                    break
                time.sleep(0.3)
    # slurmd first (so it starts no more steps), then the controller, then munge.
    order = [key for key in cluster._procs if key.startswith("slurmd")] + ["slurmctld", "munged"]
    for key in order:
        if key in cluster._procs:
            _stop(cluster._procs[key])
    # slurmstepd daemonises away from slurmd; end whatever is left of this cluster's jobs by pid.
    for _ in range(3):
        strays = cluster._stray_pids()
        if not strays:
            break
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
