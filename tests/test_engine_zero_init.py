"""zero.Init must not change the model: gathered parameters equal a plain build with the same seed;
and pretrained weights stream into the partitioned parameters exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import child_env

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PRESET = "piip_h6b_tiny"


def _rank_main(out: str, pretrained: str) -> int:
    import torch

    from piip6b.engine import distributed, sharding
    from piip6b.models import ModelConfig
    from piip6b.engine.optim import OptimConfig

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
        with sharding.gathered([param]):
            full = param.detach().clone()
        checked += 1
        if full.dtype != torch.float32 or not torch.equal(full, reference[name].detach()):
            mismatched.append(name)
    # Every rank reads the file; the loader validates against the partitioned shapes (ds_shape).
    from test_weights import _branch_shapes, _expected_branch

    from piip6b.train import _load_pretrained

    _load_pretrained(sharded, {"branch1": pretrained})
    expected = _expected_branch(torch.load(pretrained, weights_only=True)["module"], _branch_shapes(plain, "branch1."))
    not_loaded = []
    for name, param in sharded.branch1.named_parameters():
        with sharding.gathered([param]):
            if not torch.equal(param.detach(), expected[name]):
                not_loaded.append(name)
    if env.rank == 0:
        Path(out).write_text(json.dumps({"mismatched": mismatched, "checked": checked,
                                         "expected": len(reference), "partitioned": partitioned,
                                         "pretrained_checked": len(expected), "not_loaded": not_loaded}))
    distributed.teardown()
    return 0


def main(argv: list[str]) -> int:
    from piip6b.engine.distributed import spawn_local

    return spawn_local(2, _rank_main, (argv[0], argv[1]))


def test_zero_init_gathered_params_equal_plain_build(tmp_path):
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from test_weights import _branch_shapes, _pretrained_vit

    from piip6b.models import create_backbone

    release = _pretrained_vit(_branch_shapes(create_backbone(PRESET), "branch1."), cls_slot=True)
    pretrained = tmp_path / "intern_vit_6b_224px.pth"
    torch.save({"module": release}, pretrained)
    out = tmp_path / "result.json"
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", "import sys, test_engine_zero_init as t; sys.exit(t.main(sys.argv[1:]))",
                           str(out), str(pretrained)], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["checked"] == result["expected"] > 0
    assert result["partitioned"] == result["checked"]  # threshold 0: every parameter was sharded
    assert result["mismatched"] == []
    assert result["pretrained_checked"] > 0 and result["not_loaded"] == []
