"""zero.Init must not change the model: gathered parameters equal a plain build with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
PRESET = "piip_h6b_tiny"


def _rank_main(out: str) -> int:
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
    if env.rank == 0:
        Path(out).write_text(json.dumps({"mismatched": mismatched, "checked": checked,
                                         "expected": len(reference), "partitioned": partitioned}))
    distributed.teardown()
    return 0


def main(argv: list[str]) -> int:
    from piip6b.engine.distributed import spawn_local

    return spawn_local(2, _rank_main, (argv[0],))


def test_zero_init_gathered_params_equal_plain_build(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions")),
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", "import sys, test_engine_zero_init as t; sys.exit(t.main(sys.argv[1:]))",
                           str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["checked"] == result["expected"] > 0
    assert result["partitioned"] == result["checked"]  # threshold 0: every parameter was sharded
    assert result["mismatched"] == []
