"""Gradient accumulation and clipping through the engine's DeepSpeed config: two micro-batches of one
image with accumulation 2 give the gradient of one micro-batch of both images; and the clipping norm
in the config is really applied to the gradient the optimizer uses (the reference's never was)."""

from __future__ import annotations

import pytest

from piip6b.testing import run_ranks

pytestmark = pytest.mark.slow


def _run() -> dict:
    import torch

    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.engine import distributed
    from piip6b.engine.build import build_engine
    from piip6b.testing import FeatureTask, tiny_experiment

    env = distributed.init_distributed()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    results = {}
    for label, accum, clip in (("one_batch", 1, 0.0), ("accumulated", 2, 0.0), ("clipped", 1, 1e-3)):
        micro = 2 // accum
        cfg = build_dataclass(ExperimentConfig, tiny_experiment(
            "unused", seed=0, model={"preset": "piip_h6b_tiny", "img_sizes": None, "drop_path_rate": 0.0,
                                     "interaction_drop_path_rate": 0.0},
            data={"batch_size": micro}, optim={"lr": 1e-3, "weight_decay": 0.0, "clip_grad_norm": clip, "layer_decay": 1.0},
            engine={"zero_stage": 2, "bf16": False, "grad_accum_steps": accum}))
        built = build_engine(cfg, FeatureTask(), env)
        engine = built.engine
        boundaries = []
        for start in range(0, 2, micro):
            engine.backward(sum(engine({"images": images[start:start + micro]}).values()))
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
    distributed.teardown()
    return results


def test_accumulation_matches_one_batch_and_clipping_bounds_the_step():
    (r,) = run_ranks(_run, nproc=1).check()
    assert r["one_batch"]["boundaries"] == [True]
    assert r["accumulated"]["boundaries"] == [False, True]
    assert r["accumulated"]["grad_norm"] == pytest.approx(r["one_batch"]["grad_norm"], rel=1e-4)
    assert r["accumulated"]["used_grad_norm"] == pytest.approx(r["one_batch"]["used_grad_norm"], rel=1e-4)
    assert r["one_batch"]["used_grad_norm"] == pytest.approx(r["one_batch"]["grad_norm"], rel=1e-4)  # no clipping
    assert r["one_batch"]["grad_norm"] > 1e-2  # so that a clip at 1e-3 is a real cut
    assert r["clipped"]["used_grad_norm"] == pytest.approx(1e-3, rel=1e-3)
