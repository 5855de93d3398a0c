"""Progress with an ETA: the duration format of the training console line, and rank 0's progress
lines over a pass (evaluation) that uses no collective to make them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from piip6b import dist

T = TypeVar("T")


def format_duration(seconds: float) -> str:
    """`[Nd ]HH:MM:SS`, or `?` when unknown (NaN, infinite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def with_progress(items: Iterable[T], what: str, log: logging.Logger, lines: int = 10) -> Iterator[T]:
    """Yield `items`; rank 0 logs `what: i/N batches, s/batch, eta` about `lines` times in all
    (the time counted after each item includes the caller's work on it). Rank 0 times its own
    share: every rank holds the same number of batches (InferenceSampler), so no collective is
    needed and none is added to the pass (under ZeRO-3 their number and order must match)."""
    total = len(items) if isinstance(items, Sized) else 0
    every = max(1, -(-total // lines)) if total else 0
    report = dist.is_main() and every > 0
    started = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        if report and (done % every == 0 or done == total):
            per_item = (time.monotonic() - started) / done
            log.info("%s: %d/%d batches, %.2f s/batch, eta %s", what, done, total, per_item,
                     format_duration(per_item * (total - done)))
