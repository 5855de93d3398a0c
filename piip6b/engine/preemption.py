"""Preemption: a signal only sets a flag; the loop agrees on it across ranks at step boundaries.

Slurm sends SIGUSR1 (`--signal=USR1@...`, forwarded by the batch script) or SIGTERM before it
kills a job. Saving inside the signal handler would run collectives at an arbitrary point of the
step on one rank only; instead every rank checks `PreemptionWatcher.should_stop()` after each
optimizer step, which all-reduces the flags (max), so all ranks save the same step together and
exit with EXIT_PREEMPTED (75, EX_TEMPFAIL), on which the batch script requeues the job.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

from piip6b import dist

log = logging.getLogger(__name__)

EXIT_PREEMPTED = os.EX_TEMPFAIL  # 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatcher:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.requested = False
        self.saving = False
        self._signals = signals
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "PreemptionWatcher":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            # After a preemption save the process is on its way out with EXIT_PREEMPTED: a repeated
            # USR1, or the TERM srun sends the other ranks when the first one exits, must not turn
            # that exit into a death by signal (138/143), which would not be requeued.
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.saving or self.requested:
            # A second signal (Slurm repeats USR1; srun forwards TERM) must not interrupt the save.
            return
        self.requested = True
        log.warning("received %s: will checkpoint and exit at the next step boundary",
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank has been signalled."""
        return dist.all_max(1.0 if self.requested else 0.0) > 0

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
