"""The console line, its ETA, memory scalars and TensorBoard entries of `MetricsWriter`, in-process.

The console format is checked on the text a run writes to its `train.log` (no screenshot: the
line is a logging record, formatted by the trainer's own `setup_logging`). Times are synthetic:
the ETA must follow the step time the loop measured, whatever the wall clock did between rows.
Across restarts: one curve per tag whatever step a run restarts from, and a file system that stops
taking writes costs a warning, not the run.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import torch

from piip6b.engine import metrics
from piip6b.engine.metrics import LoggingConfig, MetricsWriter, ThroughputWindow
from piip6b import train
from piip6b.testing import fill_filesystem, small_filesystem
from piip6b.train import TRAIN_LOG, setup_logging

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
NUMBER = r"-?\d+\.\d+(?:e[-+]\d+)?"


@pytest.fixture
def run_log(tmp_path):
    """`setup_logging` as rank 0 of a run in tmp_path; the test's logging is restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(True, tmp_path)
    yield tmp_path / TRAIN_LOG
    logging.getLogger("DeepSpeed").removeHandler(train._run_log)
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved
    logging.captureWarnings(False)


def _window(step_s: float, steps: int, images_per_step: int = 2) -> ThroughputWindow:
    window = ThroughputWindow(world_size=2, flops_per_image=1e9, peak_flops=1e12, device=torch.device("cpu"))
    for _ in range(steps):
        window.add(0.1 * step_s, 0.7 * step_s, 0.2 * step_s, images_per_step)
        window.steps += 1
    return window


def _row(window: ThroughputWindow) -> dict[str, float]:
    return {"loss": 1.5, "loss/loss_cls": 1.0, "loss/loss_box": 0.5, "lr": 1e-4, "grad_norm": 2.0, **window.scalars()}


def test_console_line_in_train_log(tmp_path, run_log):
    writer = MetricsWriter(tmp_path, LoggingConfig(), is_main=True, total_steps=100)
    writer.log(10, _row(_window(0.5, 10)))
    writer.close()
    start, line = run_log.read_text().splitlines()[-2:]
    assert re.fullmatch(rf"{TIMESTAMP} INFO piip6b.train: ===== start: 1 rank\(s\), .* =====", start), start
    pattern = (
        rf"{TIMESTAMP} INFO piip6b.metrics: step 10/100"
        rf" \| loss 1.5000 \(loss_cls 1.0000, loss_box 0.5000\)"  # every loss term
        rf" \| lr 1.000e-04 \| gnorm 2.000"
        rf" \| 0.500 s/step \(data 0.050 s\)"  # the data wait per step
        rf" \| 8.00 img/s \| mfu {NUMBER}%"
        rf" \| mem peak {NUMBER} GiB, reserved {NUMBER} GiB"
        rf" \| eta 00:00:45"
    )
    assert re.fullmatch(pattern, line), line


def test_eta_follows_the_steps_not_an_evaluation_between_rows(tmp_path, run_log, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
    writer = MetricsWriter(tmp_path, LoggingConfig(), is_main=True, total_steps=100)
    writer.log(10, _row(_window(0.5, 10)))  # steps 1-10: 0.5 s each
    clock[0] += 5 + 3600  # steps 11-20, then an hour of evaluation and checkpointing
    writer.log(20, _row(_window(0.5, 10)))
    writer.log(100, _row(_window(0.5, 10)))
    writer.close()
    etas = [line.rsplit("| eta ", 1)[1] for line in run_log.read_text().splitlines() if "| eta " in line]
    assert etas == ["00:00:45", "00:00:40", "00:00:00"]


def test_not_applicable_values_and_text_reach_tensorboard_and_json(tmp_path, run_log):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, LoggingConfig(), is_main=True, total_steps=100)
    writer.log_text(0, "config", "```yaml\nseed: 3\n```")
    writer.log(50, {"eval/bbox/AP": 41.25, "eval/bbox/APl": None},
               details={"eval/per_class": {"bbox/AP": {"person": 52.5, "toaster": None}}})
    writer.log_text(50, "eval/per_class", "| class | bbox/AP |", console_text="class  bbox/AP\nperson  52.50")
    writer.close()

    row = json.loads((tmp_path / MetricsWriter.JSONL).read_text().splitlines()[-1])
    assert row["eval/bbox/APl"] is None and row["eval/per_class"]["bbox/AP"] == {"person": 52.5, "toaster": None}
    log = run_log.read_text()
    assert re.search(rf"{TIMESTAMP} INFO piip6b.metrics: step 50/100 \| eval/bbox/AP 41.25 \| eval/bbox/APl n/a\n", log)
    assert "step 50 eval/per_class:\nclass  bbox/AP\nperson  52.50\n" in log

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"eval/bbox/AP"}  # no point for "not applicable"
    assert {"config/text_summary", "eval/per_class/text_summary"} <= set(acc.Tags()["tensors"])
    (config,) = acc.Tensors("config/text_summary")
    assert config.tensor_proto.string_val[0].decode() == "```yaml\nseed: 3\n```"


def test_cpu_memory_scalars_are_the_gpu_tags_that_mean_the_same():
    scalars = metrics.memory_scalars(torch.device("cpu"))
    assert set(scalars) == {"memory/peak_gib", "memory/reserved_gib"}
    assert all(value > 0 for value in scalars.values())
    assert set(scalars) <= set(_window(0.5, 3).scalars())


def test_gpu_memory_scalars_and_per_window_peak_reset(monkeypatch):
    """The CUDA branch against a stand-in allocator (no GPU here): which statistic feeds which tag,
    and that each window starts a new peak."""
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {"num_alloc_retries": 7, "num_ooms": 1})
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(device))
    device = torch.device("cuda", 0)
    assert metrics.memory_scalars(device) == {"memory/peak_gib": 3.0, "memory/reserved_gib": 4.0,
                                              "memory/alloc_retries": 7.0, "memory/ooms": 1.0}
    window = ThroughputWindow(1, 0.0, 1.0, device)
    window.reset()
    assert calls == [device, device]
    writer = MetricsWriter(Path("unused"), LoggingConfig(), is_main=False, total_steps=10)
    line = writer._console_line(5, {"loss": 1.0, **_window(0.5, 2).scalars(), **metrics.memory_scalars(device)})
    assert "mem peak 3.00 GiB, reserved 4.00 GiB, alloc retries 7, OOMs 1" in line


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


# TensorBoard's own writer thread also meets the full disk and dies with an exception of its own;
# what this test checks is that the training thread gets a warning and goes on.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
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
