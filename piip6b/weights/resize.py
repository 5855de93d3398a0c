"""The two shape conversions pretrained ViTs need (docs/SPEC.md §2): patch kernel and position grid.

Both are bicubic (`align_corners=False`, as the reference) and computed in fp32; the caller casts
the result to the destination dtype. Nothing else is ever resized: any other shape mismatch is an
error of the loader.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class NoResizeRule(ValueError):
    """Source and target shapes differ in a way no rule converts."""


def patch_kernel_resizable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    return len(src) == len(dst) == 4 and src[:2] == dst[:2] and src[2:] != dst[2:]


def resize_patch_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Conv patch-embedding kernel (C_out, C_in, k, k) -> (C_out, C_in, *size), bicubic in fp32."""
    return F.interpolate(weight.float(), size=size, mode="bicubic", align_corners=False)


def _grid_side(tokens: int) -> int | None:
    side = math.isqrt(tokens)
    return side if side * side == tokens else None


def pos_layout(tokens: int) -> tuple[bool, int]:
    """(has_cls_slot, grid side) of a (1, N, C) position table: N = side² or 1 + side²."""
    side = _grid_side(tokens)
    if side is not None:
        return False, side
    side = _grid_side(tokens - 1)
    if side is not None:
        return True, side
    raise NoResizeRule(f"a position table of {tokens} tokens is neither a square grid nor 1 + a square grid")


def pos_embed_resizable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    if len(src) != 3 or len(dst) != 3 or src[0] != 1 or dst[0] != 1 or src[2] != dst[2] or src == dst:
        return False
    try:
        src_cls, _ = pos_layout(src[1])
        dst_cls, _ = pos_layout(dst[1])
    except NoResizeRule:
        return False
    # A cls slot can be dropped (DeiT-T -> a DeiT branch) but never invented.
    return src_cls or not dst_cls


def resize_pos_embed(pos: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """(1, [1+]g², C) -> (1, [1+]G², C): grid resized bicubically, cls slot kept iff the target has one."""
    src_cls, src_side = pos_layout(pos.shape[1])
    dst_cls, dst_side = pos_layout(target_tokens)
    if dst_cls and not src_cls:
        raise NoResizeRule("the target keeps a cls position slot but the source has none")
    pos = pos.float()
    cls, grid = (pos[:, :1], pos[:, 1:]) if src_cls else (None, pos)
    if src_side != dst_side:
        dim = grid.shape[2]
        grid = grid.reshape(1, src_side, src_side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(dst_side, dst_side), mode="bicubic", align_corners=False)
        grid = grid.flatten(2).transpose(1, 2)
    return torch.cat([cls, grid], dim=1) if dst_cls else grid.contiguous()
