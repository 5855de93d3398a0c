"""Scaled dot-product attention with one backend chosen per call site.

flash-attn is used only where it is importable and the tensors are CUDA fp16/bf16 (it has no other
kernels); everything else goes through `torch.nn.functional.scaled_dot_product_attention`, which
picks its own fused CPU/CUDA kernel. `"math"` is the plain softmax(QKᵀ/√d)V used as the test oracle.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

try:  # optional GPU extra (requirements-gpu.txt)
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

AttnBackend = Literal["auto", "flash", "sdpa", "math"]
ATTN_BACKENDS: tuple[str, ...] = ("auto", "flash", "sdpa", "math")


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def resolve_backend(requested: AttnBackend, q: torch.Tensor) -> str:
    """The backend that will actually run for `q` ("flash", "sdpa" or "math")."""
    if requested not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {ATTN_BACKENDS}")
    flash_ok = _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            "attention backend 'flash' needs flash-attn installed (pip install -r requirements-gpu.txt) "
            f"and CUDA fp16/bf16 tensors; got device={q.device}, dtype={q.dtype}. Use 'auto' or 'sdpa'."
        )
    if requested == "auto":
        return "flash" if flash_ok else "sdpa"
    return requested


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)V computed in at least fp32; q, k, v are [B, heads, N, head_dim]."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5
    attn = (q.to(compute) * scale) @ k.to(compute).transpose(-2, -1)
    return (attn.softmax(dim=-1) @ v.to(compute)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttnBackend = "auto") -> torch.Tensor:
    """Multi-head attention; q, k, v and the result are [B, heads, N, head_dim]."""
    chosen = resolve_backend(backend, q)
    if chosen == "flash":
        # flash-attn wants [B, N, heads, head_dim].
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if chosen == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return math_attention(q, k, v)
