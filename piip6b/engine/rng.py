"""Capture and restore every random number generator a rank draws from.

Exact resume needs each rank's own streams back: ranks draw different augmentations and
drop-path masks, so one shared state would silently change the run. The state is plain data
(CPU tensors, tuples, ints, floats, strings), saved with `torch.save` into the checkpoint's rng/
folder, so that `torch.load(..., weights_only=True)` reads it back: loading a checkpoint never
runs code a file smuggled in.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The current state of Python's, NumPy's, torch's CPU and (when present) CUDA generators."""
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        # NumPy's own tuple holds an ndarray, which only a full unpickler reads: keep its parts.
        "numpy": {"bit_generator": bit_generator, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "torch_cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only this rank's device: other devices belong to other ranks.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; a CUDA state captured on a GPU machine is ignored on CPU.
    Also takes the states checkpoints held before (NumPy's own tuple, see `LEGACY_NUMPY_GLOBALS`)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32),
                       numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.random.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _legacy_numpy_globals() -> list[Any]:
    # The array reconstructor under NumPy 2's and NumPy 1's module names (a file names the one of
    # the NumPy that wrote it); taken from an array's own pickle recipe, not a private import.
    reconstruct = np.zeros(0).__reduce__()[0]
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct")]


# RNG files written before the states were plain data hold NumPy's state tuple with a uint32
# array: these globals (building an array of a given dtype, nothing else) let `torch.load`'s
# weights-only unpickler read them.
LEGACY_NUMPY_GLOBALS = _legacy_numpy_globals()

