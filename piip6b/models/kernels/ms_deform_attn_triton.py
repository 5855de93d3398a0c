"""Multi-scale deformable attention as fused Triton kernels, forward and backward.

Semantics are those of `piip6b.models.deform_attn.ms_deform_attn_pytorch`: bilinear sampling of each
level's value map at the sampling locations (`grid_sample`, align_corners=False, zero padding
outside the map), weighted by the attention weights and summed over levels and points.

Two entry points, both autograd-aware:

- `ms_deform_attn(value, shapes, sampling_locations, attention_weights, out_dtype=torch.float32)`:
  the `DEFORM_ATTN_KERNELS` interface. value [B, S, heads, D] (fp32, bf16 or fp16),
  sampling_locations [B, Q, heads, L, P, 2] fp32 in [0, 1] (x, y), attention_weights
  [B, Q, heads, L, P] fp32 (already normalised). Returns [B, Q, heads·D] in `out_dtype`.
  Gradients: value, sampling_locations, attention_weights.
- `ms_deform_attn_fused(value, shapes, reference_points, offsets, logits, out_dtype=torch.float32)`:
  the same attention with the two ops around it fused in, exactly as `MSDeformAttn` computes them:
  `weights = softmax(logits over the L·P points of a (query, head))` and
  `location = reference_points + offsets / (W_l, H_l)`. reference_points [1 or B, Q, 2] fp32,
  offsets [B, Q, heads, L, P, 2] fp32 in grid cells of each level, logits [B, Q, heads, L·P] fp32.
  Gradients: value, reference_points (if it requires grad), offsets, logits.

Precision: locations, bilinear weights, softmax and every accumulation run in fp32; value (and the
incoming output gradient) may be bf16/fp16 and are widened to fp32 when loaded. The value gradient
is accumulated in an fp32 buffer and cast to the value's dtype once at the end. The output is
written once, in `out_dtype` (the module passes its output projection's dtype, saving the fp32
round trip and the cast kernel; the rounding is the same single fp32 → bf16 rounding).

Tiling: one program per (batch, head, block of BLOCK_Q queries), grid (⌈Q / BLOCK_Q⌉, B·heads).
The head's channels are one BLOCK_D = next_pow2(D) tile (masked when D is not a power of two,
e.g. 100 → 128, 40 → 64). The L·P points are unrolled at compile time; for each point the four
bilinear corners are gathered as [BLOCK_Q, BLOCK_D] tiles (rows contiguous, D·itemsize bytes)
and accumulated into an fp32 register tile. The softmax runs on a [BLOCK_Q, next_pow2(L·P)] tile
of logits loaded once per program. Level shapes are scalar arguments (at most `MAX_LEVELS`) and are
not specialised on, so new image sizes do not recompile; heads, D, L and P are compile-time.
Compiled for sm_90a (no GPU needed to compile), the D 100 bf16 gathers are 8-byte vector loads
and the value-gradient scatter below is 4-wide vector atomics (`atom.global.relaxed.add.v4.f32`).

Backward recomputes the sampling (nothing but the inputs is saved: no [B, Q, heads, L, P, D]
intermediate). Per point and corner it forms dot(grad_out, v) over the channels, from which the
attention-weight gradient (Σ_corners bilinear·dot) and the location gradient (Σ_corners
∂bilinear/∂x·dot, times the weight) follow without atomics; the softmax backward runs on the
per-program [BLOCK_Q, L·P] tile. The value gradient is scattered with fp32 `atomic_add` (relaxed):
its summation order depends on scheduling, so grad(value) is not bitwise reproducible run to run
(like `grid_sample`'s CUDA backward and the original Deformable-DETR op); every other gradient and
the forward are deterministic. With `torch.use_deterministic_algorithms(True)` the backward raises
(or warns, with warn_only), as `grid_sample` does.

On a CPU, the kernels run under Triton's interpreter (`TRITON_INTERPRET=1` set before `triton` is
imported); that is how the tests check them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

MAX_LEVELS = 4
MAX_HEAD_DIM = 1024
_NO_SPECIALISE = ["num_queries", "num_keys", "ref_batch_stride"] + [
    f"{name}{level}" for level in range(MAX_LEVELS) for name in ("h", "w", "s")
]


@dataclass(frozen=True)
class LaunchConfig:
    """Queries per program and warps per program of one kernel launch."""

    block_q: int
    num_warps: int


def default_config(head_dim: int, points: int, backward: bool) -> LaunchConfig:
    """About 1024 elements per [BLOCK_Q, BLOCK_D] tile on 4 warps (8 per thread) for 4 points per
    head (L·P = `points`), proportionally smaller for more points (at least 256); the same for the
    forward and the backward until a GPU sweep says otherwise.

    The L·P·4 corner gathers are unrolled and the compiler keeps them all in flight, so registers
    grow with the tile: compiled for sm_90a (ptxas -v, bf16 values, fused, 4 points, no spills),
    D 100 with BLOCK_Q 8 / 16 / 32 takes 64 / 110 / 191 registers forward and 92 / 190 / 255 (+
    spills) backward; D 40 with BLOCK_Q 16 / 32 takes 48 / 80 forward and 96 / 190 backward.
    A gather-bound kernel wants resident warps, hence the small tile. Not yet timed on a GPU:
    `bench/deform_attn_kernel.py --sweep` times the alternatives (`CONFIG_OVERRIDES`)."""
    block_d = triton.next_power_of_2(head_dim)
    tile = max(256, 4096 // triton.next_power_of_2(points))
    return LaunchConfig(block_q=max(2, min(64, tile // block_d)), num_warps=4)


# Overrides for benchmarking/tuning: {("fwd" | "bwd", head_dim, L·P): LaunchConfig}.
CONFIG_OVERRIDES: dict[tuple[str, int, int], LaunchConfig] = {}


def _config(kind: str, head_dim: int, points: int) -> LaunchConfig:
    return CONFIG_OVERRIDES.get((kind, head_dim, points)) or default_config(head_dim, points, kind == "bwd")


# --------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_weights(attn_ptr, row, q_mask, LP: tl.constexpr, LP_PAD: tl.constexpr, FUSED: tl.constexpr):
    """[BLOCK_Q, LP_PAD] fp32 weights of rows `row` (zero in the padding columns)."""
    lp = tl.arange(0, LP_PAD)
    in_lp = lp[None, :] < LP
    a = tl.load(attn_ptr + row[:, None] * LP + lp[None, :], mask=q_mask[:, None] & in_lp, other=0.0)
    if FUSED:
        a = tl.where(in_lp, a, float("-inf"))
        e = tl.exp(a - tl.max(a, axis=1)[:, None])
        a = e / tl.sum(e, axis=1)[:, None]
    return a


@triton.jit
def _pixel_coordinates(loc_ptr, row, q_mask, ref_x, ref_y, wf, hf, j: tl.constexpr, LP: tl.constexpr, FUSED: tl.constexpr):
    """Point j's continuous pixel coordinates (px, py), px = x·W − ½ (grid_sample, align_corners=False)."""
    ptr = loc_ptr + (row * LP + j) * 2
    x = tl.load(ptr, mask=q_mask, other=0.0)
    y = tl.load(ptr + 1, mask=q_mask, other=0.0)
    if FUSED:  # location = reference + offset / (W, H), as MSDeformAttn computes it
        x = ref_x + x / wf
        y = ref_y + y / hf
    px = x * wf - 0.5
    py = y * hf - 0.5
    # Beyond one cell outside the map all four corners are padding whatever the exact position:
    # clamping there changes no result and keeps the integer corner indices in range.
    px = tl.minimum(tl.maximum(px, -2.0), wf + 1.0)
    py = tl.minimum(tl.maximum(py, -2.0), hf + 1.0)
    return px, py


@triton.jit
def _corner(x0, y0, fx, fy, wl, hl, sl, q_mask, DX: tl.constexpr, DY: tl.constexpr):
    """Key index, in-map mask and the two bilinear factors of corner (x0 + DX, y0 + DY)."""
    if DX == 1:
        bx = fx
        x_ok = (x0 >= -1) & (x0 < wl - 1)
    else:
        bx = 1.0 - fx
        x_ok = (x0 >= 0) & (x0 < wl)
    if DY == 1:
        by = fy
        y_ok = (y0 >= -1) & (y0 < hl - 1)
    else:
        by = 1.0 - fy
        y_ok = (y0 >= 0) & (y0 < hl)
    key = sl + (y0 + DY) * wl + (x0 + DX)
    return key, q_mask & x_ok & y_ok, bx, by


@triton.jit
def _level_shape(l: tl.constexpr, h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3):
    if l == 0:
        hl, wl, sl = h0, w0, s0
    elif l == 1:
        hl, wl, sl = h1, w1, s1
    elif l == 2:
        hl, wl, sl = h2, w2, s2
    else:
        hl, wl, sl = h3, w3, s3
    return hl, wl, sl


@triton.jit(do_not_specialize=_NO_SPECIALISE)
def _ms_deform_attn_fwd(
    value_ptr, loc_ptr, attn_ptr, ref_ptr, out_ptr,
    num_queries, num_keys, ref_batch_stride,
    h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
    LP_PAD: tl.constexpr, FUSED: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    LP: tl.constexpr = LEVELS * POINTS
    ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM  # one key's values, all heads
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row = (b * num_queries + q) * HEADS + h  # (b, q, h) row of the per-query tensors, int64
    lp = tl.arange(0, LP_PAD)

    weights = _attention_weights(attn_ptr, row, q_mask, LP, LP_PAD, FUSED)
    ref_x = 0.0
    ref_y = 0.0
    if FUSED:
        ref = ref_ptr + b * ref_batch_stride + q * 2
        ref_x = tl.load(ref, mask=q_mask, other=0.0)
        ref_y = tl.load(ref + 1, mask=q_mask, other=0.0)
    value_base = value_ptr + (b * num_keys * HEADS + h) * HEAD_DIM

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(LP):
        hl, wl, sl = _level_shape(j // POINTS, h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3)
        wf = wl.to(tl.float32)
        hf = hl.to(tl.float32)
        w_j = tl.sum(tl.where(lp[None, :] == j, weights, 0.0), axis=1)
        px, py = _pixel_coordinates(loc_ptr, row, q_mask, ref_x, ref_y, wf, hf, j, LP, FUSED)
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        fx = px - x0f
        fy = py - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        for corner in tl.static_range(4):
            key, valid, bx, by = _corner(x0, y0, fx, fy, wl, hl, sl, q_mask, corner % 2, corner // 2)
            v = tl.load(value_base + (key * ROW_STRIDE)[:, None] + d[None, :],
                        mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc += (w_j * bx * by)[:, None] * v
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=_NO_SPECIALISE)
def _ms_deform_attn_bwd(
    value_ptr, loc_ptr, attn_ptr, ref_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_queries, num_keys, ref_batch_stride,
    h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
    LP_PAD: tl.constexpr, FUSED: tl.constexpr, VALUE_GRAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    LP: tl.constexpr = LEVELS * POINTS
    ROW_STRIDE: tl.constexpr = HEADS * HEAD_DIM
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row = (b * num_queries + q) * HEADS + h
    lp = tl.arange(0, LP_PAD)

    weights = _attention_weights(attn_ptr, row, q_mask, LP, LP_PAD, FUSED)
    ref_x = 0.0
    ref_y = 0.0
    if FUSED:
        ref = ref_ptr + b * ref_batch_stride + q * 2
        ref_x = tl.load(ref, mask=q_mask, other=0.0)
        ref_y = tl.load(ref + 1, mask=q_mask, other=0.0)
    value_offset = (b * num_keys * HEADS + h) * HEAD_DIM
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset
    g = tl.load(grad_out_ptr + row[:, None] * HEAD_DIM + d[None, :],
                mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    grad_w = tl.zeros((BLOCK_Q, LP_PAD), dtype=tl.float32)  # d loss / d weight (post-softmax)
    for j in tl.static_range(LP):
        hl, wl, sl = _level_shape(j // POINTS, h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3)
        wf = wl.to(tl.float32)
        hf = hl.to(tl.float32)
        w_j = tl.sum(tl.where(lp[None, :] == j, weights, 0.0), axis=1)
        px, py = _pixel_coordinates(loc_ptr, row, q_mask, ref_x, ref_y, wf, hf, j, LP, FUSED)
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        fx = px - x0f
        fy = py - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        gw = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        gx = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        gy = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for corner in tl.static_range(4):
            key, valid, bx, by = _corner(x0, y0, fx, fy, wl, hl, sl, q_mask, corner % 2, corner // 2)
            offs = (key * ROW_STRIDE)[:, None] + d[None, :]
            tile_mask = valid[:, None] & d_mask[None, :]
            v = tl.load(value_base + offs, mask=tile_mask, other=0.0).to(tl.float32)
            dot = tl.sum(g * v, axis=1)  # d loss / d (sampled corner value), per query
            gw += bx * by * dot
            # d(bx·by)/d px = ±by, d(bx·by)/d py = ±bx
            if corner % 2 == 1:
                gx += by * dot
            else:
                gx -= by * dot
            if corner // 2 == 1:
                gy += bx * dot
            else:
                gy -= bx * dot
            if VALUE_GRAD:
                tl.atomic_add(grad_value_base + offs, (w_j * bx * by)[:, None] * g, mask=tile_mask, sem="relaxed")
        gx = gx * w_j  # d loss / d px
        gy = gy * w_j
        if not FUSED:  # px = x·W − ½; with offsets, px = (ref + off/W)·W − ½ has d px / d off = 1
            gx = gx * wf
            gy = gy * hf
        out = grad_loc_ptr + (row * LP + j) * 2
        tl.store(out, gx, mask=q_mask)
        tl.store(out + 1, gy, mask=q_mask)
        grad_w = tl.where(lp[None, :] == j, gw[:, None], grad_w)
    if FUSED:  # softmax backward over the L·P points
        grad_w = weights * (grad_w - tl.sum(weights * grad_w, axis=1)[:, None])
    tl.store(grad_attn_ptr + row[:, None] * LP + lp[None, :], grad_w, mask=q_mask[:, None] & (lp[None, :] < LP))


# --------------------------------------------------------------------------------------------
# Host code
# --------------------------------------------------------------------------------------------
def _level_args(shapes: Sequence[tuple[int, int]]) -> list[int]:
    if not 1 <= len(shapes) <= MAX_LEVELS:
        raise ValueError(f"ms_deform_attn (triton): 1 to {MAX_LEVELS} levels supported, got {len(shapes)}")
    args, start = [], 0
    for height, width in shapes:
        args += [int(height), int(width), start]
        start += int(height) * int(width)
    args += [0, 0, 0] * (MAX_LEVELS - len(shapes))
    return args


def _check(value: torch.Tensor, shapes: Sequence[tuple[int, int]], per_point: torch.Tensor, attn: torch.Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn (triton): value must be [B, S, heads, D], got {tuple(value.shape)}")
    batch, keys, heads, head_dim = value.shape
    if keys != sum(h * w for h, w in shapes):
        raise ValueError(f"ms_deform_attn (triton): {keys} keys do not match grids {list(shapes)}")
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"ms_deform_attn (triton): value dtype {value.dtype} not supported")
    if per_point.dtype != torch.float32 or attn.dtype != torch.float32:
        raise TypeError("ms_deform_attn (triton): locations/offsets and weights/logits must be fp32")
    if per_point.dim() != 6 or per_point.shape[0] != batch or per_point.shape[2] != heads or per_point.shape[3] != len(shapes) \
            or per_point.shape[-1] != 2:
        raise ValueError(f"ms_deform_attn (triton): per-point tensor of shape {tuple(per_point.shape)} does not match value "
                         f"{tuple(value.shape)} and {len(shapes)} levels")
    if attn.numel() * 2 != per_point.numel():
        raise ValueError(f"ms_deform_attn (triton): weights {tuple(attn.shape)} do not match locations {tuple(per_point.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"ms_deform_attn (triton): head dim {head_dim} > {MAX_HEAD_DIM}")
    if keys * heads * head_dim >= 2**31:  # key offsets inside one batch element are int32
        raise ValueError("ms_deform_attn (triton): one batch element's value tensor exceeds 2^31 elements")
    if batch * heads > 65535:  # the launch grid's second axis
        raise ValueError(f"ms_deform_attn (triton): batch × heads = {batch * heads} > 65535")


def _device_guard(tensor: torch.Tensor):
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    import contextlib

    return contextlib.nullcontext()


def _forward(value, shapes, per_point, attn, ref, fused: bool, out_dtype: torch.dtype) -> torch.Tensor:
    batch, keys, heads, head_dim = value.shape
    queries, levels, points = per_point.shape[1], per_point.shape[3], per_point.shape[4]
    out = torch.empty(batch, queries, heads * head_dim, dtype=out_dtype, device=value.device)
    if out.numel() == 0:
        return out
    config = _config("fwd", head_dim, levels * points)
    grid = (triton.cdiv(queries, config.block_q), batch * heads)
    ref_arg, ref_stride = (ref, 0 if ref.shape[0] == 1 else queries * 2) if fused else (per_point, 0)
    with _device_guard(value):
        _ms_deform_attn_fwd[grid](
            value, per_point, attn, ref_arg, out,
            queries, keys, ref_stride, *_level_args(shapes),
            HEADS=heads, HEAD_DIM=head_dim, LEVELS=levels, POINTS=points,
            LP_PAD=triton.next_power_of_2(levels * points), FUSED=fused,
            BLOCK_Q=config.block_q, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=config.num_warps,
        )
    return out


def _backward(grad_out, value, shapes, per_point, attn, ref, fused: bool, value_grad: bool):
    batch, keys, heads, head_dim = value.shape
    queries, levels, points = per_point.shape[1], per_point.shape[3], per_point.shape[4]
    if torch.are_deterministic_algorithms_enabled() and value_grad:
        message = ("ms_deform_attn (triton) backward accumulates the value gradient with atomic adds and "
                   "does not have a deterministic implementation")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message)
        else:
            raise RuntimeError(message + "; use MSDeformAttn(kernel='pytorch') or warn_only=True")
    grad_out = grad_out.contiguous()
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device) if value_grad else None
    grad_loc = torch.empty(per_point.shape, dtype=torch.float32, device=value.device)
    grad_attn = torch.empty(attn.shape, dtype=torch.float32, device=value.device)
    if grad_loc.numel():
        config = _config("bwd", head_dim, levels * points)
        grid = (triton.cdiv(queries, config.block_q), batch * heads)
        ref_arg, ref_stride = (ref, 0 if ref.shape[0] == 1 else queries * 2) if fused else (per_point, 0)
        with _device_guard(value):
            _ms_deform_attn_bwd[grid](
                value, per_point, attn, ref_arg, grad_out,
                grad_value if value_grad else grad_loc, grad_loc, grad_attn,
                queries, keys, ref_stride, *_level_args(shapes),
                HEADS=heads, HEAD_DIM=head_dim, LEVELS=levels, POINTS=points,
                LP_PAD=triton.next_power_of_2(levels * points), FUSED=fused, VALUE_GRAD=value_grad,
                BLOCK_Q=config.block_q, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=config.num_warps,
            )
    if grad_value is not None and value.dtype != torch.float32:
        grad_value = grad_value.to(value.dtype)
    return grad_value, grad_loc, grad_attn


class _MSDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, shapes, out_dtype):
        ctx.shapes = shapes
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        return _forward(value, shapes, sampling_locations, attention_weights, None, False, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        value, locations, weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = _backward(
            grad_out, value, ctx.shapes, locations, weights, None, False, ctx.needs_input_grad[0])
        return grad_value, grad_loc, grad_attn, None, None


class _MSDeformAttnFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, reference_points, offsets, logits, shapes, out_dtype):
        ctx.shapes = shapes
        ctx.save_for_backward(value, reference_points, offsets, logits)
        return _forward(value, shapes, offsets, logits, reference_points, True, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        value, ref, offsets, logits = ctx.saved_tensors
        grad_value, grad_offsets, grad_logits = _backward(
            grad_out, value, ctx.shapes, offsets, logits, ref, True, ctx.needs_input_grad[0])
        grad_ref = None
        if ctx.needs_input_grad[1]:
            # location = ref + offset / (W, H): d loss / d ref = Σ over heads, levels, points of
            # d loss / d location = d loss / d offset · (W, H).
            scale = torch.tensor([[w, h] for h, w in ctx.shapes], dtype=torch.float32, device=grad_offsets.device)
            grad_ref = (grad_offsets * scale[:, None, :]).sum((2, 3, 4))
            if ref.shape[0] == 1:
                grad_ref = grad_ref.sum(0, keepdim=True)
        return grad_value, grad_ref, grad_offsets, grad_logits, None, None


def _shapes(shapes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(h), int(w)) for h, w in shapes)


# Called eagerly from inside a compiled block (`performance.compile: blocks`): each is already one
# fused launch each way with its own backward, and dynamo would otherwise trace the autograd.Function
# and its launches; the projections around them are compiled. The marker lives here, not on the
# wrappers in deform_attn.py: `torch.compiler.disable` imports torch._dynamo, which loads triton,
# and the CPU path must not.
@torch.compiler.disable
def ms_deform_attn(
    value: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`DEFORM_ATTN_KERNELS` interface (module docstring). Returns [B, Q, heads·D] in `out_dtype`."""
    shapes = _shapes(shapes)
    _check(value, shapes, sampling_locations, attention_weights)
    return _MSDeformAttn.apply(value.contiguous(), sampling_locations.contiguous(),
                               attention_weights.contiguous(), shapes, out_dtype)


@torch.compiler.disable
def ms_deform_attn_fused(
    value: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    logits: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Softmax of `logits` and `reference_points + offsets / (W, H)` fused into the attention
    (module docstring). Returns [B, Q, heads·D] in `out_dtype`."""
    shapes = _shapes(shapes)
    _check(value, shapes, offsets, logits)
    batch, queries = offsets.shape[:2]
    if reference_points.dtype != torch.float32 or reference_points.shape not in ((1, queries, 2), (batch, queries, 2)):
        raise ValueError(f"ms_deform_attn (triton): reference points must be fp32 [1 or {batch}, {queries}, 2], "
                         f"got {reference_points.dtype} {tuple(reference_points.shape)}")
    return _MSDeformAttnFused.apply(value.contiguous(), reference_points.contiguous(), offsets.contiguous(),
                                    logits.contiguous(), shapes, out_dtype)
