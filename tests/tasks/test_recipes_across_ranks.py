"""The shipped recipes mean the same experiment at any world size (issue 12 §1, "done when"): the tiny
COCO and ADE20K twins, trained for real at 1, 2 and 4 CPU ranks (1 rank accumulates two forwards of
2 images, 2 ranks take 2 each, 4 ranks 1 each), consume the same images in every step and apply the
same lr after the same number of samples.

Each rank records the training-set indices it loads; with `data.num_workers: 0` the loader reads
exactly what the steps consume, so step s of a rank is its next micro-batch x accumulation indices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piip6b.tasks.data import ShapesSpec, write_shapes_dataset
from piip6b.testing import REPO, run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

STEPS = 2
# config, data, overrides, the lr of steps 1 and 2 by hand: optim.lr x 4/16 (the linear rule from
# the recipe's base batch of 16 to the twin's 4 images), times the warm-up ratio at step 1 (a warm-up
# of one step) and the policy at 4 of 8 samples at step 2.
RECIPES = {
    "coco": ("configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml", "coco", [
        # The shapes images are 64-96 px: train at that size.
        "data.detection.train_short_sides=[64]", "data.detection.train_max_size=96",
        "data.detection.detr_crop_short_sides=[]", "data.detection.train_crop_size=0"],
        [1e-4 / 4 * 1e-3, 1e-4 / 4]),  # step policy, no milestone
    "ade20k": ("configs/tiny/piip_h6b_512_upernet_80k_ade20k_tiny.yaml", "ade", [],
               [4e-5 / 4 * 1e-6, 4e-5 / 4 * 0.5]),  # poly, power 1, half-way
}


def _train_recording_indices(config: str, overrides: list[str]) -> dict:
    """One rank of `piip6b train` with the training set wrapped to record the indices it loads."""
    import os

    import torch

    from piip6b.config import load_config
    from piip6b.engine.build import BatchLayout
    from piip6b.tasks import build_task
    from piip6b.tasks.data.common import sample_key
    from piip6b.train import train

    class Recording(torch.utils.data.Dataset):
        def __init__(self, dataset, seen: list[int]):
            self.dataset, self.seen = dataset, seen

        def __len__(self) -> int:
            return len(self.dataset)

        def __getitem__(self, key):  # the training sampler yields (index, augmentation seed) keys
            self.seen.append(sample_key(key).index)
            return self.dataset[key]

        def __getattr__(self, name: str):
            return getattr(self.__dict__["dataset"], name)

    cfg = load_config(config, overrides)
    task = build_task(cfg)
    seen: list[int] = []
    build = task.build_dataset
    task.build_dataset = lambda split: Recording(build(split), seen) if split == "train" else build(split)
    code = train(cfg, task)
    batch = BatchLayout.from_config(cfg, int(os.environ["WORLD_SIZE"]))
    return {"code": code, "indices": seen, "per_step": batch.micro_batch * batch.grad_accum,
            "layout": [batch.micro_batch, batch.grad_accum]}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    spec = ShapesSpec(num_train=24, num_val=4, min_size=64, max_size=96, max_objects=3, seed=1)
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", spec)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_same_samples_and_lr_per_sample_at_1_2_4_ranks(name, shapes, tmp_path):
    config, data, extra, expected_lr = RECIPES[name]
    steps_by_world, rows_by_world = {}, {}
    for world in (1, 2, 4):
        run_dir = tmp_path / f"ranks{world}"
        overrides = [f"data.root={shapes / data}", f"run_dir={run_dir}", f"schedule.max_iters={STEPS}",
                     "schedule.warmup_iters=1", "evaluation.at_end=false", "checkpoint.every_steps=100",
                     "logging.interval=1", "logging.print_groups=false", *extra]
        results = run_ranks(_train_recording_indices, str(REPO / config), overrides, nproc=world, timeout=600).check()
        assert [r["code"] for r in results] == [0] * world
        assert {tuple(r["layout"]) for r in results} == {{1: (2, 2), 2: (2, 1), 4: (1, 1)}[world]}
        steps = []
        for step in range(STEPS):
            images = []
            for r in results:
                k = r["per_step"]
                images += r["indices"][step * k:(step + 1) * k]
            steps.append(sorted(images))
        assert all(len(r["indices"]) == STEPS * r["per_step"] for r in results)
        steps_by_world[world] = steps
        rows_by_world[world] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert steps_by_world[1] == steps_by_world[2] == steps_by_world[4]
    assert all(len(step) == 4 for step in steps_by_world[1])  # the tiny recipe's 4 images per step
    lr_by_samples = {world: [(row["samples"], row["lr"]) for row in rows] for world, rows in rows_by_world.items()}
    assert lr_by_samples[1] == lr_by_samples[2] == lr_by_samples[4]
    assert [s for s, _ in lr_by_samples[1]] == [4, 8]
    assert [lr for _, lr in lr_by_samples[1]] == pytest.approx(expected_lr, rel=1e-9)
