"""One optimizer step: `grad_accum` forward/backward passes, then DeepSpeed's (ZeRO) optimizer step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from piip6b.devices import to_device
from piip6b.engine.build import BatchLayout
from piip6b.engine.metrics import ThroughputWindow


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's mean over micro-batches, + "loss"
    grad_norm: float = float("nan")  # DeepSpeed's global norm before clipping (all ranks agree)
    applied: bool = True  # False: DeepSpeed skipped the update (non-finite loss or gradient)


def train_step(engine: Any, batches: Iterator[dict], batch: BatchLayout, device: torch.device,
               window: ThroughputWindow) -> StepResult:
    """Run one optimizer step on the next `batch.grad_accum` micro-batches of `batches`.

    The task model returns a dict of loss terms; their sum is the loss. `engine.step()` runs after
    every backward: DeepSpeed applies the update only at the accumulation boundary. Times go to
    `window` (the host waits for the device only where DeepSpeed itself synchronises).
    """
    result = StepResult()
    for _ in range(batch.grad_accum):
        t0 = time.perf_counter()
        micro = to_device(next(batches), device)
        t1 = time.perf_counter()
        terms = engine(micro)
        loss = sum(terms.values())
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        window.add(t1 - t0, t2 - t1, t3 - t2, batch.micro_batch)
        for name, value in {**terms, "loss": loss}.items():
            result.losses[name] = result.losses.get(name, 0) + value.detach().float() / batch.grad_accum
    window.steps += 1
    norm = engine.get_global_grad_norm()
    result.grad_norm = float(norm) if norm is not None else float("nan")
    result.applied = bool(engine.was_step_applied())
    return result
