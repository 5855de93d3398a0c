"""Pure-PyTorch multi-scale deformable attention against a per-point bilinear reference."""

from __future__ import annotations

import math

import torch

from piip6b.models.deform_attn import MSDeformAttn, grid_reference_points, ms_deform_attn_pytorch


def _bilinear(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map [C, H, W]; (x, y) in [0, 1] image coordinates, align_corners=False, zero outside."""
    _, height, width = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[0], dtype=value_map.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
            if 0 <= xi < width and 0 <= yi < height:
                out += weight * value_map[:, yi, xi]
    return out


def _slow_reference(value, shapes, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for level, (h, w) in enumerate(shapes):
                    vmap = value[b, starts[level]:starts[level + 1], m].T.reshape(head_dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        out[b, q, m] += weights[b, q, m, level, p] * _bilinear(vmap, x, y)
    return out.reshape(batch, queries, heads * head_dim)


def _random_inputs(dtype, batch=2, queries=5, heads=2, head_dim=3, shapes=((4, 5), (2, 3)), points=3):
    torch.manual_seed(0)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, dtype=dtype)
    # Some sampling points fall outside [0, 1] to exercise zero padding.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, list(shapes), locations, weights


def test_matches_per_point_bilinear_reference_fp32():
    value, shapes, locations, weights = _random_inputs(torch.float32)
    ours = ms_deform_attn_pytorch(value, shapes, locations, weights)
    reference = _slow_reference(value.double(), shapes, locations.double(), weights.double())
    relative = (ours.double() - reference).norm() / reference.norm()
    assert relative.item() <= 1e-5


def test_gradcheck_float64():
    value, shapes, locations, weights = _random_inputs(torch.float64, batch=1, queries=2, heads=1, head_dim=2,
                                                       shapes=((3, 3), (2, 2)), points=2)
    # Keep points away from texel centres' kinks where bilinear sampling is not differentiable.
    locations = (locations * 0.8 + 0.1 + 1e-3).requires_grad_()
    value.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_pytorch(v, shapes, loc, w),
                                    (value, locations, weights), eps=1e-6, atol=1e-5)


def test_module_runs_in_fp32_for_bf16_inputs_and_weights():
    torch.manual_seed(0)
    module = MSDeformAttn(32, feat_dim=16, heads=4, points=4, ratio=0.5).to(torch.bfloat16)
    query = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    feat = torch.randn(2, 16, 16, dtype=torch.bfloat16)
    seen = []
    from piip6b.models import deform_attn

    original = deform_attn.DEFORM_ATTN_KERNELS["pytorch"]

    def spy(value, shapes, locations, weights):
        seen.append((value.dtype, locations.dtype, weights.dtype))
        return original(value, shapes, locations, weights)

    deform_attn.DEFORM_ATTN_KERNELS["pytorch"] = spy
    try:
        out = module(query, grid_reference_points((3, 3)), feat, [(4, 4)])
    finally:
        deform_attn.DEFORM_ATTN_KERNELS["pytorch"] = original
    assert seen == [(torch.float32, torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 32)


def test_mismatched_keys_raise():
    module = MSDeformAttn(32, heads=4)
    try:
        module(torch.randn(1, 4, 32), grid_reference_points((2, 2)), torch.randn(1, 10, 32), [(3, 3)])
    except ValueError as error:
        assert "do not match" in str(error)
    else:
        raise AssertionError("expected a ValueError")
