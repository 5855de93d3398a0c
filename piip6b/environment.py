"""What a run on this machine would use (`piip6b env`): library versions, the GPUs, the attention
backend and deformable-attention kernel the models would pick, and whether DeepSpeed's JIT-built
op is already in the build cache (a cold cache costs the first run a 1-2 minute compile)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

# Distributions whose versions matter to a run; "flash-attn-4" installs `flash_attn.cute`, which
# the models do not call (see README), so it is listed apart from flash-attn.
DISTRIBUTIONS = ("torchvision", "deepspeed", "triton", "flash-attn", "flash-attn-4", "pycocotools", "tensorboard")

# The op DeepSpeed JIT-builds when it joins the process group (`deepspeed.comm.torch.build_shm_op`);
# its accelerator says whether it has one (the CPU accelerator does, CUDA's does not).
DEEPSPEED_JIT_OP = "ShareMemCommBuilder"


def collect() -> dict[str, Any]:
    """The report as JSON data."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return {
        "versions": versions(),
        "gpus": gpus(),
        "kernels": kernels(device),
        "deepspeed_jit_op": deepspeed_jit_op(),
    }


def versions() -> dict[str, str | None]:
    """Python, torch and the CUDA/cuDNN/NCCL it was built with, and the other distributions
    (None: not installed, or not part of this torch build)."""
    found: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version() if torch.backends.cudnn.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None,
    }
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _cudnn_version() -> str:
    code = torch.backends.cudnn.version()  # 9.x: 10000 * major + 100 * minor + patch; 8.x: 1000 * major + ...
    major, rest = divmod(code, 10000 if code >= 90000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "compute_capability": f"{props.major}.{props.minor}"})
    return found


def kernels(device: torch.device, attn_backend: str = "auto", dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """What the models' own resolution picks on `device` for `dtype` (bf16: the training dtype) and
    the configured `attn_backend`. A backend that cannot run there raises RuntimeError."""
    from piip6b.models.attention import flash_attn_available, resolve_backend
    from piip6b.models.deform_attn import resolve_kernel

    probe = torch.empty(0, device=device, dtype=dtype)
    return {
        "device": str(device),
        "attention": resolve_backend(attn_backend, probe),  # type: ignore[arg-type]
        "flash_attn_importable": flash_attn_available(),
        "deformable_attention": resolve_kernel("auto", probe),
    }


def deepspeed_jit_op() -> dict[str, Any]:
    """The op DeepSpeed would JIT-build at start on this machine's accelerator, and its state:
    `prebuilt` (in the DeepSpeed install), `built` (in the build cache: warm), `not built` (the
    first run compiles it), or `none` (this accelerator builds nothing at start)."""
    from piip6b import dist

    dist.apply_env_defaults()  # DeepSpeed picks its accelerator at import, as the trainer sets it up
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    accelerator = get_accelerator()
    builder = accelerator.create_op_builder(DEEPSPEED_JIT_OP)
    report: dict[str, Any] = {"accelerator": accelerator.device_name(), "cache": extensions_dir()}
    if builder is None:
        return {**report, "op": None, "state": "none"}
    library = os.path.join(report["cache"], builder.name, f"{builder.name}.so")
    if installed_ops.get(builder.NAME):
        state = "prebuilt"
    else:
        state = "built" if os.path.isfile(library) else "not built"
    return {**report, "op": builder.name, "state": state}


def extensions_dir() -> str:
    """Where torch's JIT extension builds go: TORCH_EXTENSIONS_DIR, else torch's per-Python,
    per-CUDA folder under its default root (the rule of `torch.utils.cpp_extension`)."""
    from torch.utils.cpp_extension import get_default_build_root

    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return explicit
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    if torch.version.hip:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def format_report(report: dict[str, Any]) -> str:
    versions_, kernels_, op = report["versions"], report["kernels"], report["deepspeed_jit_op"]
    labels = {"cuda": "cuda (torch build)", "cudnn": "cudnn (torch build)", "nccl": "nccl (torch build)"}
    width = max(len(labels.get(name, name)) for name in versions_)
    lines = ["versions:"]
    lines += [f"  {labels.get(name, name).ljust(width)}  {version or 'not installed'}"
              for name, version in versions_.items()]
    lines.append("gpus:" + ("" if report["gpus"] else " none"))
    lines += [f"  cuda:{g['index']}  {g['name']}, {g['memory_gib']} GiB, compute capability {g['compute_capability']}"
              for g in report["gpus"]]
    lines += [
        f"kernels (bf16 on {kernels_['device']}):",
        f"  attention             {kernels_['attention']}"
        + ("" if kernels_["attention"] == "flash"
           else f" (flash-attn importable: {'yes' if kernels_['flash_attn_importable'] else 'no'})"),
        f"  deformable attention  {kernels_['deformable_attention']}",
        f"deepspeed JIT op ({op['accelerator']} accelerator):",
    ]
    if op["op"] is None:
        lines.append("  none built at start")
    else:
        hint = {"built": "warm", "prebuilt": "in the DeepSpeed install",
                "not built": "cold: the first run compiles it (1-2 min)"}[op["state"]]
        lines.append(f"  {op['op']}  {op['state']} ({hint}) in {op['cache']}")
    return "\n".join(lines)
