"""A failure inside the ranks is ONE line on the console, from one rank, with one exit code, under
every launcher (issue 14, item 11): `piip6b train --nproc 2`, torchrun-style env:// ranks
(`run_ranks`), and srun (tests/launch/test_slurm_errors.py).

Each cause is provoked for real on the tiny Mask R-CNN config and the synthetic shapes data, at the
worst moment for it: the missing image is read by rank 1 only (rank 0, which hosts the job's store,
only sees its peer leave), the non-finite stop follows a checkpoint written one step earlier.
The traceback goes to the rank's file under <run dir>/logs/, not to the console. Causes the
pre-flight sees (data root, annotations, resume point, pretrained files) are refused by the
submitting process before any rank starts, and leave no run dir behind; under env:// ranks, where
rank 0 runs the same checks once the ranks have joined, they are one line too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from piip6b.testing import REPO, child_env, run_ranks

pytestmark = pytest.mark.slow

CONFIG = "configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml"
ERROR_LINE = re.compile(r"^piip6b train: error: ")
TIMEOUT_S = 420  # only catches a hang; nothing asserts on speed


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from piip6b.tasks.data import ShapesSpec, write_shapes_dataset

    spec = ShapesSpec(num_train=6, num_val=2, min_size=64, max_size=96, max_objects=2, seed=0)
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", spec) / "coco"


def overrides(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """The tiny config at the shapes data's size: one 64-96 px image per rank, a few steps."""
    return [
        f"run_dir={run_dir}", f"data.root={data_root}", "schedule.max_iters=3", "schedule.warmup_iters=0",
        "checkpoint.every_steps=1", "evaluation.at_end=false", "logging.print_groups=false",
        "data.batch_size=1", "data.detection.train_short_sides=[64]", "data.detection.train_max_size=96",
        "data.detection.detr_crop_short_sides=[]", "data.detection.train_crop_size=0",
        "data.detection.test_scale=[96,64]", *extra,
    ]


def copy_data(shapes: Path, target: Path) -> Path:
    shutil.copytree(shapes, target)
    return target


def image_read_first_by(rank: int, data_root: Path) -> Path:
    """The training image rank `rank` of 2 loads in step 1 (global sample position `rank`)."""
    from piip6b.config import load_config
    from piip6b.tasks.data.coco import CocoInstanceDataset
    from piip6b.tasks.data.sampler import ResumableDistributedSampler

    seed = load_config(REPO / CONFIG).seed
    annotations = data_root / "annotations" / "instances_train2017.json"
    dataset = CocoInstanceDataset(data_root / "train2017", annotations, train=True)
    index = int(ResumableDistributedSampler(len(dataset), 2, rank, seed=seed).order(0)[rank])
    names = {img["id"]: img["file_name"] for img in json.loads(annotations.read_text())["images"]}
    return data_root / "train2017" / names[dataset.image_ids[index]]


def train_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "piip6b.cli", "train", CONFIG, "--nproc", "2", *args],
                          env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)


def assert_one_line(console: str, cause: str, run_dir: Path | None = None) -> str:
    """The console holds exactly one error line, naming `cause`, and no traceback or peer noise."""
    lines = [line for line in console.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, console[-6000:]
    assert cause in lines[0], lines[0]
    for noise in ("Traceback", "Connection closed", "connectFullMesh", "Process SpawnProcess", "terminate called"):
        assert noise not in console, console[-6000:]
    if run_dir is not None:
        logs = list((run_dir / "logs").glob("traceback-rank*.log"))
        assert logs and "Traceback (most recent call last)" in logs[0].read_text(), logs
    return lines[0]


# ------------------------------------------------------------------------------ --nproc 2
def test_missing_data_root(tmp_path):
    run_dir = tmp_path / "run"
    done = train_cli(overrides(run_dir, tmp_path / "nothere"))
    assert done.returncode == 2, done.stderr[-4000:]
    assert_one_line(done.stderr, f"{tmp_path / 'nothere'}/train2017 does not exist")
    assert not run_dir.exists()  # refused by the pre-flight: nothing written


def test_truncated_annotation_json(tmp_path, shapes):
    data = copy_data(shapes, tmp_path / "coco")
    annotations = data / "annotations" / "instances_train2017.json"
    annotations.write_bytes(annotations.read_bytes()[: annotations.stat().st_size // 2])
    run_dir = tmp_path / "run"
    done = train_cli(overrides(run_dir, data))
    assert done.returncode == 2, done.stderr[-4000:]
    assert_one_line(done.stderr, f"{annotations} is not valid JSON")
    assert not run_dir.exists()


def test_missing_image_read_by_rank_1_only(tmp_path, shapes):
    data = copy_data(shapes, tmp_path / "coco")
    missing = image_read_first_by(1, data)
    assert missing != image_read_first_by(0, data)
    missing.unlink()
    run_dir = tmp_path / "run"
    done = train_cli(overrides(run_dir, data))
    assert done.returncode == 2, done.stderr[-4000:]
    line = assert_one_line(done.stderr, f"image {missing} does not exist", run_dir)
    assert line.startswith("piip6b train: error: rank 1: ")


def test_bad_resume_path(tmp_path, shapes):
    run_dir = tmp_path / "run"
    done = train_cli([*overrides(run_dir, shapes), "--resume", str(tmp_path / "no_such_run")])
    assert done.returncode == 2, done.stderr[-4000:]
    assert_one_line(done.stderr, f"checkpoint path {tmp_path / 'no_such_run'}: no such file or directory")
    assert not run_dir.exists()


class Payload:  # unpickling an instance would import and run code named in the file
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pretrained_file(tmp_path, shapes):
    weights = tmp_path / "branch1.pth"
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3)}, "hook": Payload()}, weights)
    run_dir = tmp_path / "run"
    done = train_cli(overrides(run_dir, shapes, f"model.pretrained.branch1={weights}"))
    assert done.returncode == 2, done.stderr[-4000:]
    assert "this must never run" not in done.stdout + done.stderr
    assert_one_line(done.stderr, f"{weights}: not loaded")
    assert not run_dir.exists()


def test_nonfinite_stop_names_the_last_checkpoint(tmp_path, shapes):
    run_dir = tmp_path / "run"
    # A huge (finite) lr: step 1's update blows the weights up, step 2's loss is not finite.
    done = train_cli(overrides(run_dir, shapes, "optim.lr=1e30", "optim.clip_grad_norm=0"))
    assert done.returncode == 2, done.stderr[-4000:]
    line = assert_one_line(done.stderr, "non-finite loss or gradient at step 2", run_dir)
    assert f"{run_dir / 'checkpoints' / 'step_00000001'} (step 1)" in line
    assert not (run_dir / "checkpoints" / "step_00000002").exists()


# ------------------------------------------------------------------------------ torchrun-style
def cli_rank(argv: list[str]) -> int:
    """One env:// rank entering through `piip6b.cli.main`, as torchrun (or launch/rank.py) runs it."""
    from piip6b.cli import main

    return main(argv)


def test_env_ranks_missing_image_one_line_one_code(tmp_path, shapes):
    data = copy_data(shapes, tmp_path / "coco")
    missing = image_read_first_by(1, data)
    missing.unlink()
    run_dir = tmp_path / "run"
    ranks = run_ranks(cli_rank, ["train", CONFIG, *overrides(run_dir, data)], nproc=2, timeout=TIMEOUT_S)
    assert not ranks.timed_out, ranks.tails()
    assert ranks.results == [2, 2], ranks.tails()
    assert_one_line("\n".join(ranks.logs), f"rank 1: image {missing} does not exist", run_dir)


def test_env_ranks_missing_data_root_one_line_from_rank_0(tmp_path):
    """Without a submitting process (torchrun, srun) the pre-flight runs on rank 0 once the ranks
    have joined; rank 1 only re-raises rank 0's decision and stays silent."""
    run_dir = tmp_path / "run"
    ranks = run_ranks(cli_rank, ["train", CONFIG, *overrides(run_dir, tmp_path / "nothere")], nproc=2,
                      timeout=TIMEOUT_S)
    assert not ranks.timed_out, ranks.tails()
    assert ranks.results == [2, 2], ranks.tails()
    line = assert_one_line("\n".join(ranks.logs), f"{tmp_path / 'nothere'}/train2017 does not exist")
    assert "rank 1" not in line
