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


class ChannelsLastConv2d(Conv2d):
    """`Conv2d` that runs in channels-last (NHWC) memory format whatever the input's format.

    cuDNN's NHWC kernels are faster for the wide 3×3 merge convs (BENCHMARKS.md §2: 6.95 → 4.30 ms
    for merge_branch1), but a GroupNorm in between hands back NCHW on CUDA, and ZeRO-3 rebuilds
    gathered parameters as plain contiguous tensors, so neither the input's nor the weight's format
    can be set once for good: both are converted here, per call (a no-op when already NHWC). The
    output is channels-last; values, parameters and state-dict entries are those of `Conv2d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        fmt = torch.channels_last
        return self._conv_forward(x.contiguous(memory_format=fmt), self.weight.contiguous(memory_format=fmt), self.bias)


class ConvTranspose2x2(ConvTranspose2d):
    """ConvTranspose2d(kernel 2, stride 2) computed as one GEMM plus a pixel shuffle.

    With kernel = stride = 2 the output windows do not overlap, so the layer is a per-pixel linear
    map Cin → Cout·2·2 followed by a pixel shuffle: y[b, o, 2i + p, 2j + q] = bias[o] +
    Σ_c x[b, c, i, j] · weight[c, o, p, q]. `weight.reshape(Cin, Cout·4)` is that GEMM's matrix as
    stored (a view of a contiguous weight), so the parameters, their initialisation
    (`ConvTranspose2d`'s fan-out He-normal, drawn in fp32 in its own `reset_parameters`) and the
    state-dict keys and shapes — `weight` [Cin, Cout, 2, 2], `bias` [Cout] — are exactly those of
    the convolution it replaces, and both are read inside this module's forward (ZeRO-3).

    The output keeps the input's memory format: channels-last in → channels-last out (the GEMM then
    reads the input without a copy); otherwise NCHW. Backward is autograd through `linear` and the
    shuffle (two GEMMs for the input and weight gradients, a reduction for the bias).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f"ConvTranspose2x2: expected a 3-D or 4-D input, got {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        if output_size is not None and tuple(output_size[-2:]) != (2 * height, 2 * width):
            raise ValueError(f"ConvTranspose2x2: output size {tuple(output_size)} is not twice the input's {height}x{width}")
        out_channels = self.out_channels
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # Columns of the GEMM are (o, p, q), as the weight is stored; the bias repeats over (p, q).
        bias = self.bias[:, None].expand(out_channels, 4).reshape(-1) if self.bias is not None else None
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.reshape(channels, out_channels * 4).t(), bias)
        y = y.view(batch, height, width, out_channels, 2, 2)
        if channels_last:  # [b, i, p, j, q, o] is NHWC of the upsampled map
            out = y.permute(0, 1, 4, 2, 5, 3).reshape(batch, 2 * height, 2 * width, out_channels).permute(0, 3, 1, 2)
        else:  # [b, o, i, p, j, q] is NCHW
            out = y.permute(0, 3, 1, 4, 2, 5).reshape(batch, out_channels, 2 * height, 2 * width)
        return out.squeeze(0) if unbatched else out


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
