"""`piip6b` argument parsing (options and key=value overrides in any order: issue 14, item 14) and
the one-line failure report, in the parts that need no process group (the multi-rank causes:
tests/launch/test_rank_errors.py)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from piip6b import cli
from piip6b.engine import distributed

CONFIG = "configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml"


@pytest.fixture
def recorded(monkeypatch):
    """What `piip6b train` / `piip6b eval` hand to their library call, instead of running it."""
    calls = []

    def record(name):
        def start(*args):
            calls.append((name, args))
            return 0
        return start

    import piip6b.evaluate
    import piip6b.train

    monkeypatch.setattr(piip6b.train, "start", record("train"))
    monkeypatch.setattr(piip6b.evaluate, "start", record("eval"))
    return calls


@pytest.mark.parametrize("argv", [
    ["train", CONFIG, "--nproc", "2", "optim.lr=2e-4", "seed=1"],
    ["train", CONFIG, "optim.lr=2e-4", "seed=1", "--nproc", "2"],
    ["train", CONFIG, "optim.lr=2e-4", "--nproc", "2", "seed=1"],
    ["train", "--nproc", "2", CONFIG, "optim.lr=2e-4", "seed=1"],
    ["train", "--nproc=2", CONFIG, "optim.lr=2e-4", "seed=1"],
], ids=["options-first", "options-last", "options-between", "before-config", "equals-form"])
def test_train_accepts_overrides_wherever_they_are(recorded, argv):
    assert cli.main(argv) == 0
    assert recorded == [("train", (CONFIG, ["optim.lr=2e-4", "seed=1"], 2))]


def test_train_resume_joins_the_overrides(recorded):
    assert cli.main(["train", CONFIG, "--resume", "runs/x", "seed=1"]) == 0
    assert recorded == [("train", (CONFIG, ["seed=1", "checkpoint.resume=runs/x"], None))]


@pytest.mark.parametrize("argv", [
    ["eval", CONFIG, "--weights", "w.safetensors", "seed=1", "--nproc", "2", "data.root=/d"],
    ["eval", CONFIG, "--nproc", "2", "--weights", "w.safetensors", "seed=1", "data.root=/d"],
    ["eval", "--weights", "w.safetensors", CONFIG, "seed=1", "--nproc", "2", "data.root=/d"],
])
def test_eval_accepts_overrides_wherever_they_are(recorded, argv):
    assert cli.main(argv) == 0
    assert recorded == [("eval", (CONFIG, ["seed=1", "data.root=/d"], "w.safetensors", 2, None, None))]


def test_usage_errors_stay_argparse_errors(recorded, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", CONFIG, "--nproc", "two"])
    assert exit_info.value.code == 2 and "invalid int value: 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["trian", CONFIG])
    assert "invalid choice: 'trian'" in capsys.readouterr().err
    assert recorded == []


# ------------------------------------------------------------------------------ failure reports
def test_outside_a_process_group_rank_0_alone_speaks(monkeypatch, capsys):
    for rank, expected in (("1", []), ("0", ["piip6b train: error: schedule.max_iters must be >= 1"])):
        monkeypatch.setenv("RANK", rank)
        assert distributed.report_failure("piip6b train", ValueError("schedule.max_iters must be >= 1")) == 2
        assert capsys.readouterr().err.splitlines() == expected


def test_unexpected_errors_name_their_type_and_traceback_file(tmp_path, capsys):
    def broken():
        raise RuntimeError("no kernel image for\nthis device")

    assert distributed.run_entry("piip6b train", broken, run_dir=tmp_path) == 1
    (line,) = capsys.readouterr().err.splitlines()
    trace_file = tmp_path / "logs" / "traceback-rank0.log"
    assert line == f"piip6b train: error: RuntimeError: no kernel image for this device (traceback: {trace_file})"
    assert "Traceback (most recent call last)" in trace_file.read_text() and "in broken" in trace_file.read_text()
    assert distributed.run_entry("piip6b train", broken, run_dir=tmp_path) == 1
    assert trace_file.read_text().count("=== ") == 2  # appended, the first failure kept


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        from piip6b.tasks.data import DataError

        raise DataError(f"image /data/{index}.jpg does not exist")


def test_a_loader_workers_error_keeps_its_own_message():
    loader = torch.utils.data.DataLoader(_Unreadable(), num_workers=1)
    with pytest.raises(Exception) as error:
        next(iter(loader))
    assert "DataLoader worker process 0" in str(error.value)  # what torch makes of it
    assert distributed.one_line(error.value) == "image /data/0.jpg does not exist"


def _killed_on_rank_1() -> int:
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


def test_spawn_local_names_a_rank_killed_by_a_signal(capsys):
    assert distributed.spawn_local(2, _killed_on_rank_1, command="piip6b train") == 128 + signal.SIGKILL
    assert capsys.readouterr().err.splitlines() == [
        "piip6b train: error: rank 1 was killed by SIGKILL (out of memory? the kernel's OOM killer sends it)"]
