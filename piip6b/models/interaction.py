"""Interaction units: deformable cross-attention between adjacent branches (docs/SPEC.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .deform_attn import MSDeformAttn
from .layers import Conv2d, DropPath, Linear


@dataclass(frozen=True)
class InteractionSpec:
    heads: int = 16
    points: int = 4
    value_ratio: float = 0.5
    ffn_ratio: float = 0.25
    drop_path_rate: float = 0.4
    # False in H6B-speedup, LH6B and the ADE20K H6B (reference: interaction_proj=False, norm_layer="none").
    with_proj: bool = True
    with_norm: bool = True


class DWConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, tokens, dim = x.shape
        x = x.transpose(1, 2).reshape(batch, dim, *grid)
        return self.dwconv(x).flatten(2).transpose(1, 2)


class ConvFFN(nn.Module):
    """fc1 (dim → ratio·dim) → depthwise 3×3 conv on the token grid → GELU → fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), grid)))


def _norm(spec: InteractionSpec, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6) if spec.with_norm else nn.Identity()


class Injector(nn.Module):
    """q ← q + ca_gamma·DeformAttn(norm q, feat); q ← q + cffn_gamma·drop_path(ConvFFN(norm q)).

    Both gates start at 0, so a fresh unit is the identity and pretrained branches start unchanged.
    """

    def __init__(self, dim: int, feat_dim: int, spec: InteractionSpec) -> None:
        super().__init__()
        self.ca_gamma = nn.Parameter(torch.zeros(dim))
        self.cffn_gamma = nn.Parameter(torch.zeros(dim))
        self.query_norm = _norm(spec, dim)
        self.feat_norm = _norm(spec, feat_dim)
        self.attn = MSDeformAttn(dim, feat_dim, heads=spec.heads, points=spec.points, ratio=spec.value_ratio)
        self.ffn = ConvFFN(dim, int(dim * spec.ffn_ratio))
        self.ffn_norm = _norm(spec, dim)
        self.drop_path = DropPath(spec.drop_path_rate)

    def forward(
        self,
        query: torch.Tensor,
        query_grid: tuple[int, int],
        reference_points: torch.Tensor,
        feat: torch.Tensor,
        feat_grid: tuple[int, int],
    ) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), [feat_grid])
        query = query + self.ca_gamma * attn
        return query + self.cffn_gamma * self.drop_path(self.ffn(self.ffn_norm(query), query_grid))


class BidirectionalInteractionUnit(nn.Module):
    """Exchange between branch i (wider, smaller grid) and branch j (narrower, larger grid).

    Whatever the branches' indices, the unit calls its two sides `branch1` (i) and `branch2` (j):
    `interaction_units_23.branch2to1_injector` updates branch 2 of the model from branch 3, as in
    the reference's state dicts. Both directions read the pre-update tensors.
    """

    def __init__(self, dim_i: int, dim_j: int, spec: InteractionSpec) -> None:
        super().__init__()
        self.with_proj = spec.with_proj
        if spec.with_proj:
            self.branch2to1_proj = Linear(dim_j, dim_i)
            self.branch1to2_proj = Linear(dim_i, dim_j)
        self.branch2to1_injector = Injector(dim_i, dim_i if spec.with_proj else dim_j, spec)
        self.branch1to2_injector = Injector(dim_j, dim_j if spec.with_proj else dim_i, spec)
        self.use_checkpoint = False

    def forward(
        self,
        x_i: torch.Tensor,
        grid_i: tuple[int, int],
        x_j: torch.Tensor,
        grid_j: tuple[int, int],
        ref_i: torch.Tensor,
        ref_j: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feat_for_i = self.branch2to1_proj(x_j) if self.with_proj else x_j
        feat_for_j = self.branch1to2_proj(x_i) if self.with_proj else x_i
        new_i = self._run(self.branch2to1_injector, x_i, grid_i, ref_i, feat_for_i, grid_j)
        new_j = self._run(self.branch1to2_injector, x_j, grid_j, ref_j, feat_for_j, grid_i)
        return new_i, new_j

    def _run(self, injector: Injector, *args) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(injector, *args, use_reentrant=False)
        return injector(*args)


class InteractionBlock(nn.Module):
    """One interaction step across all adjacent pairs: `interaction_units_{k}{k+1}`.

    Pairs run from the highest-resolution pair down (2–3 before 1–2), each reading the other's
    latest output, as in the reference.
    """

    def __init__(self, dims: list[int], spec: InteractionSpec) -> None:
        super().__init__()
        self.pairs = [(k, k + 1) for k in range(len(dims) - 1)]
        for i, j in self.pairs:
            self.add_module(f"interaction_units_{i + 1}{j + 1}", BidirectionalInteractionUnit(dims[i], dims[j], spec))

    def unit(self, i: int, j: int) -> BidirectionalInteractionUnit:
        return getattr(self, f"interaction_units_{i + 1}{j + 1}")

    def forward(
        self, xs: list[torch.Tensor], grids: list[tuple[int, int]], refs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        xs = list(xs)
        for i, j in reversed(self.pairs):
            xs[i], xs[j] = self.unit(i, j)(xs[i], grids[i], xs[j], grids[j], refs[i], refs[j])
        return xs
