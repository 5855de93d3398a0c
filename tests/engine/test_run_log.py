"""What a run shows while it runs, end to end on 2 gloo ranks: `train.log` in the run directory
whichever way the ranks were started (`--nproc`'s local spawn, env:// ranks as torchrun starts
them), appended across a restart behind a start marker; evaluation progress and per-class tables
in it; and the TensorBoard tags: config text at each start, memory, per-class text, no per-class
scalar tags. (Slurm: tests/launch/test_slurm_run_log.py.)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from piip6b.progress import with_progress
from piip6b.tasks.evaluation import EvalResults
from piip6b.testing import FeatureTask, RandomImages, run_ranks, tiny_experiment

pytestmark = pytest.mark.slow

TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class EvaluatedFeatureTask(FeatureTask):
    """The feature task with a validation split, scored per loss term ("class"); one column is
    never applicable."""

    def build_dataset(self, split: str):
        return super().build_dataset(split) if split == "train" else RandomImages(4, self.size, seed=77)

    def evaluate(self, model, loader, predictions_file=None) -> EvalResults:
        sums: dict[str, float] = {}
        for batch in with_progress(loader, "feature evaluation", logging.getLogger("piip6b.evaluate")):
            for name, value in model(batch).items():
                sums[name] = sums.get(name, 0.0) + float(value)
        return EvalResults({"loss_feat": sums["loss_feat"], "AP_small": None},
                           {"loss": {"feat": sums["loss_feat"], "head": sums["loss_head"], "never": None}})


def train_evaluated(tree: dict) -> int:
    """One rank of `piip6b.train.train` on the evaluated feature task (a rank target)."""
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.train import train

    cfg = build_dataclass(ExperimentConfig, tree)
    return train(cfg, task=EvaluatedFeatureTask(size=max(cfg.model.img_sizes)))


def experiment(run_dir: Path, steps: int = 6) -> dict:
    return tiny_experiment(run_dir, schedule={"max_iters": steps}, evaluation={"interval": 2, "at_end": True},
                           checkpoint={"every_steps": 3, "keep_last": 2})


def console_steps(log: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^{TIMESTAMP} INFO piip6b.metrics: step (\d+)/\d+ \| loss ", log, re.M)]


def test_local_spawn_writes_train_log_with_progress_and_tables(tmp_path):
    """`piip6b train --nproc 2`'s launcher: `spawn_local` starts the ranks itself."""
    from piip6b.engine.distributed import spawn_local

    run_dir = tmp_path / "spawned"
    assert spawn_local(2, train_evaluated, (experiment(run_dir),)) == 0
    log = (run_dir / "train.log").read_text()
    assert len(re.findall(rf"^{TIMESTAMP} INFO piip6b.train: ===== start: 2 rank\(s\)", log, re.M)) == 1
    assert console_steps(log) == [1, 2, 3, 4, 5, 6]
    assert "optimizer parameter groups:\ngroup" in log  # print-outs of the start went to the log too
    progress = re.findall(rf"^{TIMESTAMP} INFO piip6b.evaluate: feature evaluation: (\d)/2 batches, "
                          r"[\d.]+ s/batch, eta \d\d:\d\d:\d\d$", log, re.M)
    assert progress == ["1", "2"] * 3  # evaluations at steps 2 and 4, and at the end
    table = re.search(r"step 6 eval/per_class:\n(.*\n.*\n.*\n.*)\n", log).group(1).splitlines()
    assert [row.split()[0] for row in table] == ["class", "feat", "head", "never"]
    assert table[3].split() == ["never", "n/a"]
    assert re.search(r"step 6/6 \| eval/loss_feat [\d.]+ \| eval/AP_small n/a", log)


def test_env_ranks_append_train_log_across_a_restart_and_fill_tensorboard(tmp_path):
    """Ranks joined by env:// variables (as torchrun starts them), stopped after 3 steps and
    resumed: one train.log, two start markers, every step once; TensorBoard has the config at each
    start, memory curves and the per-class table as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "restarted"
    assert run_ranks(train_evaluated, experiment(run_dir, steps=3), nproc=2, timeout=300).check() == [0, 0]
    assert run_ranks(train_evaluated, experiment(run_dir), nproc=2, timeout=300).check() == [0, 0]
    log = (run_dir / "train.log").read_text()
    starts = [m.start() for m in re.finditer(r"===== start: 2 rank\(s\)", log)]
    assert len(starts) == 2
    assert console_steps(log[: starts[1]]) == [1, 2, 3]
    assert console_steps(log[starts[1]:]) == [4, 5, 6]
    assert "resumed at step 3" in log[starts[1]:]

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"memory/peak_gib", "memory/reserved_gib", "perf/step_s", "perf/data_s", "loss/loss_feat",
            "loss/loss_head", "eval/loss_feat"} <= scalars
    assert "eval/AP_small" not in scalars and not any(tag.startswith("eval/loss/") for tag in scalars)
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0, 3]
    assert "seed: 3" in acc.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    per_class = acc.Tensors("eval/per_class/text_summary")
    assert [e.step for e in per_class] == [2, 3, 4, 6]  # every 2 steps, and at the end of each run
    assert "| never | n/a |" in per_class[-1].tensor_proto.string_val[0].decode()
