"""Preemption: a signal only sets a flag; the ranks agree on it where they are all at the same point.

Slurm sends SIGUSR1 (`--signal=USR1@...`, forwarded by the batch script) or SIGTERM before it
kills a job. Saving inside the signal handler would run collectives at an arbitrary point of the
step on one rank only; instead every rank checks `PreemptionWatcher.should_stop()` after each
optimizer step and before each evaluation batch, which all-reduces the flags (max), so all ranks
stop at the same step (or batch) together and exit with EXIT_PREEMPTED (75, EX_TEMPFAIL), on which
the batch script requeues the job.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from piip6b import dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = os.EX_TEMPFAIL  # 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised on every rank at the same point: a batch of an evaluation (`during_evaluation`, the
    evaluation is still to do), or another point the trainer stops at."""

    def __init__(self, message: str, during_evaluation: bool = True):
        super().__init__(message)
        self.during_evaluation = during_evaluation


class PreemptionWatcher:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.requested = False
        self.received: str | None = None  # the first signal's name, on this rank
        self.leaving = False
        self._signals = signals
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "PreemptionWatcher":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def leave(self) -> None:
        """The process has decided how it exits (finished, or checkpointed for a requeue): from now
        on these signals are ignored, also after `uninstall`. A USR1 during the teardown, or the TERM
        srun sends the other ranks when the first one exits, must not turn that exit into a death
        by signal (138/143), which the batch script would requeue or report as a failure."""
        self.leaving = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.leaving or self.requested else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.leaving or self.requested:
            return  # Slurm repeats USR1; srun forwards TERM: one request is enough
        self.requested = True
        self.received = signal.Signals(signum).name
        log.warning("received %s: will checkpoint and exit at the next step boundary (or evaluation batch)",
                    self.received)

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank has been signalled."""
        return dist.all_max(1.0 if self.requested else 0.0) > 0

    def describe(self) -> str:
        """What stopped this rank, for the one line it prints."""
        return self.received or "a signal to another rank"

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


class PreemptibleLoader:
    """A data loader whose batches stop when `should_stop()` (collective) says so: before each batch
    every rank asks, and all of them raise `Preempted` at the same batch. Evaluation passes under
    ZeRO-3 are collective (every forward gathers parameters), so one rank stopping alone would
    leave the others waiting in a gather until the collective timeout.

    Everything else (`dataset`, `len()`, ...) is the wrapped loader's.
    """

    def __init__(self, loader: Any, should_stop: Callable[[], bool]):
        self.loader = loader
        self.should_stop = should_stop

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if self.should_stop():
                raise Preempted(f"stopped before batch {index + 1} of {len(self.loader)}")
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
