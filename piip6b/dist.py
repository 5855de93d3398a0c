"""How ranks talk: the one place for rank/world queries, collectives on plain values, ZeRO-3
partition helpers and the process-group defaults.

Everything here works unchanged in a single process (no process group, or a group of one): a
collective then returns its input. The module imports only torch at load time (DeepSpeed lazily),
so every layer of the package, and the launcher, can use it.

Joining and leaving a job (`init_distributed`, `teardown`, local ranks) is `piip6b.engine.distributed`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")

# The env:// variables torchrun exports and `torch.distributed` reads (the rendezvous contract).
ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------------ who am I
def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """More than one rank: collectives would actually communicate."""
    return world_size() > 1


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


# ------------------------------------------------------------------------------------- collectives
def _device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, the CPU under gloo."""
    if is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(value: float) -> float:
    """The largest `value` over ranks (a flag any rank raised, a count every rank must reach)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return float(tensor.item())


def all_mean(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """The mean over ranks of each scalar, in one collective. Every rank must pass the same keys."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(values[k]).detach().double().reshape(()).cpu() for k in keys])
    if is_distributed():
        stacked = stacked.to(_device())
        torch_dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(keys, stacked.tolist()))


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (it must live where the backend communicates)."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable) as a list on rank 0; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    torch_dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the others' arguments are ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


class RemoteError(RuntimeError):
    """Rank 0 failed in `on_main`; raised on the other ranks when its own error could not be sent."""


# Set on the copy of rank 0's error that the other ranks raise: it was already reported by rank 0,
# so their top level can stay quiet instead of printing the same line world_size times.
RAISED_ON_RANK_ATTR = "piip6b_raised_on_rank"


def raised_elsewhere(error: BaseException) -> bool:
    """True for an error this rank re-raised on behalf of another rank (see `on_main`)."""
    origin = getattr(error, RAISED_ON_RANK_ATTR, None)
    return origin is not None and origin != rank()


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only; every rank returns its result, or raises its error.

    For decisions that must be the same everywhere (which checkpoint to load, whether a file is
    valid): looking at a shared file system from many processes at slightly different moments need
    not give one answer, and a rank that failed alone would leave the others waiting in the next
    collective. The other ranks raise a copy of rank 0's exception (same type and message, marked
    with `raised_elsewhere`), or `RemoteError` when it cannot be pickled.
    """
    if not is_distributed():
        return fn()
    outcome: tuple[str, Any] | None = None
    failure: BaseException | None = None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as error:  # noqa: BLE001 - re-raised below; the others must not hang
            failure = error
            setattr(error, RAISED_ON_RANK_ATTR, 0)
            try:
                outcome = ("error", pickle.dumps(error))
            except Exception:  # noqa: BLE001 - an unpicklable error still reaches the others as text
                outcome = ("error_text", f"{type(error).__name__}: {error}")
    outcome = broadcast_from_main(outcome)
    if failure is not None:
        raise failure
    status, value = outcome
    if status == "ok":
        return value
    if status == "error":
        try:
            error = pickle.loads(value)
        except Exception:  # noqa: BLE001 - an exception class whose __init__ cannot be replayed
            error = RemoteError(f"(from rank 0) {value!r}")
    else:
        error = RemoteError(f"(from rank 0) {value}")
    setattr(error, RAISED_ON_RANK_ATTR, 0)
    raise error


# --------------------------------------------------------------------------------- ZeRO-3 partitions
def is_partitioned(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: its local tensor is a placeholder; the whole one exists only when gathered."""
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The logical shape (a partitioned parameter's local tensor is empty)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def full_numel(tensor: torch.Tensor) -> int:
    return int(getattr(tensor, "ds_numel", tensor.numel()))


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make partitioned `params` whole for the block. With `modifier_rank`, that rank's in-place
    changes are scattered back to every rank's partition on exit. A no-op for plain tensors."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


# --------------------------------------------------------------------------- process-group defaults
TIMEOUT_VAR = "PIIP6B_DIST_TIMEOUT_S"
# torch's NCCL default is 10 minutes. A ZeRO-3 checkpoint of the 6B model (parameters plus fp32 Adam
# state, ~100 GB across ranks) or an evaluation with uneven work per rank can keep some ranks away
# from the next collective for longer than that on a busy parallel file system; a hang is still cut
# off well inside a job's time limit.
DEFAULT_TIMEOUT_S = 1800

NCCL_ENV_DEFAULTS: dict[str, str] = {
    # A collective that fails or times out tears the process down (3 = without the communicator
    # clean-up, which can itself hang), so srun --kill-on-bad-exit ends the job instead of every
    # other rank waiting until the time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # Flight recorder: on a timeout each rank dumps which collectives it had issued, which is how a
    # rank that took a different code path is found.
    "TORCH_FR_BUFFER_SIZE": "2000",  # torch 2.11 warns that the old TORCH_NCCL_TRACE_BUFFER_SIZE is deprecated
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    # Warnings and errors (e.g. a failing InfiniBand link) reach the job log; INFO is far too verbose.
    "NCCL_DEBUG": "WARN",
}

# DeepSpeed's CPU accelerator is chosen explicitly rather than by a failing CUDA probe on CPU nodes.
CPU_ENV_DEFAULTS: dict[str, str] = {"DS_ACCELERATOR": "cpu"}


@dataclass(frozen=True)
class ProcessGroupOptions:
    backend: str
    timeout: timedelta


def apply_env_defaults(environ: dict[str, str] | None = None, *, gpu: bool | None = None) -> dict[str, str]:
    """Set the defaults the user has not set (a site's module files and a user's exports always
    win); returns what was set, for logging. Call before DeepSpeed is imported: it picks its
    accelerator at import."""
    target = os.environ if environ is None else environ
    gpu = torch.cuda.is_available() if gpu is None else gpu
    applied = {}
    for name, value in (NCCL_ENV_DEFAULTS if gpu else CPU_ENV_DEFAULTS).items():
        if name not in target:
            target[name] = value
            applied[name] = value
    return applied


def process_group_options(device_type: str, environ: Mapping[str, str] | None = None) -> ProcessGroupOptions:
    """Backend and collective timeout for `deepspeed.init_distributed`, from the device and
    `PIIP6B_DIST_TIMEOUT_S`, whichever launcher started the job."""
    environ = os.environ if environ is None else environ
    raw = environ.get(TIMEOUT_VAR, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_VAR}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_VAR}={raw!r} must be positive")
    backend = "nccl" if device_type == "cuda" else "gloo"
    return ProcessGroupOptions(backend=backend, timeout=timedelta(seconds=seconds))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
