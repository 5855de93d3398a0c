"""Multi-scale deformable attention (Deformable-DETR) in pure PyTorch.

The reference needs a compiled CUDA op; here the sampling is `grid_sample` on the value maps, which
runs on any device and under `meta`. The kernel is looked up by name at call time
(`DEFORM_ATTN_KERNELS`). Offsets, attention weights and the sampling run in fp32 also when the
engine has cast the parameters to bf16 (bf16 sampling positions would be off by up to 1/32 of a
token); the value and output projections are plain matmuls in the model's dtype. The reference ran
those in fp32 too: on an H200 the fp32 projections made the interactions 24 % of the PIIP-H6B step
(BENCHMARKS.md).

Kernels: "pytorch" (`ms_deform_attn_pytorch`, any device, `meta` included: the fallback and the
reference) and "triton" (`kernels/ms_deform_attn_triton.py`, fused forward and backward; imported
only when first called). `MSDeformAttn(kernel="auto")`, the default, resolves per call to "triton"
for CUDA tensors when `triton` imports and to "pytorch" otherwise (`resolve_kernel`). A kernel name
that is also in `FUSED_DEFORM_ATTN_KERNELS` is called through its fused form, which takes the raw
offsets and attention logits and does the softmax and `reference + offset / (W, H)` itself, with
the same math as the unfused path below; it also reads the value in the model's dtype (widened to
fp32 in the kernel) and writes the output directly in the output projection's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Float32Linear, XavierLinear, ZeroLinear

Shapes = Sequence[tuple[int, int]]
# (value [B, S, heads, head_dim], shapes, sampling_locations [B, Q, heads, levels, points, 2] in
#  [0, 1] (x, y), attention_weights [B, Q, heads, levels, points]) -> [B, Q, heads * head_dim]
DeformKernel = Callable[[torch.Tensor, Shapes, torch.Tensor, torch.Tensor], torch.Tensor]
# (value [B, S, heads, head_dim] in the model's dtype, shapes, reference_points [1 or B, Q, 2] fp32
#  in [0, 1] (x, y), offsets [B, Q, heads, levels, points, 2] fp32 in grid cells of each level,
#  logits [B, Q, heads, levels * points] fp32, out_dtype) -> [B, Q, heads * head_dim] in out_dtype,
#  equal to DeformKernel(value.float(), shapes, reference_points + offsets / (W, H),
#                        softmax(logits over the levels * points)).to(out_dtype)
FusedDeformKernel = Callable[[torch.Tensor, Shapes, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


def ms_deform_attn_pytorch(
    value: torch.Tensor, shapes: Shapes, sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for level, (height, width) in enumerate(shapes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        g = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*heads, head_dim, Q]
    return out.view(batch, heads * head_dim, queries).transpose(1, 2)


def ms_deform_attn_triton(
    value: torch.Tensor, shapes: Shapes, sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> torch.Tensor:
    """The Triton kernel behind the `DeformKernel` interface (fp32 output). Needs `triton`; on a
    CPU only under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)."""
    from .kernels.ms_deform_attn_triton import ms_deform_attn

    return ms_deform_attn(value, shapes, sampling_locations, attention_weights)


def ms_deform_attn_triton_fused(
    value: torch.Tensor,
    shapes: Shapes,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The Triton kernel with the softmax and the location arithmetic fused (`FusedDeformKernel`)."""
    from .kernels.ms_deform_attn_triton import ms_deform_attn_fused

    return ms_deform_attn_fused(value, shapes, reference_points, offsets, logits, out_dtype)


DEFORM_ATTN_KERNELS: dict[str, DeformKernel] = {"pytorch": ms_deform_attn_pytorch, "triton": ms_deform_attn_triton}
FUSED_DEFORM_ATTN_KERNELS: dict[str, FusedDeformKernel] = {"triton": ms_deform_attn_triton_fused}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernel module imports (triton installed and importable)."""
    try:
        from .kernels import ms_deform_attn_triton  # noqa: F401
    except Exception:  # ImportError, or a triton that fails to initialise its backend
        return False
    return True


def resolve_kernel(kernel: str, tensor: torch.Tensor) -> str:
    """"auto" -> "triton" for CUDA tensors when triton imports, else "pytorch"; other names as given."""
    if kernel != "auto":
        return kernel
    return "triton" if tensor.is_cuda and triton_available() else "pytorch"


class SamplingOffsets(Float32Linear):
    """Offsets' projection with Deformable-DETR's init: zero weights, bias on a circle of
    directions (one per head) scaled by 1..points, so each head starts looking its own way."""

    def __init__(self, dim: int, heads: int, levels: int, points: int) -> None:
        self.heads, self.levels, self.points = heads, levels, points
        super().__init__(dim, heads * levels * points * 2)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        # Built from Python floats: under zero.Init torch.arange etc. would already round to bf16.
        values = []
        for head in range(self.heads):
            angle = head * 2.0 * math.pi / self.heads
            x, y = math.cos(angle), math.sin(angle)
            norm = max(abs(x), abs(y))
            for _level in range(self.levels):
                for point in range(1, self.points + 1):
                    values += [x / norm * point, y / norm * point]
        with torch.no_grad():
            self.bias.copy_(self.bias.new_tensor(values, dtype=torch.float32))


class MSDeformAttn(nn.Module):
    """Deformable attention of queries over one or more key grids.

    `value_dim = ratio · dim`; the value projection reads `feat_dim` (the other branch's width when
    the interaction has no projections).
    """

    def __init__(
        self,
        dim: int,
        feat_dim: int | None = None,
        heads: int = 16,
        levels: int = 1,
        points: int = 4,
        ratio: float = 0.5,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        value_dim = int(dim * ratio)
        if value_dim % heads:
            raise ValueError(f"deformable attention: value dim {value_dim} (= {ratio}·{dim}) is not divisible by {heads} heads")
        if kernel != "auto" and kernel not in DEFORM_ATTN_KERNELS and kernel not in FUSED_DEFORM_ATTN_KERNELS:
            raise ValueError(f"deformable attention: unknown kernel {kernel!r}, known: auto, {', '.join(DEFORM_ATTN_KERNELS)}")
        self.heads, self.levels, self.points, self.kernel = heads, levels, points, kernel
        self.sampling_offsets = SamplingOffsets(dim, heads, levels, points)
        self.attention_weights = ZeroLinear(dim, heads * levels * points)
        # Declared in the released checkpoints' order (output_proj before value_proj).
        self.output_proj = XavierLinear(value_dim, dim)
        self.value_proj = XavierLinear(feat_dim or dim, value_dim)

    def forward(
        self, query: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor, shapes: Shapes
    ) -> torch.Tensor:
        """query [B, Q, dim], reference_points [1 or B, Q, 2] in [0, 1] (x, y), feat [B, S, feat_dim]
        with S = Σ h·w over `shapes`. Returns [B, Q, dim] in the query's dtype."""
        if feat.shape[1] != sum(h * w for h, w in shapes):
            raise ValueError(f"deformable attention: {feat.shape[1]} keys do not match grids {list(shapes)}")
        batch, queries, _ = query.shape
        # Projections of values and outputs are ordinary matmuls and run in the model's dtype;
        # offsets, attention weights and the bilinear sampling run in fp32.
        value = self.value_proj(feat).view(batch, feat.shape[1], self.heads, -1)
        kernel = resolve_kernel(self.kernel, query)
        out_dtype = self.output_proj.weight.dtype
        autocast_device = "cuda" if query.is_cuda else "cpu"  # also for meta tensors (FLOP counting)
        with torch.autocast(device_type=autocast_device, enabled=False):
            offsets = self.sampling_offsets(query).view(batch, queries, self.heads, self.levels, self.points, 2)
            logits = self.attention_weights(query).view(batch, queries, self.heads, self.levels * self.points)
            fused = FUSED_DEFORM_ATTN_KERNELS.get(kernel)
            if fused is not None:
                # The same math as below, inside the kernel: softmax, ref + offset / (W, H), fp32 sampling.
                sampled = fused(value, shapes, reference_points.float(), offsets, logits, out_dtype)
            else:
                weights = logits.softmax(-1).view(batch, queries, self.heads, self.levels, self.points)
                # Offsets are in key-grid cells: divide by each level's (width, height).
                normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
                locations = reference_points.float()[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
                sampled = DEFORM_ATTN_KERNELS[kernel](value.float(), shapes, locations, weights)
        return self.output_proj(sampled.to(out_dtype)).to(query.dtype)


def grid_reference_points(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Centres of a (height, width) token grid, normalised to [0, 1], as [1, h·w, 2] (x, y)."""
    height, width = grid
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)[None]
