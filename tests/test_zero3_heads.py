"""Both heads under DeepSpeed ZeRO-3 (zero.Init, bf16, every parameter partitioned) on 2 gloo ranks
whose batches differ: rank 0 has objects, rank 1 none, and their image sizes differ. A rank that
skipped a partitioned module would leave the other waiting in an all-gather: a hang is a failure.

Run as a script it is one rank of that job (env:// variables set by the test).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN_STEPS = 3
RANK_TIMEOUT_S = 240


def _ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition all
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }


def _engine(build, ds_config):
    import deepspeed
    import torch

    from piip6b.engine.sharding import EngineConfig, cast_partitioned_params, model_construction

    torch.manual_seed(0)
    with model_construction(EngineConfig(zero_stage=3), ds_config):
        model = build()
    cast_partitioned_params(model, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _tiny_backbone():
    """The real tiny PIIP backbone: with every parameter partitioned, any parameter used outside
    the forward of the module that owns it would be an empty tensor here."""
    from piip6b.models import create_backbone

    return create_backbone("piip_h6b_tiny")


def _std_of(param) -> float:
    from piip6b.engine.sharding import gathered

    with gathered([param]):
        return param.detach().float().std().item()


def _run_rank(out_path: Path) -> None:
    import torch
    import torch.distributed as dist

    from piip6b.tasks.detection import DetectionConfig, MaskRCNN
    from piip6b.tasks.evaluation import slide_inference
    from piip6b.tasks.segmentation import SegmentationConfig, UperNet

    sys.path.insert(0, str(Path(__file__).parent))
    from test_detection import make_batch as detection_batch
    from test_segmentation import make_batch as segmentation_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {"rank": rank}
    ds_config = _ds_config()

    det_cfg = DetectionConfig(num_classes=5, fpn_channels=32, box_head_dim=64, mask_channels=32,
                              rois_per_image=64, rpn_anchors_per_image=64, score_threshold=0.0)
    engine = _engine(lambda: MaskRCNN(_tiny_backbone(), det_cfg), ds_config)
    head = engine.module.roi_heads.box_head.fc6.weight
    result["det_param_dtype"] = str(head.ds_tensor.dtype)
    result["rpn_conv_std"] = _std_of(engine.module.rpn.head.conv[0][0].weight)
    objects = (2, 1) if rank == 0 else (0, 0)
    size = (128, 96) if rank == 0 else (96, 128)
    result["det_losses"] = []
    for step in range(TRAIN_STEPS):
        losses = engine(detection_batch(objects, size=size, seed=step))
        loss = sum(losses.values())
        result["det_loss_dtype"] = str(loss.dtype)
        engine.backward(loss)
        engine.step()
        result["det_losses"].append(loss.item())
    engine.eval()
    with torch.no_grad():
        predictions = engine(detection_batch(objects, size=size, seed=99))
    result["det_eval_images"] = len(predictions)
    engine.destroy()

    seg_cfg = SegmentationConfig(num_classes=7, channels=32, aux_channels=32, norm_groups=8)
    engine = _engine(lambda: UperNet(_tiny_backbone(), seg_cfg), ds_config)
    result["seg_losses"] = []
    seg_size = (96, 128) if rank == 0 else (64, 64)
    for step in range(TRAIN_STEPS):
        batch = segmentation_batch(size=seg_size, seed=step)
        if rank == 1:
            batch["labels"].fill_(255)  # nothing labeled at all on this rank
        loss = sum(engine(batch).values())
        engine.backward(loss)
        engine.step()
        result["seg_losses"].append(loss.item())
    engine.eval()
    # Rank 0 has 2 x 6 windows of 64 px, rank 1 2 x 1: both must make 12 forward calls.
    images = segmentation_batch(size=seg_size)["images"]
    logits = slide_inference(lambda x: engine({"images": x}), images, [seg_size] * 2, 7, (64, 64), (32, 32))
    result["seg_eval_shape"] = [len(logits), *logits[0].shape]
    result["done"] = True
    out_path.write_text(json.dumps(result))
    engine.destroy()
    dist.destroy_process_group()


@pytest.mark.slow
def test_heads_under_zero3_with_unequal_batches(tmp_path):
    from piip6b.engine.distributed import free_port

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore::FutureWarning")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(repo / ".cache" / "torch_extensions"))
    procs = []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, str(tmp_path / f"rank{rank}.json")],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=repo, stdout=log, stderr=subprocess.STDOUT,
        ))
    hung = False
    for proc in procs:
        try:
            proc.wait(timeout=RANK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hung = True
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = "\n".join(f"--- rank {r} ---\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert not hung, f"a rank did not finish within {RANK_TIMEOUT_S} s (ZeRO-3 deadlock?)\n{logs}"
    for rank in range(2):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (exit code {procs[rank].returncode})\n{logs}"
        result = json.loads(path.read_text())
        assert result["done"]
        assert result["det_param_dtype"] == "torch.bfloat16"  # the engine's storage ...
        assert result["det_loss_dtype"] == "torch.float32"  # ... yet the heads compute in fp32
        # Initialised under zero.Init in fp32 with the reference's N(0, 0.01), not skipped.
        assert result["rpn_conv_std"] == pytest.approx(0.01, rel=0.1)
        for key in ("det_losses", "seg_losses"):
            assert len(result[key]) == TRAIN_STEPS and all(math.isfinite(v) for v in result[key]), result
        assert result["det_eval_images"] == 2
        assert result["seg_eval_shape"][1:] == [7, *((96, 128) if rank == 0 else (64, 64))]


if __name__ == "__main__":
    _run_rank(Path(sys.argv[1]))
