"""Capture and restore every random number generator a rank draws from.

Exact resume needs each rank's own streams back: ranks draw different augmentations and
drop-path masks, so one shared state would silently change the run. The state is a plain dict
of CPU tensors, NumPy arrays and tuples, saved with `torch.save` into the checkpoint's rng/ folder.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The current state of Python's, NumPy's, torch's CPU and (when present) CUDA generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only this rank's device: other devices belong to other ranks.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; a CUDA state captured on a GPU machine is ignored on CPU."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
