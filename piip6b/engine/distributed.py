"""Joining a job: env:// variables (torchrun, `python launch/rank.py` under srun) or N local ranks.

piip6b only knows torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); translating a scheduler's variables is `launch/rank.py`'s job. Without them the
process is a single-rank job on a free local port, and `spawn_local(N, ...)` starts N such ranks
itself, detectron2-style, so a laptop needs no launcher. Backend: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
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

    When an exception is propagating, a peer may be gone: the barrier is skipped, so the original
    error is what the log shows rather than a second one from the barrier.
    """
    if engine is not None:
        engine.destroy()
    if torch.distributed.is_initialized():
        try:
            if sys.exc_info()[0] is None:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def _local_worker(fn: Callable[..., int], rank: int, nproc: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.exit(int(fn(*args) or 0))


def spawn_local(nproc: int, fn: Callable[..., int], args: tuple = (), poll_s: float = 0.5,
                grace_s: float = 30.0) -> int:
    """Run `fn(*args)` in `nproc` fresh local ranks and return the job's exit code.

    If a rank fails, the others are given `grace_s` to finish (they are usually blocked in a
    collective) and are then terminated, so a crash never leaves a hung job behind. The exit code is
    the first non-zero rank code, which keeps 75 (preempted, requeue me) visible to the scheduler.
    """
    if any(key in os.environ for key in ("RANK", "WORLD_SIZE")) and os.environ.get("WORLD_SIZE", "1") != "1":
        raise RuntimeError("--nproc starts its own ranks; do not combine it with torchrun/srun")
    port = dist.free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_local_worker, args=(fn, rank, nproc, port, args), daemon=False)
             for rank in range(nproc)]
    for proc in procs:
        proc.start()
    failed_at = None
    try:
        while any(p.is_alive() for p in procs):
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.is_alive():
                        log.error("terminating rank %d after another rank failed", procs.index(p))
                        p.terminate()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    codes = [p.exitcode for p in procs]
    return next((c for c in codes if c != 0), 0)
