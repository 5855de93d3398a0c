"""The train loop under faults, on 2 gloo ranks (the feature task, `piip6b.testing`): signals at the
moments that used to break a run, a run that is already finished, a checkpoint of another model, a
planted pickle, a full disk. The worst moments are chosen by the test (a rank signals itself at a
given batch of a given evaluation), never by a clock; the tests judge the files the runs wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from piip6b import dist
from piip6b.tasks.evaluation.results import EvalResults
from piip6b.engine.checkpoint import (
    FINISHED_NAME,
    MANIFEST_NAME,
    CheckpointManager,
    file_digest,
    load_rng_file,
    tag_for_step,
)
from piip6b.testing import (
    FeatureTask,
    RandomImages,
    fill_filesystem,
    run_ranks,
    small_filesystem,
    tiny_experiment,
    train_feature_task,
)

pytestmark = pytest.mark.slow


class EvaluatedFeatureTask(FeatureTask):
    """The feature task with a validation split, whose metric is the mean feature loss.

    `signal_at` = {"evaluation": k, "batch": b} makes the rank send itself SIGUSR1 right after
    batch b of its k-th evaluation in this process; {"evaluation": k, "after": True} right after
    that evaluation's last batch (the final one: the moment before the teardown); {"evaluation": 0,
    "building": True} while the model is built."""

    def __init__(self, size: int, n_val: int, signal_at: dict | None):
        super().__init__(size=size)
        self.n_val, self.signal_at, self.evaluations = n_val, signal_at or {}, 0

    def build_dataset(self, split: str):
        return RandomImages(self.n_val, self.size, seed=7000) if split == "val" else super().build_dataset(split)

    def _signal(self, **moment) -> None:
        if self.signal_at == {"evaluation": self.evaluations, **moment}:
            os.kill(os.getpid(), signal.SIGUSR1)

    def build_model(self, backbone):
        self._signal(building=True)
        return super().build_model(backbone)

    def evaluate(self, model, loader, predictions_file=None) -> EvalResults:
        self.evaluations += 1
        total = 0.0
        for index, batch in enumerate(loader, 1):
            total += float(model(batch)["loss_feat"])
            self._signal(batch=index)
        self._signal(after=True)
        return EvalResults(dist.all_mean({"feat": total / len(loader)}))


def train_evaluated(tree: dict, n_val: int, signal_at: dict | None) -> int:
    """One rank of `piip6b.train.train` on EvaluatedFeatureTask; only rank 0 signals itself."""
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    cfg = build_dataclass(ExperimentConfig, tree)
    mine = signal_at if os.environ.get("RANK") == "0" else None
    return train(cfg, task=EvaluatedFeatureTask(max(cfg.model.img_sizes), n_val, mine))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def one_line_error(log: str, kind: str) -> str:
    """The message of the `kind` error a rank ended with (the last line of its traceback, which
    torch prefixes with the rank once the process group exists)."""
    lines = [re.sub(r"^\[rank\d+\]: ", "", line) for line in log.splitlines()]
    lines = [line for line in lines if line.startswith(f"{kind}: ")]
    assert lines, log[-3000:]
    return lines[-1].removeprefix(f"{kind}: ")


def test_preempted_evaluations_are_done_once_and_a_finished_run_stays_finished(tmp_path):
    run_dir = tmp_path / "run"
    tree = tiny_experiment(run_dir, schedule={"max_iters": 4}, checkpoint={"every_steps": 100},
                           evaluation={"interval": 2, "at_end": True},
                           data={"batch_size": 2, "num_workers": 0, "val_batch_size": 1})

    def start(signal_at=None, **changes):
        return run_ranks(train_evaluated, {**tree, **changes}, 8, signal_at, nproc=2, timeout=300)

    # 1. USR1 in the middle of the periodic evaluation at step 2 (after batch 2 of 4 per rank):
    #    every rank stops before batch 3, step 2 is saved, exit 75, nothing evaluated is logged.
    first = start({"evaluation": 1, "batch": 2})
    assert first.check() == [75, 75], first.tails()  # every rank: preempted
    assert f"preempted at step 2 (stopped before batch 3 of 4) on SIGUSR1: checkpoint {run_dir}/checkpoints/" \
           f"{tag_for_step(2)} is complete; exiting with 75" in first.logs[0], first.tails()
    assert not [r for r in rows(run_dir) if "eval/feat" in r]
    assert CheckpointManager.validate(run_dir / "checkpoints" / tag_for_step(2)).step == 2

    # 2. The restart runs that evaluation first, trains steps 3-4, saves step 4, and a USR1 comes
    #    during the final evaluation: exit 75 again, the finished marker is not written.
    second = start({"evaluation": 2, "batch": 2})
    assert second.check() == [75, 75], second.tails()  # every rank: preempted
    assert "preempted at step 4 (stopped before batch 3 of 4) on SIGUSR1" in second.logs[0], second.tails()
    assert [r["step"] for r in rows(run_dir) if "eval/feat" in r] == [2]
    assert not (run_dir / FINISHED_NAME).exists()

    # 3. The restart evaluates step 4; a USR1 right after that evaluation (then the teardown)
    #    changes nothing: exit 0, the run is marked finished.
    third = start({"evaluation": 1, "after": True})
    assert third.check() == [0, 0], third.tails()
    finished = json.loads((run_dir / FINISHED_NAME).read_text())
    assert (finished["step"], finished["evaluated"]) == (4, True) and "feat" in finished["metrics"]

    # 4. Started again (the requeue after a late signal, or a resubmission): nothing to do.
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    events_before = sorted(p.name for p in (run_dir / "tb").iterdir())
    fourth = start()
    assert fourth.check() == [0, 0], fourth.tails()
    assert "run already finished at step 4" in fourth.logs[0] and "nothing to do" in fourth.logs[0]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert sorted(p.name for p in (run_dir / "tb").iterdir()) == events_before

    # Each evaluation once, each step once, in metrics.jsonl and TensorBoard alike.
    assert [r["step"] for r in rows(run_dir) if "eval/feat" in r] == [2, 4]
    assert [r["step"] for r in rows(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert tensorboard_steps(run_dir, "eval/feat") == [2, 4]
    assert tensorboard_steps(run_dir, "loss") == [1, 2, 3, 4]

    # 5. A longer schedule is more to do: the finished run trains on.
    fifth = start(schedule={"max_iters": 6}, evaluation={"interval": 0, "at_end": False})
    assert fifth.check() == [0, 0], fifth.tails()
    assert [r["step"] for r in rows(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / FINISHED_NAME).read_text())["step"] == 6


def test_usr1_while_the_model_is_built_stops_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    ranks = run_ranks(train_evaluated, tiny_experiment(run_dir), 8, {"evaluation": 0, "building": True},
                      nproc=2, timeout=300)
    assert ranks.check() == [75, 75], ranks.tails()
    assert ("preempted at step 0 (signalled while the model was being built) on SIGUSR1: nothing trained "
            "yet, nothing to save; exiting with 75") in ranks.logs[0], ranks.tails()
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def _two_step_tree(run_dir: Path, **sections) -> dict:
    return tiny_experiment(run_dir, **{"schedule": {"max_iters": 2}, "checkpoint": {"every_steps": 100}, **sections})


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A finished 2-rank run of the tiny PIIP-H6B (checkpoint at step 2), copied by the tests."""
    run_dir = tmp_path_factory.mktemp("two_step") / "run"
    ranks = run_ranks(train_feature_task, _two_step_tree(run_dir), nproc=2, timeout=300)
    assert ranks.check() == [0, 0], ranks.tails()
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "source"
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_of_another_preset_is_refused_in_one_line_before_anything_is_written(two_step_run, tmp_path):
    source = _copy(two_step_run, tmp_path)
    target = tmp_path / "other_preset"
    tree = _two_step_tree(target, model={"preset": "internvit6b_baseline_tiny", "img_sizes": [64]},
                          checkpoint={"every_steps": 100, "resume": str(source)})
    ranks = run_ranks(train_feature_task, tree, nproc=1, timeout=300)
    assert ranks.returncodes != [0]
    message = one_line_error(ranks.logs[0], "piip6b.engine.checkpoint.CheckpointError")
    assert message.startswith(f"checkpoint {source}/checkpoints/{tag_for_step(2)} holds another model: preset "
                              "'piip_h6b_tiny' (this run: 'internvit6b_baseline_tiny')"), message
    assert not (target / "checkpoints").exists()  # no universal conversion, nothing set aside


def test_checkpoint_without_a_model_record_is_refused_by_its_shapes_before_converting(two_step_run, tmp_path):
    """A checkpoint whose manifest does not say which model (written before the record existed,
    or the same preset with other head sizes) is compared by parameter shapes, before the
    world-size conversion writes anything."""
    source = _copy(two_step_run, tmp_path)
    manifest_path = source / "checkpoints" / tag_for_step(2) / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["extra"] = {}
    manifest_path.write_text(json.dumps(manifest))
    target = tmp_path / "other_model"
    tree = _two_step_tree(target, model={"preset": "internvit6b_baseline_tiny", "img_sizes": [64]},
                          checkpoint={"every_steps": 100, "resume": str(source)})
    ranks = run_ranks(train_feature_task, tree, nproc=1, timeout=300)
    assert ranks.returncodes != [0]
    message = one_line_error(ranks.logs[0], "piip6b.engine.checkpoint.CheckpointError")
    assert "holds another model than this run builds" in message and "parameters here are not in it" in message
    assert not (target / "checkpoints" / "universal").exists() and not (source / "checkpoints" / "universal").exists()


def _plant(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace `name` in `checkpoint` by a pickle that writes `marker` when loaded, and make the
    manifest vouch for it (size and hash): a tampered checkpoint that passes verification."""

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "the payload ran"))

    if name.startswith("rng/"):
        torch.save({**load_rng_file(checkpoint / name), "python": Payload()}, checkpoint / name)
    else:
        torch.save({"optimizer_state_dict": Payload()}, checkpoint / name)
    manifest_path = checkpoint / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = (checkpoint / name).stat().st_size
    manifest["checksums"][name] = file_digest(checkpoint / name)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("planted", ["rng/rank_00000.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_auto_resume_refuses_a_planted_pickle_and_does_not_run_it(two_step_run, tmp_path, planted):
    run_dir = _copy(two_step_run, tmp_path)
    (run_dir / FINISHED_NAME).unlink()  # a run still in progress
    marker = tmp_path / "payload_ran"
    _plant(run_dir / "checkpoints" / tag_for_step(2), planted, marker)
    ranks = run_ranks(train_feature_task, _two_step_tree(run_dir, schedule={"max_iters": 3}), nproc=2, timeout=300)
    assert ranks.returncodes != [0, 0]
    assert not marker.exists()
    message = one_line_error("\n".join(ranks.logs), "piip6b.engine.checkpoint.CheckpointError")
    assert "holds more than tensors and plain data, so it was not loaded" in message, message


def test_full_disk_stops_at_the_save_in_one_line_and_the_restart_recovers(tmp_path):
    """A save on a file system without room fails before writing, in one line naming the file
    system; a restart on the still-full disk fails the same way before training (not in the
    bookkeeping); once space is freed the run resumes and its steps equal the first attempt's."""
    try:
        filesystem = small_filesystem(tmp_path / "disk", 16 << 20)
        disk = filesystem.__enter__()
    except PermissionError as error:
        pytest.skip(str(error))
    try:
        run_dir = disk / "run"
        tree = tiny_experiment(run_dir, schedule={"max_iters": 6}, checkpoint={"every_steps": 3})
        estimate = 7 << 20  # a tiny-model checkpoint is ~5.7 MB; its estimate before the first is ~6 MB
        filler = fill_filesystem(disk, leave_bytes=estimate + (1 << 20))

        first = run_ranks(train_feature_task, tree, nproc=2, timeout=300)
        assert first.returncodes != [0, 0]
        message = one_line_error(first.logs[0], "piip6b.engine.checkpoint.CheckpointSpaceError")
        assert message.startswith(f"no room for checkpoint {tag_for_step(6)} in {run_dir}/checkpoints"), message
        assert f"mounted at {disk}" in message and f"resumes from {tag_for_step(3)}" in message
        assert not (run_dir / "checkpoints" / tag_for_step(6)).exists()
        attempted = {r["step"]: r["loss"] for r in rows(run_dir)}
        assert sorted(attempted) == [1, 2, 3, 4, 5, 6]

        # A save cut short by the full disk left a partial checkpoint; the disk is still full. The
        # ranks' pre-flight refuses the restart before it writes anything (the bookkeeping included).
        partial = run_dir / "checkpoints" / tag_for_step(5)
        partial.mkdir()
        (partial / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(bytes(1 << 20))
        fill_filesystem(disk)
        second = run_ranks(train_feature_task, tree, nproc=2, timeout=300)
        assert second.returncodes != [0, 0]
        message = one_line_error(second.logs[0], "piip6b.preflight.PreflightError")
        assert message.startswith(f"run_dir {run_dir}: "), message
        assert "free on its file system, but a checkpoint of piip_h6b_tiny" in message, message
        assert "OSError: [Errno 28]" not in second.logs[0], second.tails()  # no bookkeeping crash

        filler.unlink()  # the user frees space
        third = run_ranks(train_feature_task, tree, nproc=2, timeout=300)
        assert third.check() == [0, 0], third.tails()
        assert {r["step"]: r["loss"] for r in rows(run_dir)} == attempted  # bit for bit, each step once
    finally:
        filesystem.__exit__(None, None, None)
