"""MetricsWriter across restarts: one curve per tag whatever step a run restarts from, and a file
system that stops taking writes costs a warning, not the run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from piip6b.engine.metrics import LoggingConfig, MetricsWriter
from piip6b.testing import fill_filesystem, small_filesystem

CONFIG = LoggingConfig(console=False)


def _tensorboard_curve(run_dir: Path, tag: str = "loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def _next_second() -> None:
    """Event files are named by the second they were opened in; TensorBoard reads them in name
    order, so a restart's file must carry a later second (a real restart takes many)."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def _start(run_dir: Path, resume_step: int, steps: range, offset: float) -> None:
    writer = MetricsWriter(run_dir, CONFIG, True, total_steps=5, resume_step=resume_step)
    for step in steps:
        writer.log(step, {"loss": offset + step})
    writer.close()
    _next_second()


def test_restart_from_step_zero_replaces_the_earlier_start(tmp_path):
    """Killed before its first checkpoint, a run starts again from step 0: TensorBoard must show
    steps 1, 2, 3 once (the new values), not 1, 2, 1, 2, 3."""
    _start(tmp_path, 0, range(1, 3), offset=0.0)
    _start(tmp_path, 0, range(1, 4), offset=10.0)
    assert _tensorboard_curve(tmp_path) == [(1, 11.0), (2, 12.0), (3, 13.0)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 11.0), (2, 12.0), (3, 13.0)]
    kept = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in kept] == [(1, 1.0), (2, 2.0)]  # nothing is lost


def test_restart_from_a_checkpoint_keeps_the_steps_before_it(tmp_path):
    _start(tmp_path, 0, range(1, 5), offset=0.0)
    _start(tmp_path, 2, range(3, 6), offset=10.0)
    assert _tensorboard_curve(tmp_path) == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_a_full_file_system_costs_a_warning_not_the_run(tmp_path, caplog):
    try:
        with small_filesystem(tmp_path / "disk", 256 << 10) as disk:
            _start(disk, 0, range(1, 4), offset=0.0)
            fill_filesystem(disk)
            with caplog.at_level("WARNING"):
                writer = MetricsWriter(disk, CONFIG, True, total_steps=5, resume_step=1)  # trims rows 2-3
                for step in range(2, 200):
                    writer.log(step, {"loss": float(step), "grad_norm": 1.0})
                writer.close()
    except PermissionError as error:
        pytest.skip(str(error))
    assert "could not move 2 rows after step 1" in caplog.text
    assert "cannot write to" in caplog.text
