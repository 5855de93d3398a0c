"""Where tensors go: moving batches, and which device a (possibly wrapped) model computes on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch's tensors (also inside lists and dicts, e.g. detection targets) on `device`."""
    return tree_map(lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v, batch)


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes (a DeepSpeed engine knows; a module's parameters tell otherwise;
    ZeRO-3-partitioned parameters are empty but still on the right device)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
