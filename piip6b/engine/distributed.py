"""Joining and leaving a job: env:// variables (torchrun, `python launch/rank.py` under srun) or N
local ranks, and what a rank that fails leaves behind.

piip6b only knows torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); translating a scheduler's variables is `launch/rank.py`'s job. Without them the
process is a single-rank job on a free local port, and `spawn_local(N, ...)` starts N such ranks
itself, detectron2-style, so a laptop needs no launcher. Backend: NCCL on GPUs, gloo on CPU.

Failures: every rank runs its share of a command through `run_entry`, whichever launcher started
it. A failing rank appends its traceback to a per-rank file (`<run dir>/logs/traceback-rank<N>.log`,
or a temporary folder before a run dir exists) and the job prints ONE line naming the cause, from
the first rank that failed for a reason of its own (see `report_failure`), with exit code 2 when
the message says what to fix and 1 otherwise, the same under `--nproc`, torchrun and srun.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from piip6b import dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group described by env:// variables (a 1-rank group if there are none).

    Backend, collective timeout and the NCCL/DeepSpeed environment defaults come from
    `piip6b.dist`, the one place they are set, whether the job was started by
    `python -m piip6b.launch`, torchrun or `--nproc`.
    """
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start the job with "
                           "torchrun, `python launch/rank.py` under srun, or `piip6b train --nproc N`")
    dist.apply_env_defaults()  # before DeepSpeed is imported: it picks its accelerator at import
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = bind_cuda_device(local_rank, local_world_size) if torch.cuda.is_available() else torch.device("cpu")

    import deepspeed

    options = dist.process_group_options(device.type)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=options.backend, auto_mpi_discovery=False,
                                   init_method="env://", timeout=options.timeout)
        if world_size > 1:
            # Return only once every rank has joined: gloo builds its connections in each rank's
            # own time, and a rank failing right after joining would otherwise cut a slower rank's
            # set-up short (a second, misleading "connectFullMesh failed" error on that rank).
            torch.distributed.barrier(**({"device_ids": [local_rank]} if device.type == "cuda" else {}))
    return DistEnv(rank, world_size, local_rank, local_world_size, device)


class DeviceBindingError(ValueError):
    """The GPUs a rank can see do not match the ranks on its node."""


def cuda_device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The CUDA device (index among those this process sees) for local rank `local_rank`.

    - Every task sees every GPU of the node (torchrun, `srun --gpus-per-node`): device `local_rank`.
    - Each task sees its own GPU(s) only (`srun --gpus-per-task=1`, `--gpu-bind=single:1`, or a site
      that sets CUDA_VISIBLE_DEVICES per task): the first one it sees, whatever its local rank.
    Anything else (e.g. 4 tasks on a node, each seeing 2 GPUs) cannot be mapped without guessing
    which GPU is whose, and is refused.
    """
    if visible >= local_world_size:
        return local_rank
    if visible == 1:  # fewer devices than tasks on the node: the launcher bound one to each task
        return 0
    raise DeviceBindingError(
        f"local rank {local_rank} of {local_world_size} on this node sees {visible} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give every task all the "
        "node's GPUs (--gpus-per-node) or exactly one (--gpus-per-task=1 or --gpu-bind=single:1)"
    )


def bind_cuda_device(local_rank: int, local_world_size: int) -> torch.device:
    """Make this rank's GPU (`cuda_device_index`) the current device, for torch and DeepSpeed.

    DeepSpeed takes `LOCAL_RANK` as the device ordinal (its engine's device, zero.Init's
    `local_device`): where each task sees only its own GPU, that is 0 whatever the task's place on
    the node, so LOCAL_RANK is set to the ordinal (`DistEnv.local_rank` keeps the launcher's).
    """
    index = cuda_device_index(local_rank, local_world_size, torch.cuda.device_count())
    torch.cuda.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)
    return torch.device("cuda", index)


def teardown(engine: Any | None = None) -> None:
    """Release DeepSpeed's hooks and the process group (skipping this makes ranks abort at exit).

    When an exception is propagating, only the engine is released: the process group is left to
    `run_entry`, which reports the failure through it (the claim in `report_failure` must happen
    before the peers can see this rank go) and leaves it afterwards. No barrier either: a peer
    may be gone, and the original error is what the log must show.
    """
    if engine is not None:
        engine.destroy()
    if torch.distributed.is_initialized() and sys.exc_info()[0] is None:
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------- failures
EXIT_FAILED = 1  # nothing anticipated it (a bug, a lost node): the traceback file says where
EXIT_USER_ERROR = 2  # the message says what to fix: config, data, weights, checkpoint, non-finite stop
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# Errors a user or a cluster can cause. Their messages are written to be read (they name the file,
# key or step and what to do), so the one line shows the message alone.
USER_ERRORS: tuple[type[BaseException], ...] = (
    KeyError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)

DEBUG_VAR = "PIIP6B_DEBUG"  # set: every failing rank also prints its traceback to stderr
TRACEBACK_NAME = "traceback-rank{rank}.log"  # under <run dir>/logs/, appended to, never replaced
# Keys in the job's rendezvous store (torch's TCPStore, hosted by rank 0).
_REPORTER_KEY = "piip6b/failure/reporter"  # "<rank>:<exit code>" of the rank that printed the line
_CHECKED_IN_KEY = "piip6b/failure/checked_in"  # failing ranks that are done with the store
_STORE_TIMEOUT = timedelta(seconds=10)
# How long a failing rank waits for the job's other ranks to report in before it exits.
_LINGER_S = 10.0
# A collective or store request that failed because another rank left (gloo and the store name the
# closed socket). That rank reports its own cause; this one must not add a second line.
_PEER_LEFT = re.compile(r"Connection (closed|reset) by peer|Connection was likely closed|Broken pipe")
# `DataLoader` re-raises a worker's exception with the worker's traceback as its message.
_LOADER_WORKER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.")


def exit_code_of(error: BaseException) -> int:
    return EXIT_USER_ERROR if isinstance(error, USER_ERRORS) else EXIT_FAILED


def one_line(error: BaseException) -> str:
    """The error as one line: a user error's message alone, anything else with its type."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    worker = _LOADER_WORKER.match(text)
    if worker:  # keep the worker's own message, the traceback is in the traceback file
        lines = text.splitlines()
        for index in range(len(lines) - 1, 0, -1):
            head = re.match(rf"(?:[\w.]+\.)?{worker.group(1)}: ", lines[index])
            if head:
                text = "\n".join([lines[index][head.end():], *lines[index + 1:]])
                break
    text = " ".join(text.split())
    if not isinstance(error, USER_ERRORS):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def lost_a_peer(error: BaseException) -> bool:
    """True when `error` only says that another rank left the job (its own error explains why)."""
    return isinstance(error, RuntimeError) and _PEER_LEFT.search(str(error)) is not None


def report_failure(command: str, error: BaseException, run_dir: str | os.PathLike | None = None) -> int:
    """Record why this process failed and say it once per job; returns the exit code.

    - The traceback is appended to this rank's traceback file: under `run_dir`/logs when that run
      dir exists; otherwise in a temporary folder, and only for errors that are not user errors
      (the line then names the file).
    - One rank prints `<command>: error: [rank N: ]<message>`: the first to claim the report in
      the job's rendezvous store. A rank that only re-raises rank 0's error (`dist.on_main`) or
      only saw a peer leave (`lost_a_peer`) never claims: the rank that caused it reports, and
      it claims before it leaves the job, so its peers cannot notice it gone before the claim.
      Outside a process group (before the ranks have met) there is no store: rank 0 speaks,
      every rank having read the same config and failed alike.
    - Ranks that did not report exit with the reporter's code, so the job has one exit code. In a
      job of several ranks, SIGTERM from here on ends this rank with that code: the launcher
      (srun --kill-on-bad-exit, torchrun) stops the other ranks when the first one exits, and a
      rank it stops would otherwise count as killed by a signal (srun then reports 143).
    - The process group is left afterwards, and every failing rank waits for the job's other
      ranks to get this far (at most `_LINGER_S`): then none is stopped before it has read the
      store, nor while still unwinding, and rank 0's store serves until all have read it.
    """
    code = exit_code_of(error)
    rank, world = (dist.rank(), dist.world_size()) if dist.is_initialized() else (_env_rank(), 1)
    if world > 1:
        _exit_on_sigterm(lambda: code)
    trace = "".join(traceback.format_exception(error))
    trace_file = _append_traceback(command, trace, rank, run_dir, temporary=code != EXIT_USER_ERROR)
    if os.environ.get(DEBUG_VAR):
        print(trace, file=sys.stderr, flush=True)
    store = _job_store()
    with _stderr_into(trace_file):  # c10d warns loudly when the store's host is already gone
        if dist.raised_elsewhere(error):
            speak = False
        elif lost_a_peer(error):
            speak = False
            code = (_reporter_code(store) if store is not None else None) or code
        elif store is None:
            speak = rank == 0
        else:
            speak = _claim_report(store, rank, code)
    if speak:
        who = f"rank {rank}: " if world > 1 else ""
        details = f" (traceback: {trace_file})" if trace_file and code != EXIT_USER_ERROR else ""
        print(f"{command}: error: {who}{one_line(error)}{details}", file=sys.stderr, flush=True)
    with _stderr_into(trace_file):  # and gloo may have a word to say about the closed sockets
        _leave_after_failure(store, world)
    return code


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _append_traceback(command: str, trace: str, rank: int, run_dir: str | os.PathLike | None,
                      temporary: bool) -> Path | None:
    """Append `trace` to this rank's traceback file (a temporary one only if `temporary`); the
    file, or None when there is none."""
    if run_dir is not None and Path(run_dir).is_dir():
        path = Path(run_dir) / "logs" / TRACEBACK_NAME.format(rank=rank)
    elif temporary:
        name = f"{command.replace(' ', '-')}-{os.getpid()}-{TRACEBACK_NAME.format(rank=rank)}"
        path = Path(tempfile.gettempdir()) / "piip6b-errors" / name
    else:
        return None
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    header = (f"=== {stamp} {command}: rank {rank} (pid {os.getpid()} on {socket.gethostname()}, "
              f"slurm job {os.environ.get('SLURM_JOB_ID', '-')}) ===\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as file:
            file.write(header + trace + "\n")
    except OSError:
        return None
    return path


def _job_store() -> Any | None:
    """The rendezvous store every rank of this job shares (None outside a process group)."""
    if not dist.is_initialized():
        return None
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_TIMEOUT)
    except (RuntimeError, ValueError, AttributeError):
        return None
    return store


def _claim_report(store: Any, rank: int, code: int) -> bool:
    """Atomically become the job's reporter; True when no other rank was first. A store that
    cannot be reached means rank 0 has left, after reporting the job's failure itself."""
    claim = f"{rank}:{code}".encode()
    try:
        return store.compare_set(_REPORTER_KEY, b"", claim) == claim
    except (RuntimeError, ValueError):
        return False


def _reporter_code(store: Any) -> int | None:
    try:
        if not store.check([_REPORTER_KEY]):
            return None
        return int(store.get(_REPORTER_KEY).decode().split(":")[1])
    except (RuntimeError, ValueError, IndexError):
        return None


def _leave_after_failure(store: Any | None, world: int) -> None:
    checked_in = None
    if store is not None:
        with contextlib.suppress(RuntimeError, ValueError):
            checked_in = store.add(_CHECKED_IN_KEY, 1)
    if torch.distributed.is_initialized():
        # The peers still blocked in a collective with this rank fail now, and report in.
        with contextlib.suppress(RuntimeError, ValueError):
            torch.distributed.destroy_process_group()
    # `store` still references the TCPStore, so on rank 0 its server outlives the process group.
    deadline = time.monotonic() + _LINGER_S
    while checked_in is not None and checked_in < world and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            checked_in = store.add(_CHECKED_IN_KEY, 0)
        except (RuntimeError, ValueError):  # rank 0 has left: everyone had reported in
            break


def _exit_on_sigterm(exit_code: Callable[[], int]) -> None:
    def leave(signum: int, frame: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code())  # no interpreter teardown: it can hang on a half-closed process group

    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM as it is
        signal.signal(signal.SIGTERM, leave)


@contextlib.contextmanager
def _stderr_into(path: Path | None) -> Iterator[None]:
    """Send file descriptor 2 (Python's and C++'s writes alike) to `path` for the block."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "a") as file:
            os.dup2(file.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def run_entry(command: str, fn: Callable[..., int | None], *args: Any,
              run_dir: str | os.PathLike | None = None) -> int:
    """Run this process's share of `command` (`fn(*args)`) and return its exit code; any failure
    is reported as `report_failure` describes. Every launcher path comes through here: `--nproc`
    ranks (`spawn_local`), and the single process, torchrun and srun ranks (the commands' `start`)."""
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        with contextlib.suppress(RuntimeError, ValueError):
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and an exit code
        return report_failure(command, error, run_dir)


def _local_worker(command: str, run_dir: str | None, fn: Callable[..., int], rank: int, nproc: int,
                  port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.exit(run_entry(command, fn, *args, run_dir=run_dir))


def spawn_local(nproc: int, fn: Callable[..., int], args: tuple = (), poll_s: float = 0.5,
                grace_s: float = 30.0, *, command: str = "piip6b", run_dir: str | None = None) -> int:
    """Run `fn(*args)` in `nproc` fresh local ranks (each through `run_entry`) and return the
    job's exit code.

    If a rank fails, the others are given `grace_s` to finish (they are usually blocked in a
    collective and fail with it at once) and are then terminated, so a crash never leaves a hung
    job behind. The exit code is the first non-zero code of a rank that ended by itself (75,
    preempted, stays visible to the scheduler); a rank killed by a signal it was not sent from
    here is reported on one line (nothing else can: the kernel's out-of-memory killer leaves no
    message), and gives 128 + the signal number, as a shell would.
    """
    if any(key in os.environ for key in ("RANK", "WORLD_SIZE")) and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--nproc starts its own ranks; do not combine it with torchrun/srun")
    port = dist.free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_local_worker, args=(command, run_dir, fn, rank, nproc, port, args), daemon=False)
             for rank in range(nproc)]
    for proc in procs:
        proc.start()
    failed_at = None
    terminated: set[int] = set()
    try:
        while any(p.is_alive() for p in procs):
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for rank, p in enumerate(procs):
                    if p.is_alive():
                        log.warning("rank %d still runs %.0f s after another rank failed: terminating it", rank, grace_s)
                        terminated.add(rank)
                        p.terminate()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    # A rank killed by a signal not sent from here is the cause whatever the others then said
    # (they only saw it leave); otherwise the first rank that ended by itself gives the code.
    ended = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0 and rank not in terminated]
    killed = [(rank, code) for rank, code in ended if code < 0]
    if killed:
        rank, code = killed[0]
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (out of memory? the kernel's OOM killer sends it)" if -code == signal.SIGKILL else ""
        print(f"{command}: error: rank {rank} was killed by {name}{hint}", file=sys.stderr, flush=True)
        return 128 - code
    if ended:
        return ended[0][1]
    return next((128 - c if c < 0 else c for c in (p.exitcode for p in procs) if c != 0), 0)
