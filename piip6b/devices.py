"""Where tensors go: moving batches, which device a (possibly wrapped) model computes on, and the
one place the process-wide CUDA performance settings are made (the trainer and bench/gpu_step.py
both call `configure_performance`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_map


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch's tensors (also inside lists and dicts, e.g. detection targets) on `device`."""
    return tree_map(lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v, batch)


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes (a DeepSpeed engine knows; a module's parameters tell otherwise;
    ZeRO-3-partitioned parameters are empty but still on the right device)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@dataclass
class PerformanceSettings:
    """The `performance:` section: how fast, not what is trained (it is not part of the recipe hash).

    - tf32: TF32 tensor cores for fp32 matmuls and convolutions. The model computes in bf16; fp32
      is kept where bf16 is too coarse: the detection and segmentation heads, the deformable
      attention's offset and weight projections, the norms. TF32 keeps fp32's range and 10 of its
      23 mantissa bits (relative error ~5e-4 per product, against bf16's 4e-3), which these
      islands tolerate: a sampling offset of 8 cells moves by ~0.004 cells. torch leaves matmuls
      at full fp32 by default (convolutions already use TF32), so an fp32 head matmul would run
      at a fraction of the tensor-core rate.
    - cudnn_benchmark: let cuDNN time its algorithms per input shape and keep the fastest (the
      merge and pyramid convs, the heads). The first step of every new shape pays the search; the
      detection recipe's multi-scale inputs bring a few dozen shapes.
    - compile: "blocks" compiles each repeated block (every ViT block of every branch, each
      interaction injector) with torch.compile (`piip6b.engine.compile`); "none" runs eagerly.
      Off by default: on by default only where measured faster and correct on the GPU
      (bench/gpu_step.py measures both; BENCHMARKS.md).
    - compile_backend: torch.compile's backend ("aot_eager" captures and checks the graphs
      without generating code).

    Memory format is not a process setting: the conv stacks measured faster in NHWC convert
    themselves (`models.layers.ChannelsLastConv2d`, the GEMM pyramid follows its input), and
    converting a model with `.to(memory_format=...)` does not last under ZeRO-3, which rebuilds
    gathered parameters contiguous.
    """

    tf32: bool = True
    cudnn_benchmark: bool = True
    compile: Literal["none", "blocks"] = "none"
    compile_backend: str = "inductor"


def configure_performance(device: torch.device, settings: PerformanceSettings) -> dict[str, Any]:
    """Apply the process-wide CUDA settings for `device`; returns what they are now (for the log
    and the benchmark record). Nothing is changed for a device that is not CUDA."""
    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
