"""`python launch/rank.py <piip6b args...>`: export this rank's env:// variables, then run piip6b.

What srun runs for every task (see slurm/common.sh; in an interactive allocation:
`srun python launch/rank.py train CONFIG ...`). It is a script run by its path from a checkout, not
an installed package: the dependency runs one way (launch -> piip6b), and nothing in `piip6b`
knows about Slurm.

    python launch/rank.py --print-env                 one JSON line with the derived variables
                                                      (no torch import): `srun python launch/rank.py --print-env`
    python launch/rank.py --print-run-dir CONFIG [key=value ...]
                                                      the experiment's run directory as the trainer
                                                      resolves it (the batch scripts log there; no
                                                      torch import)

Was this process started by `srun`, by `torchrun` or by hand, and what are its env:// variables?
piip6b only reads the torch env:// variables (`piip6b.dist.ENV_VARS`). This file is the one place
that derives them from Slurm's SLURM_*:

- torchrun (or any elastic agent) already exported them: they are left alone, even inside a Slurm
  job (srun starting one torchrun per node is a valid setup).
- an srun step (`SLURM_STEP_ID` is set; the batch shell itself has no step id): one process per task,
  rank = SLURM_PROCID, the master is the first node of the step.
- anything else is a plain single process: nothing is exported, so piip6b behaves exactly as when it
  is run directly (including its own `--nproc` local launcher).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

PORT_OVERRIDE_VAR = "PIIP6B_MASTER_PORT"
# Ports derived from job ids fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known and
# registered-service range most daemons use, below Linux's ephemeral range (32768-60999), so an
# outgoing connection can never be holding the port the rendezvous wants. Two jobs collide only if
# their ids differ by a multiple of PORT_SPAN and they share the master node at the same time.
PORT_BASE = 15000
PORT_SPAN = 15000

Launcher = Literal["slurm", "torchrun", "single"]


class LaunchEnvError(RuntimeError):
    """The environment says one launcher started us but lacks or garbles a variable it must set."""


@dataclass(frozen=True)
class RankLayout:
    """Where this process sits in the job, as its launcher describes it."""

    launcher: Launcher
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    def torch_environ(self) -> dict[str, str]:
        """The env:// variables to export; empty for a single process (nothing to rendezvous)."""
        if self.launcher == "single":
            return {}
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": str(self.master_addr),
            "MASTER_PORT": str(self.master_port),
        }

    def describe(self) -> str:
        if self.launcher == "single":
            return "single process"
        return (
            f"{self.launcher}: rank {self.rank}/{self.world_size}, local rank "
            f"{self.local_rank}/{self.local_world_size}, master {self.master_addr}:{self.master_port}"
        )


def derive_master_port(job_id: int) -> int:
    """A rendezvous port from the Slurm job id: two jobs sharing a node get different ports."""
    return PORT_BASE + job_id % PORT_SPAN


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed tasks-per-node list: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise LaunchEnvError(f"cannot parse the Slurm tasks-per-node list {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def scontrol_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames n[1-2],gpu07` -> ["n1", "n2", "gpu07"] (a local call, no RPC)."""
    result = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    names = result.stdout.split()
    if result.returncode != 0 or not names:
        raise LaunchEnvError(
            f"`scontrol show hostnames {nodelist}` failed: {result.stderr.strip() or 'no output'}"
        )
    return names


def resolve_node_address(name: str) -> str:
    """The address to reach node `name` at: the name itself when DNS knows it, else Slurm's NodeAddr.

    Keeping a resolvable name lets NCCL/gloo pick the interface the site's DNS intends; clusters
    that name nodes only inside Slurm (and emulated nodes such as the tests' n1/n2) need NodeAddr.
    """
    try:
        socket.getaddrinfo(name, None)
        return name
    except socket.gaierror:
        pass
    result = subprocess.run(
        ["scontrol", "show", "node", "-o", name], capture_output=True, text=True, check=False
    )
    match = re.search(r"\bNodeAddr=(\S+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise LaunchEnvError(
            f"the master node {name!r} does not resolve and `scontrol show node {name}` gave no "
            f"NodeAddr ({result.stderr.strip() or 'no output'}); set MASTER_ADDR through torchrun "
            "or fix the node's DNS entry"
        )
    return match.group(1)


def _int_var(environ: Mapping[str, str], name: str, launcher: str) -> int:
    value = environ.get(name)
    if value is None:
        raise LaunchEnvError(f"{launcher} launch detected but {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def master_port(environ: Mapping[str, str], job_id: int | None) -> int:
    override = environ.get(PORT_OVERRIDE_VAR)
    if override is not None:
        if not override.isdigit() or not 1 <= int(override) <= 65535:
            raise LaunchEnvError(f"{PORT_OVERRIDE_VAR}={override!r} is not a port number (1-65535)")
        return int(override)
    if job_id is None:
        raise LaunchEnvError(f"no Slurm job id to derive the master port from; set {PORT_OVERRIDE_VAR}")
    return derive_master_port(job_id)


# A full set of these (LOCAL_WORLD_SIZE is optional: not every launcher exports it) marks a process
# that another launcher already placed. Kept in step with piip6b.dist.ENV_VARS by a test; not
# imported from there, so that `--print-env` never pays for importing torch.
TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_torchrun(environ: Mapping[str, str]) -> bool:
    """torchrun marks its workers; a full set of env:// variables outside an srun step counts too
    (another launcher). Inside a step, such variables are stale ones inherited from the submitting
    shell, and the step's own layout wins."""
    if "TORCHELASTIC_RUN_ID" in environ:
        return True
    return all(name in environ for name in TORCH_VARS) and "SLURM_STEP_ID" not in environ


def detect(
    environ: Mapping[str, str] | None = None,
    hostnames: Callable[[str], list[str]] = scontrol_hostnames,
    resolve: Callable[[str], str] = resolve_node_address,
) -> RankLayout:
    """Work out the distributed layout of this process (see the module docstring for the rules)."""
    environ = os.environ if environ is None else environ
    if is_torchrun(environ):
        world_size = _int_var(environ, "WORLD_SIZE", "torchrun")
        return RankLayout(
            launcher="torchrun",
            rank=_int_var(environ, "RANK", "torchrun"),
            local_rank=_int_var(environ, "LOCAL_RANK", "torchrun"),
            world_size=world_size,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)),
            master_addr=environ.get("MASTER_ADDR"),
            master_port=int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None,
        )
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        return _from_slurm_step(environ, hostnames, resolve)
    return RankLayout(launcher="single")


def _from_slurm_step(
    environ: Mapping[str, str],
    hostnames: Callable[[str], list[str]],
    resolve: Callable[[str], str],
) -> RankLayout:
    # Step variables first: a step may use fewer tasks or nodes than the job allocated.
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    per_node_var = (
        "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in environ else "SLURM_TASKS_PER_NODE"
    )
    nodelist_var = "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in environ else "SLURM_JOB_NODELIST"
    if nodelist_var not in environ or per_node_var not in environ:
        raise LaunchEnvError(f"srun step detected but {nodelist_var} or {per_node_var} is not set")

    node_index = _int_var(environ, "SLURM_NODEID", "srun")
    tasks_per_node = parse_tasks_per_node(environ[per_node_var])
    if node_index >= len(tasks_per_node):
        raise LaunchEnvError(
            f"SLURM_NODEID={node_index} but {per_node_var}={environ[per_node_var]!r} lists "
            f"{len(tasks_per_node)} nodes"
        )
    job_id = _int_var(environ, "SLURM_JOB_ID", "srun")
    # Rank 0 sits on the step's first node under block and cyclic distribution alike.
    master_node = hostnames(environ[nodelist_var])[0]
    return RankLayout(
        launcher="slurm",
        rank=_int_var(environ, "SLURM_PROCID", "srun"),
        local_rank=_int_var(environ, "SLURM_LOCALID", "srun"),
        world_size=_int_var(environ, world_var, "srun"),
        local_world_size=tasks_per_node[node_index],
        master_addr=resolve(master_node),
        master_port=master_port(environ, job_id),
    )


def export(layout: RankLayout, environ: dict[str, str] | None = None) -> None:
    """Write the env:// variables into `environ` (os.environ by default); Slurm's layout wins."""
    target = os.environ if environ is None else environ
    target.update(layout.torch_environ())


PRINT_ENV_FLAG = "--print-env"
PRINT_RUN_DIR_FLAG = "--print-run-dir"


def print_run_dir(args: list[str]) -> int:
    if not args:
        print(f"launch: {PRINT_RUN_DIR_FLAG} needs a config file", file=sys.stderr)
        return 2
    # The batch script asks before any rank starts, so this stays cheap: the config file's tree,
    # without the typed validation (and the torch import) that the ranks do on start anyway.
    from piip6b.config_files import ConfigError, apply_overrides, load_yaml, run_dir_of

    try:
        print(run_dir_of(apply_overrides(load_yaml(args[0]), args[1:])), flush=True)
    except ConfigError as error:
        print(f"launch: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PRINT_RUN_DIR_FLAG]:
        return print_run_dir(argv[1:])
    try:
        layout = detect()
    except LaunchEnvError as error:
        print(f"launch: {error}", file=sys.stderr)
        return 2
    if argv[:1] == [PRINT_ENV_FLAG]:
        print(json.dumps({"launcher": layout.launcher, **layout.torch_environ()}, sort_keys=True), flush=True)
        return 0
    export(layout)
    from piip6b import dist
    from piip6b.cli import main as piip6b_main

    applied = dist.apply_env_defaults()
    if layout.rank == 0:
        defaults = ", ".join(f"{k}={v}" for k, v in applied.items()) or "none needed"
        print(f"launch: {layout.describe()}; defaults set: {defaults}", file=sys.stderr, flush=True)
    return piip6b_main(argv)


if __name__ == "__main__":
    sys.exit(main())
