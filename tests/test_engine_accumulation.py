"""Gradient accumulation and clipping through the engine's DeepSpeed config: two micro-batches of one
image with accumulation 2 give the gradient of one micro-batch of both images; and the clipping norm
in the config is really applied to the gradient the optimizer uses (the reference's never was)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import child_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(out: str) -> int:
    import torch

    from piip6b.engine import distributed, optim, sharding
    from piip6b.models import create_backbone

    class FeatureLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_backbone("piip_h6b_tiny", drop_path_rate=0.0, interaction_drop_path_rate=0.0)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return sum(f.pow(2).mean() for f in self.backbone(images))

    env = distributed.init_distributed()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    results = {}
    for label, accum, clip in (("one_batch", 1, 0.0), ("accumulated", 2, 0.0), ("clipped", 1, 1e-3)):
        torch.manual_seed(0)
        model = FeatureLoss()
        engine_cfg = sharding.EngineConfig(zero_stage=2, bf16=False, grad_accum_steps=accum)
        optim_cfg = optim.OptimConfig(lr=1e-3, weight_decay=0.0, clip_grad_norm=clip, layer_decay=1.0)
        micro = 2 // accum
        ds_config = sharding.deepspeed_config(engine_cfg, optim_cfg, micro, env.world_size)
        groups, _ = optim.build_param_groups(model, model.backbone, optim_cfg)
        engine, _ = sharding.initialize(model, optim.build_optimizer(groups, optim_cfg), ds_config)
        boundaries = []
        for start in range(0, 2, micro):
            engine.backward(engine(images[start:start + micro]))
            boundaries.append(engine.is_gradient_accumulation_boundary())
            engine.step()
        # Adam's first moment after one step is (1 - beta1) * the gradient it was given.
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        first_moments = [st["exp_avg"] for st in inner.state.values() if "exp_avg" in st]
        used_norm = float(torch.sqrt(sum(m.double().pow(2).sum() for m in first_moments))) / (1 - inner.defaults["betas"][0])
        results[label] = {
            "boundaries": boundaries,
            "grad_norm": float(engine.get_global_grad_norm()),
            "used_grad_norm": used_norm,
        }
        engine.destroy()
    Path(out).write_text(json.dumps(results))
    distributed.teardown()
    return 0


def test_accumulation_matches_one_batch_and_clipping_bounds_the_step(tmp_path):
    out = tmp_path / "result.json"
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", "import sys, test_engine_accumulation as t; sys.exit(t._run(sys.argv[1]))",
                           str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["one_batch"]["boundaries"] == [True]
    assert r["accumulated"]["boundaries"] == [False, True]
    assert r["accumulated"]["grad_norm"] == pytest.approx(r["one_batch"]["grad_norm"], rel=1e-4)
    assert r["accumulated"]["used_grad_norm"] == pytest.approx(r["one_batch"]["used_grad_norm"], rel=1e-4)
    assert r["one_batch"]["used_grad_norm"] == pytest.approx(r["one_batch"]["grad_norm"], rel=1e-4)  # no clipping
    assert r["one_batch"]["grad_norm"] > 1e-2  # so that a clip at 1e-3 is a real cut
    assert r["clipped"]["used_grad_norm"] == pytest.approx(1e-3, rel=1e-3)
