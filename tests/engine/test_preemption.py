"""Preemption signals: the watcher's flag, its agreement across ranks, and passes that stop on it."""

from __future__ import annotations

import os
import signal

import pytest

from piip6b.engine.preemption import PreemptibleLoader, Preempted, PreemptionWatcher
from piip6b.testing import run_ranks


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_sets_the_flag_and_names_itself(restore_signals):
    watcher = PreemptionWatcher().install()
    assert not watcher.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # a second one does not overwrite the first
    assert watcher.should_stop() and watcher.describe() == "SIGUSR1"
    watcher.uninstall()
    # Requested: the process is on its way out with 75, later signals must not kill it.
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_after_leave_signals_are_ignored_through_teardown(restore_signals):
    """Once the trainer knows how it exits (finished), a USR1 during the teardown neither stops
    nor kills it: the batch script would otherwise requeue a finished run."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    watcher = PreemptionWatcher().install()
    watcher.leave()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert not watcher.requested
    watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGUSR1)  # would end this process under SIG_DFL


def test_uninstall_without_a_request_restores_the_previous_handlers(restore_signals):
    def previous(signum, frame):
        pass

    signal.signal(signal.SIGUSR1, previous)
    watcher = PreemptionWatcher().install()
    watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous


class _Loader:
    dataset = "the dataset"

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_preemptible_loader_stops_before_the_batch_after_the_request():
    answers = iter([False, False, True])
    loader = PreemptibleLoader(_Loader(["a", "b", "c", "d"]), lambda: next(answers))
    assert len(loader) == 4 and loader.dataset == "the dataset"
    seen = []
    with pytest.raises(Preempted, match="before batch 3 of 4"):
        for batch in loader:
            seen.append(batch)
    assert seen == ["a", "b"]


def _two_ranks_one_signalled(signalled_rank: int, signal_after: int) -> list[int]:
    """Iterate 6 batches; rank `signalled_rank` gets SIGUSR1 after its batch `signal_after`.
    Returns the batches each rank saw before Preempted."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo")
    watcher = PreemptionWatcher().install()
    seen = []
    try:
        for batch in PreemptibleLoader(_Loader(list(range(6))), watcher.should_stop):
            seen.append(batch)
            if torch_dist.get_rank() == signalled_rank and batch == signal_after:
                os.kill(os.getpid(), signal.SIGUSR1)
    except Preempted:
        pass
    finally:
        watcher.uninstall()
        torch_dist.destroy_process_group()
    return seen


def test_every_rank_stops_at_the_same_batch_when_one_is_signalled():
    """Under ZeRO-3 every forward of an evaluation gathers parameters: a rank stopping alone would
    leave the others waiting in a gather. The flag is agreed on before each batch."""
    results = run_ranks(_two_ranks_one_signalled, 1, 2, nproc=2, timeout=120).check()
    assert results == [[0, 1, 2], [0, 1, 2]]
