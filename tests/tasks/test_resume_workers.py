"""Bit-exact resume with loader workers, on a real task's augmentation (issue 14, item 20).

Each sample's augmentation is drawn from a seed of (run seed, global sample position) that comes
with it from the sampler, not from a worker's random stream, which restarts with the workers at
a resume. The tiny UperNet on the shapes data with two workers, ratio resize, category-balanced
crop, flip and photometric distortion: 4 steps straight, or 2 steps and a resume for 2 more,
give the same losses bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from piip6b.testing import REPO, child_env

pytestmark = pytest.mark.slow

CONFIG = "configs/tiny/piip_h6b_192_upernet_80k_ade20k_tiny.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from piip6b.tasks.data import ShapesSpec, write_shapes_dataset

    spec = ShapesSpec(num_train=6, num_val=1, min_size=64, max_size=112, max_objects=3, seed=2)
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", spec) / "ade"


def train(run_dir, data_root, steps: int) -> list[dict]:
    overrides = [f"run_dir={run_dir}", f"data.root={data_root}", "data.num_workers=2", "data.batch_size=2",
                 f"schedule.max_iters={steps}", "schedule.policy=constant", "schedule.warmup_iters=0",
                 "checkpoint.every_steps=2",
                 "logging.interval=1", "logging.print_groups=false", "evaluation.at_end=false",
                 "data.segmentation.scale=[192,64]", "data.segmentation.crop_size=[64,64]"]
    done = subprocess.run([sys.executable, "-m", "piip6b.cli", "train", CONFIG, *overrides], env=child_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_workers_is_bit_exact(tmp_path, shapes):
    straight = train(tmp_path / "straight", shapes, 4)
    train(tmp_path / "resumed", shapes, 2)
    resumed = train(tmp_path / "resumed", shapes, 4)
    assert [row["step"] for row in resumed] == [row["step"] for row in straight] == [1, 2, 3, 4]
    for key in ("loss", "loss/loss_seg", "loss/loss_aux", "grad_norm"):
        assert [row[key] for row in resumed] == [row[key] for row in straight], key
