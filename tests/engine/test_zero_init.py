"""zero.Init must not change the model: gathered parameters equal a plain build with the same seed;
and pretrained weights stream into the partitioned parameters exactly."""

from __future__ import annotations

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.testing import branch_shapes, pretrained_vit, run_ranks

pytestmark = pytest.mark.slow
PRESET = "piip_h6b_tiny"


def _rank_main(pretrained: str) -> dict:
    from piip6b import dist
    from piip6b.engine import distributed, sharding
    from piip6b.engine.build import load_pretrained_sharded
    from piip6b.engine.optim import OptimConfig
    from piip6b.models import ModelConfig
    from piip6b.testing import expected_branch

    env = distributed.init_distributed()
    model_cfg = ModelConfig(preset=PRESET)
    torch.manual_seed(7)
    plain = model_cfg.build()
    engine_cfg = sharding.EngineConfig(zero_stage=3, bf16=True, param_persistence_threshold=0)
    ds_config = sharding.deepspeed_config(engine_cfg, OptimConfig(), 1, env.world_size)
    torch.manual_seed(7)
    with sharding.model_construction(engine_cfg, ds_config):
        sharded = model_cfg.build()
    mismatched, partitioned, checked = [], 0, 0
    reference = dict(plain.named_parameters())
    for name, param in sharded.named_parameters():
        partitioned += int(param.numel() == 0)
        with dist.gathered([param]):
            full = param.detach().clone()
        checked += 1
        if full.dtype != torch.float32 or not torch.equal(full, reference[name].detach()):
            mismatched.append(name)
    # Every rank reads the file; the loader validates against the partitioned shapes (ds_shape).
    load_pretrained_sharded(sharded, {"branch1": pretrained}, allow_missing=[r"branch2\..*"])
    expected = expected_branch(torch.load(pretrained, weights_only=True)["module"], branch_shapes(plain, "branch1."))
    not_loaded = []
    for name, param in sharded.branch1.named_parameters():
        with dist.gathered([param]):
            if not torch.equal(param.detach(), expected[name]):
                not_loaded.append(name)
    distributed.teardown()
    return {"mismatched": mismatched, "checked": checked, "expected": len(reference), "partitioned": partitioned,
            "pretrained_checked": len(expected), "not_loaded": not_loaded}


def test_zero_init_gathered_params_equal_plain_build(tmp_path):
    release = pretrained_vit(branch_shapes(create_backbone(PRESET), "branch1."), cls_slot=True)
    pretrained = tmp_path / "intern_vit_6b_224px.pth"
    torch.save({"module": release}, pretrained)
    result, _ = run_ranks(_rank_main, str(pretrained), nproc=2, timeout=180).check()
    assert result["checked"] == result["expected"] > 0
    assert result["partitioned"] == result["checked"]  # threshold 0: every parameter was sharded
    assert result["mismatched"] == []
    assert result["pretrained_checked"] > 0 and result["not_loaded"] == []
