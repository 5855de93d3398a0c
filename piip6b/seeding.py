"""Seeds: one integer for every generator, and stable seeds derived from it.

Ground floor: the engine seeds a rank with it, and the data pipeline keys each sample's
augmentation to (seed, sample position) with it, so a resume draws the same augmentations with any
number of loader workers.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of values, stable across processes and Python versions
    (unlike `hash()`, which is salted per process for strings)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (32-bit) and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
