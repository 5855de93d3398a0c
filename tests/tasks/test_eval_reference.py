"""The trainer's final evaluation and `piip6b eval` of the same checkpoint give the same numbers,
to the last digit (issue 14, item 6b).

Both evaluate the same bf16 weights (the engine's are the fp32 masters rounded to bf16, which is
what `piip6b eval` makes of the consolidated checkpoint) with the same numerics (torch's own
linear layers: DeepSpeed's ZeRO-3 replacement is switched off) and one image per forward, so the
world size and the validation batch size, which decide which images share a batch, cannot matter.
Here the trainer evaluates on 2 ranks and `piip6b eval` on 1, both with 2 images per batch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from piip6b.cli import main
from piip6b.testing import REPO, child_env

pytestmark = pytest.mark.slow

CASES = {
    "segmentation": ("configs/tiny/piip_h6b_192_upernet_80k_ade20k_tiny.yaml", "ade",
                     ["data.segmentation.scale=[192,64]", "data.segmentation.test_scale=[192,64]"], "mIoU"),
    "detection": ("configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml", "coco",
                  ["data.detection.train_short_sides=[64]", "data.detection.train_max_size=96",
                   "data.detection.detr_crop_short_sides=[]", "data.detection.train_crop_size=0",
                   "data.detection.test_scale=[96,64]", "detection.score_threshold=0.0"], "bbox/AP"),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from piip6b.tasks.data import ShapesSpec, write_shapes_dataset

    spec = ShapesSpec(num_train=4, num_val=3, min_size=64, max_size=112, max_objects=3, seed=1)
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", spec)


@pytest.mark.parametrize("task", sorted(CASES))
def test_trainer_and_eval_command_agree_on_one_checkpoint(tmp_path, shapes, task):
    config, layout, sizes, headline = CASES[task]
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"data.root={shapes / layout}", "data.batch_size=1", "data.val_batch_size=2",
                 "schedule.max_iters=2", "schedule.warmup_iters=0", "checkpoint.every_steps=2",
                 "logging.print_groups=false", "evaluation.at_end=true", *sizes]
    trained = subprocess.run([sys.executable, "-m", "piip6b.cli", "train", config, *overrides, "--nproc", "2"],
                             env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_trainer = {key.removeprefix("eval/"): value for row in rows for key, value in row.items()
                  if key.startswith("eval/")}
    assert headline in by_trainer, rows[-1]

    out = tmp_path / "eval.json"
    assert main(["eval", config, *overrides, "--weights", str(run_dir), "--out", str(out)]) == 0
    by_command = json.loads(out.read_text())
    # Every metric, exactly (as JSON text: a class absent from both is NaN in both).
    assert json.dumps(by_command, sort_keys=True) == json.dumps(by_trainer, sort_keys=True)
    assert by_command["num_images"] == 3
