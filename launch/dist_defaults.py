"""Distributed defaults for long multi-node jobs, in one place.

Each environment default is applied only where the user has not set the variable, so a site's
module files and a user's exports always win. The trainer takes its backend and collective timeout
from `process_group_options`, so `launch` and a direct `torchrun` start give the same behaviour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def apply_env_defaults(environ: dict[str, str] | None = None, *, gpu: bool | None = None) -> dict[str, str]:
    """Set the defaults the user has not set; returns what was set (for logging)."""
    target = os.environ if environ is None else environ
    gpu = cuda_available() if gpu is None else gpu
    applied = {}
    for name, value in (NCCL_ENV_DEFAULTS if gpu else CPU_ENV_DEFAULTS).items():
        if name not in target:
            target[name] = value
            applied[name] = value
    return applied


def process_group_options(device_type: str, environ: dict[str, str] | None = None) -> ProcessGroupOptions:
    """Backend and collective timeout for `init_process_group` / `deepspeed.init_distributed`."""
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
