"""The `performance:` section: CUDA settings made in one place, and the regional-compile switch."""

from __future__ import annotations

import torch
import pytest

from piip6b.config import ConfigError, ExperimentConfig, build_dataclass, config_hash
from piip6b.devices import PerformanceSettings, configure_performance
from piip6b.engine.compile import compile_blocks
from piip6b.models import create_backbone


@pytest.fixture
def restore_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("tf32,benchmark", [(True, True), (False, False), (True, False)])
def test_cuda_settings_are_set_as_configured(restore_backend_flags, tf32, benchmark):
    # The flags are process-wide switches torch keeps even without a GPU, so this runs on a CPU.
    applied = configure_performance(torch.device("cuda", 0), PerformanceSettings(tf32=tf32, cudnn_benchmark=benchmark))
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cudnn.benchmark is benchmark
    assert applied == {"matmul_allow_tf32": tf32, "cudnn_allow_tf32": tf32, "cudnn_benchmark": benchmark}


def test_nothing_changes_off_cuda(restore_backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    assert configure_performance(torch.device("cpu"), PerformanceSettings(tf32=True, cudnn_benchmark=True)) == {}
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.benchmark is False


def test_performance_section_is_validated_and_not_part_of_the_recipe_hash():
    base = {"model": {"preset": "piip_h6b_tiny"}}
    default = build_dataclass(ExperimentConfig, base)
    assert default.performance == PerformanceSettings() and default.performance.compile == "none"
    tuned = build_dataclass(ExperimentConfig, {**base, "performance": {"compile": "blocks", "tf32": False}})
    assert tuned.performance.compile == "blocks"
    assert config_hash(tuned) == config_hash(default)  # how fast a run computes is not what it trains
    with pytest.raises(ConfigError, match="'block'.*did you mean 'blocks'"):
        build_dataclass(ExperimentConfig, {**base, "performance": {"compile": "block"}})
    with pytest.raises(ConfigError, match="performance.cudnn_benchmark"):
        build_dataclass(ExperimentConfig, {**base, "performance": {"cudnn_benchmarks": True}})


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_compile_blocks_wraps_each_repeated_block_and_leaves_the_state_dict(zero_stage):
    backbone = create_backbone("piip_h6b_tiny")
    keys = list(backbone.state_dict())
    blocks = backbone.repeated_blocks()
    spec = backbone.spec
    assert len(blocks) == sum(b.depth for b in spec.branches) + 2 * len(spec.groups[0])
    assert compile_blocks(blocks, zero_stage=zero_stage, backend="eager") == len(blocks)
    assert list(backbone.state_dict()) == keys
    # ZeRO-3 gathers each compiled block's parameters at once (a leaf), not per child inside the graph.
    assert all(getattr(b, "_z3_leaf", False) is (zero_stage == 3) for b in blocks)
    assert all("forward" in vars(b) for b in blocks)  # the compiled forward, on the instance
    assert not any("forward" in vars(m) for m in backbone.modules() if m not in set(blocks))
