"""Pre-flight (issue 12 §2): every refusal is one line, comes before any rank starts, and leaves the
run directory as it was; `piip6b check` resolves a run for N ranks and prints the start-up summary.

`piip6b train --nproc 2` runs in this process with the rank launcher and the process-group join
replaced by tripwires: a failure must come from the launching process, before either is reached.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from piip6b.cli import main
from piip6b.engine import distributed
from piip6b.models import create_backbone
from piip6b.tasks.data import ShapesSpec, write_shapes_dataset
from piip6b.testing import REPO, branch_shapes, pretrained_vit

CONFIG = str(REPO / "configs" / "tiny" / "piip_h6b_maskrcnn_1x_coco_tiny.yaml")
FULL_COCO = str(REPO / "configs" / "detection" / "piip_h6b_maskrcnn_1x_coco.yaml")
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    spec = ShapesSpec(num_train=12, num_val=4, min_size=64, max_size=96, max_objects=2)
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", spec)


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run dir an earlier run left behind: its config, metrics, TensorBoard files and a checkpoint
    newer than any resume point (which a run that starts would set aside)."""
    root = tmp_path / "run"
    for name, text in {"config.yaml": "name: earlier\n", "metrics.jsonl": '{"step": 1, "loss": 2.0}\n',
                       "tb/events.out.tfevents.1": "x", "logs/slurm-1.out": "log\n",
                       "checkpoints/step_00000004/mp_rank_00_model_states.pt": "shard"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def snapshot(root: Path) -> dict[str, object] | None:
    """Every path under `root` with its content hash and modification time (None: no such dir)."""
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture()
def tripwires(monkeypatch):
    """Fail the test if a rank starts or a process group is joined."""
    started = []

    def tripped(*args, **kwargs):
        started.append(args)
        raise AssertionError("a rank started before the pre-flight failed")

    monkeypatch.setattr(distributed, "spawn_local", tripped)
    monkeypatch.setattr(distributed, "init_distributed", tripped)
    return started


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and return the one error line."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    command = argv[0]
    error_lines = [line for line in err if line.startswith(f"piip6b {command}: error: ")]
    assert len(error_lines) == 1, err
    return error_lines[0].removeprefix(f"piip6b {command}: error: ")


def _vit_file(path: Path, branch: str) -> Path:
    shapes = branch_shapes(create_backbone("piip_h6b_tiny"), f"{branch}.")
    torch.save({"model": pretrained_vit(shapes, cls_slot=True)}, path)
    return path


def _corrupt_annotations(tmp_path: Path, shapes: Path) -> Path:
    root = tmp_path / "corrupt"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").symlink_to(shapes / "coco" / "train2017")
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    return root


CASES = {
    "config name": (lambda tmp, shapes: ["model.attn_backend=flsh"],
                    "model.attn_backend: 'flsh' is not one of ['auto', 'flash', 'sdpa', 'math']; did you mean 'flash'?"),
    "batch split": (lambda tmp, shapes: ["engine.grad_accum_steps=3"],
                    "engine.grad_accum_steps=3 does not divide the 2 images per rank that data.global_batch=4 needs "
                    "on 2 ranks"),
    "data root": (lambda tmp, shapes: [f"data.root={tmp / 'nowhere'}"],
                  "does not exist"),
    "annotations": (lambda tmp, shapes: [f"data.root={_corrupt_annotations(tmp, shapes)}"],
                    "instances_train2017.json is not valid JSON"),
    "no weights for a full-size preset": (
        lambda tmp, shapes: ["model.preset=piip_h6b", "model.img_sizes=null"],
        "model.pretrained is not set and piip_h6b is a full-size preset: it would train from random initialisation. "
        "Set model.pretrained.branch1=FILE model.pretrained.branch2=FILE"),
    "weight file missing": (lambda tmp, shapes: [f"model.pretrained.branch1={tmp / 'nope.safetensors'}"],
                            "model.pretrained.branch1: "),
    "weights of another branch": (
        lambda tmp, shapes: [f"model.pretrained.branch1={_vit_file(tmp / 'vit_h.pth', 'branch2')}",
                             f"model.pretrained.branch2={_vit_file(tmp / 'vit_h2.pth', 'branch2')}"],
        "model.pretrained: "),
    "resume point": (lambda tmp, shapes: [f"checkpoint.resume={tmp / 'no_such_checkpoint'}"],
                     "no_such_checkpoint: no such file or directory"),
    "plan without GPU memory": (lambda tmp, shapes: ["engine.plan=auto"],
                                "engine.plan=auto needs the GPU memory and there is no GPU here"),
    "plan that cannot fit": (lambda tmp, shapes: ["engine.plan=auto", "engine.gpu_mem_gib=0.5"],
                             "engine.plan=auto: no layout of piip_h6b_tiny fits in 90% of 0.5 GiB per GPU on 2 GPUs"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line_before_any_rank_with_the_run_dir_untouched(case, tmp_path, shapes, run_dir, tripwires,
                                                                         capsys):
    make_overrides, expected = CASES[case]
    overrides = [f"data.root={shapes / 'coco'}", f"run_dir={run_dir}", *make_overrides(tmp_path, shapes)]
    before = snapshot(run_dir)
    message = refused(capsys, ["train", CONFIG, *overrides, "--nproc", "2"])
    assert expected in message
    assert not tripwires
    assert snapshot(run_dir) == before
    # `piip6b check` (the login node, slurm/train_6b.sh) says the same.
    assert refused(capsys, ["check", CONFIG, *overrides, "--world-size", "2"]) == message


def test_run_dir_that_cannot_be_written(tmp_path, shapes, run_dir, tripwires, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = refused(capsys, ["train", CONFIG, f"data.root={shapes / 'coco'}", f"run_dir={blocker / 'run'}", "--nproc", "2"])
    assert message == f"run_dir {blocker / 'run'} cannot be created: {blocker} is a file, not a directory"
    assert not (blocker / "run").exists()

    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == run_dir / "checkpoints"
                        else real_access(path, mode))
    before = snapshot(run_dir)
    message = refused(capsys, ["train", CONFIG, f"data.root={shapes / 'coco'}", f"run_dir={run_dir}", "--nproc", "2"])
    assert message.startswith(f"run_dir {run_dir}: this user cannot write to {run_dir / 'checkpoints'}")
    assert snapshot(run_dir) == before and not tripwires


def test_disk_that_cannot_hold_one_checkpoint(tmp_path, shapes, run_dir, tripwires, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**8, 10**8))  # 0.1 GB free
    before = snapshot(run_dir)
    message = refused(capsys, ["train", CONFIG, f"data.root={shapes / 'coco'}", f"run_dir={run_dir}", "--nproc", "2"])
    assert message.startswith(f"run_dir {run_dir}: 100.0 MB free on its file system, but a checkpoint of piip_h6b_tiny "
                              "with its heads is ~2")  # ~2xx MB
    assert "x 14 bytes" in message
    assert snapshot(run_dir) == before and not tripwires


def test_check_prints_the_summary_and_its_json(shapes, tmp_path, capsys):
    overrides = [f"data.root={shapes / 'coco'}", f"run_dir={tmp_path / 'run'}"]
    assert main(["check", CONFIG, *overrides, "--world-size", "2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert {k: facts[k] for k in ("global_batch", "per_device_batch", "grad_accum_steps", "lr", "lr_scaling",
                                  "total_samples", "total_steps")} == {
        "global_batch": 4, "per_device_batch": 2, "grad_accum_steps": 1, "lr": pytest.approx(2.5e-5),
        "lr_scaling": "linear", "total_samples": 80, "total_steps": 20}
    annotations = json.loads((shapes / "coco" / "annotations" / "instances_train2017.json").read_text())["annotations"]
    # Training uses the images with objects (mmdet's filter) and every instance on them.
    assert facts["data"]["splits"]["train"] == {"images": len({a["image_id"] for a in annotations}),
                                                "annotations": len(annotations)}
    assert facts["zero_stage"] == 3 and facts["attention_backend"] == "sdpa" and facts["deform_attn_kernel"] == "pytorch"
    assert facts["memory"]["gpu_mem_gib"] is None and not facts["warnings"]
    assert not (tmp_path / "run").exists()  # a check writes nothing
    assert "a job needs at least one rank" in refused(capsys, ["check", CONFIG, *overrides, "--world-size", "0"])

    assert main(["check", CONFIG, *overrides]) == 0
    text = capsys.readouterr().out
    assert "batch     4 images per step = 1 rank(s) x 2 per forward (derived) x 2 accumulation step(s) (derived)" in text
    assert "lr        2.5e-05 = 0.0001 x 4/16 (linear rule, optim.lr_base_batch=16)" in text
    assert "data      train: " in text and "weights   none: random initialisation (a tiny preset)" in text


def test_simulated_64_rank_world_scales_the_lr_and_warns(shapes, tmp_path, capsys):
    assert main(["check", FULL_COCO.replace("detection/piip_h6b_maskrcnn_1x_coco", "tiny/piip_h6b_maskrcnn_1x_coco_tiny"),
                 f"data.root={shapes / 'coco'}", f"run_dir={tmp_path / 'run'}", "--world-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "batch     64 images per step (raised) = 64 rank(s) x 1 per forward (derived)" in text
    assert "lr        0.0004 = 0.0001 x 64/16 (linear rule, optim.lr_base_batch=16)" in text
    assert "warning: data.global_batch=4 cannot be kept on 64 ranks" in text


def test_full_size_preset_from_scratch_passes_and_weights_are_hashed(shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**15, 0, 10**15))  # a 6B checkpoint is ~100 GB
    overrides = [f"data.root={shapes / 'coco'}", f"run_dir={tmp_path / 'run'}", "model.preset=piip_h6b",
                 "model.img_sizes=null"]
    assert main(["check", CONFIG, *overrides, "model.from_scratch=true", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["from_scratch"] and facts["pretrained"] == [] and facts["checkpoint_bytes"] > 7e9 * 14

    # Weight files that fit: one converted (its tensor hash recorded at conversion), one raw.
    raw_6b = _vit_file(tmp_path / "intern_vit_6b.pth", "branch1")
    converted = tmp_path / "6b.safetensors"
    assert main(["convert", str(raw_6b), "--preset", "piip_h6b_tiny", "--target", "branch1", "--out", str(converted)]) == 0
    capsys.readouterr()
    vit_h = _vit_file(tmp_path / "mae_vit_h.pth", "branch2")
    assert main(["check", CONFIG, f"data.root={shapes / 'coco'}", f"run_dir={tmp_path / 'run'}",
                 f"model.pretrained.branch1={converted}", f"model.pretrained.branch2={vit_h}", "--json"]) == 0
    branch1, branch2 = json.loads(capsys.readouterr().out)["pretrained"]
    from piip6b.weights import file_sha256, open_source

    with open_source(converted) as source:
        assert branch1["sha256"] == source.metadata["piip6b.tensors_sha256"]
    assert branch1["hash_of"] == "tensor data, recorded by piip6b convert"
    assert (branch2["sha256"], branch2["hash_of"]) == (file_sha256(vit_h), "the file")


def test_memory_is_checked_against_the_plan_and_plan_auto_applies_it(shapes, tmp_path, capsys):
    overrides = [f"data.root={shapes / 'coco'}", f"run_dir={tmp_path / 'run'}"]
    # 1.7 GiB: under the planner's fixed 1.5 GiB framework overhead plus buffers, nothing fits.
    assert main(["check", CONFIG, *overrides, "--world-size", "2", "--gpu-mem", "1.7"]) == 0
    text = capsys.readouterr().out
    # ~1.6 GiB: the plan's peak (held state + the larger of forward/backward and the step) + overhead.
    assert "warning: ZeRO-3 at 2 image(s) per forward needs ~1.6 GiB per GPU by `piip6b plan`'s estimate, more than " \
           "90% of 1.7 GiB" in text

    assert main(["check", CONFIG, *overrides, "engine.plan=auto", "--world-size", "16", "--nodes", "2",
                 "--gpu-mem", "8", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    planned = facts["memory"]["recommended"]
    assert set(planned) == {"engine.zero_stage", "engine.hpz_partition_size", "model.grad_checkpointing",
                            "model.checkpoint_interactions", "data.batch_size", "engine.grad_accum_steps"}
    assert facts["from_plan"] == list(planned)
    assert facts["zero_stage"] == planned["engine.zero_stage"]
    assert facts["per_device_batch"] == planned["data.batch_size"] == 1  # 16 ranks share 16 images
    assert {facts["origins"][k] for k in ("zero_stage", "micro_batch", "grad_accum")} == {"plan"}


def test_plan_prints_a_complete_set_of_overrides(capsys):
    assert main(["plan", "--preset", "piip_h6b_tiny", "--gpus", "16", "--nodes", "2", "--gpu-mem", "8",
                 "--batch", "2", "--grad-accum", "2", "--split"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("recommended: "))
    for key in ("engine.zero_stage=", "engine.hpz_partition_size=", "model.grad_checkpointing=",
                "model.checkpoint_interactions=", "data.batch_size=4", "engine.grad_accum_steps=1"):
        assert key in line, line


def test_an_earlier_config_is_kept_not_overwritten(tmp_path):
    from piip6b.config import load_config
    from piip6b.train import write_config

    cfg = load_config(CONFIG, [f"run_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text("name: earlier\n")
    write_config(tmp_path, cfg)
    kept = list(tmp_path.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == "name: earlier\n"
    assert load_config(tmp_path / "config.yaml").name == cfg.name
    write_config(tmp_path, cfg)  # the same config again: nothing more to keep
    assert len(list(tmp_path.glob("config.*.yaml"))) == 1


@pytest.mark.slow
def test_ranks_of_a_launched_job_agree_on_the_refusal(tmp_path, run_dir):
    """Under torchrun/srun nobody checked before the ranks: rank 0 does once they have joined, and
    every rank stops with its error before anything is written."""
    from piip6b.testing import run_ranks, tiny_experiment, train_feature_task

    before = snapshot(run_dir)
    tree = tiny_experiment(run_dir, checkpoint={"resume": str(tmp_path / "no_such_checkpoint")})
    ranks = run_ranks(train_feature_task, tree, nproc=2, timeout=240)
    assert not ranks.timed_out and all(code != 0 for code in ranks.returncodes), ranks.tails()
    for log in ranks.logs:
        assert f"CheckpointError: checkpoint path {tmp_path / 'no_such_checkpoint'}: no such file or directory" in log
    assert snapshot(run_dir) == before
