"""Small layers that initialise their own parameters.

Under DeepSpeed's `zero.Init` a module's parameters are partitioned as soon as *its own*
constructor returns, so a parent that re-initialises a child afterwards touches empty tensors (a
silent no-op), and with bf16 enabled the tensors are already bf16 when `reset_parameters` runs,
where drawing random numbers directly is biased (both measured: docs/DEEPSPEED_CPU.md).
Every layer here therefore draws its initial values in fp32 inside its own `reset_parameters`
and copies them in, so a model built under zero.Init equals one built plainly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_fp32_(param: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
    """Fill `param` with values drawn by `init` on an fp32 buffer (see module docstring)."""
    with torch.no_grad():
        # Tensor.new_empty is not patched by zero.Init, so this buffer really is fp32.
        buffer = param.new_empty(param.shape, dtype=torch.float32)
        init(buffer)
        param.copy_(buffer)


def trunc_normal_init(std: float = 0.02) -> Callable[[torch.Tensor], object]:
    return lambda t: nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


class Linear(nn.Linear):
    """Linear with the ViT initialisation: truncated normal (std 0.02) weights, zero bias."""

    def reset_parameters(self) -> None:
        init_fp32_(self.weight, trunc_normal_init(0.02))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Float32Linear(nn.Linear):
    """Linear that computes in fp32 whatever the stored dtype (the deformable attention's layers).

    Called as a module, not through its weight, so that ZeRO-3's hooks gather the parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), bias)


class XavierLinear(nn.Linear):
    """Linear with Deformable-DETR's value/output projection initialisation."""

    def reset_parameters(self) -> None:
        init_fp32_(self.weight, nn.init.xavier_uniform_)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ZeroLinear(Float32Linear):
    """fp32 Linear that starts at exactly zero (deformable attention weights)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _fan_out_normal_init(weight: torch.Tensor, out_channels: int, kernel: tuple[int, int], groups: int) -> None:
    # He initialisation on fan-out, as the reference's `_init_weights` does for its conv layers.
    fan_out = kernel[0] * kernel[1] * out_channels // groups
    init_fp32_(weight, lambda t: nn.init.normal_(t, 0.0, math.sqrt(2.0 / fan_out)))


class Conv2d(nn.Conv2d):
    """Conv2d with fan-out He-normal weights and zero bias (merge stacks, depthwise FFN conv)."""

    def reset_parameters(self) -> None:
        _fan_out_normal_init(self.weight, self.out_channels, self.kernel_size, self.groups)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ConvTranspose2d(nn.ConvTranspose2d):
    """ConvTranspose2d with fan-out He-normal weights and zero bias (the simple pyramid)."""

    def reset_parameters(self) -> None:
        _fan_out_normal_init(self.weight, self.out_channels, self.kernel_size, self.groups)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PatchConv2d(nn.Conv2d):
    """Patch-embedding conv with torch's default (Kaiming-uniform) initialisation, drawn in fp32."""

    def reset_parameters(self) -> None:
        init_fp32_(self.weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            init_fp32_(self.bias, lambda t: nn.init.uniform_(t, -bound, bound))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (InternViT-6B's norm); weight-only, as in the released checkpoints."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map, computed in fp32 (the InternViT-6B
    baseline's `up1` norm; the PIIP pyramids use GroupNorm(32) there)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.float().permute(0, 2, 3, 1), self.normalized_shape, self.weight.float(),
                              self.bias.float(), self.eps)
        return normed.permute(0, 3, 1, 2).to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth that always runs the wrapped branch.

    The residual branch is computed and then multiplied by a per-sample keep mask, never skipped:
    under ZeRO-3 a rank that skipped a block would not join that block's parameter all-gather and
    the job would deadlock.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
