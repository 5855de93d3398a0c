"""The Triton multi-scale deformable attention kernel against `ms_deform_attn_pytorch`, on a CPU.

The kernels run under Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
`triton` is imported: every kernel case therefore runs in one child process started with that
variable (`python tests/test_deform_attn_triton.py --worker`), which prints one JSON object with
each case's errors; the tests here read it. Nothing of the interpreter leaks into this process.

Errors are reported per tensor as max |triton − pytorch| ("abs") and that divided by max |pytorch|
("rel"); both paths are also compared with the PyTorch path in float64 ("abs64"/"ref_abs64": the
kernel's and the fp32 reference's own errors), so a failure shows whether the kernel or the
tolerance is off. Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from piip6b.testing import REPO, child_env

FP32_REL = 1e-5  # max error / max magnitude, fp32 against fp32 (measured ~1e-7; bf16 would be ~4e-3)
BF16_EXCESS = 1e-6  # error beyond one bf16 rounding (or ulp), over max |ref|: fp32 noise only


# ----------------------------------------------------------------------------------------------
# Child process: runs the kernels under the interpreter
# ----------------------------------------------------------------------------------------------
def _err(ours: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor) -> dict:
    ours, ref32, ref64 = ours.double(), ref32.double(), ref64.double()
    scale = ref32.abs().max().item() or 1.0
    abs_err = (ours - ref32).abs().max().item()
    return {
        "abs": abs_err,
        "rel": abs_err / scale,
        "abs64": (ours - ref64).abs().max().item(),
        "ref_abs64": (ref32 - ref64).abs().max().item(),
        "elem_rel": ((ours - ref32).abs() / ref32.abs().clamp_min(1e-6 * scale)).max().item(),
        # Error beyond one bf16 rounding to nearest (2^-8 relative) / one bf16 ulp (2^-7), over max |ref|.
        "excess_rtne": ((ours - ref32).abs() - 2.0**-8 * ref32.abs()).max().item() / scale,
        "excess_ulp": ((ours - ref32).abs() - 2.0**-7 * ref32.abs()).max().item() / scale,
        "max": scale,
    }


def _inputs(batch, queries, heads, head_dim, shapes, points, value_dtype=torch.float32, low=-0.2, high=1.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = sum(h * w for h, w in shapes)
    value = torch.randn(batch, keys, heads, head_dim, generator=generator).to(value_dtype)
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * (high - low) + low
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, list(shapes), loc, weights


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out.detach(), grads


def _case_unfused(name, value, shapes, loc, weights, out_dtype=torch.float32):
    from piip6b.models.deform_attn import ms_deform_attn_pytorch
    from piip6b.models.kernels.ms_deform_attn_triton import ms_deform_attn

    started = time.time()
    grad_out = torch.randn(loc.shape[0], loc.shape[1], value.shape[2] * value.shape[3], generator=torch.Generator().manual_seed(1))
    out, grads = _grads(lambda v, l, w: ms_deform_attn(v, shapes, l, w, out_dtype=out_dtype), (value, loc, weights), grad_out)
    # The reference reads the same (possibly bf16-rounded) values, widened to fp32 / fp64.
    ref, ref_grads = _grads(lambda v, l, w: ms_deform_attn_pytorch(v, shapes, l, w), (value.float(), loc, weights), grad_out)
    ref64, ref64_grads = _grads(lambda v, l, w: ms_deform_attn_pytorch(v, shapes, l, w),
                                (value.double(), loc.double(), weights.double()), grad_out.double())
    names = ("grad_value", "grad_locations", "grad_weights")
    result = {"out": _err(out, ref, ref64), "seconds": time.time() - started,
              "dtypes": [str(out.dtype)] + [str(g.dtype) for g in grads]}
    for key, a, b, c in zip(names, grads, ref_grads, ref64_grads):
        result[key] = _err(a, b, c)
    return name, result


def _module_math(value, shapes, ref, offsets, logits):
    """MSDeformAttn's unfused math, as written in deform_attn.py."""
    from piip6b.models.deform_attn import ms_deform_attn_pytorch

    batch, queries, heads, levels, points, _ = offsets.shape
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype)
    locations = ref.to(offsets.dtype)[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    return ms_deform_attn_pytorch(value.to(offsets.dtype), shapes, locations, weights)


def _case_fused(name, value, shapes, ref, offsets, logits, out_dtype=torch.float32):
    from piip6b.models.kernels.ms_deform_attn_triton import ms_deform_attn_fused

    started = time.time()
    grad_out = torch.randn(offsets.shape[0], offsets.shape[1], value.shape[2] * value.shape[3], generator=torch.Generator().manual_seed(2))
    grad_out = grad_out.to(out_dtype).float()  # what flows back into a bf16 output, for every path
    out, grads = _grads(lambda v, r, o, g: ms_deform_attn_fused(v, shapes, r, o, g, out_dtype=out_dtype),
                        (value, ref, offsets, logits), grad_out)
    ref32, ref_grads = _grads(lambda v, r, o, g: _module_math(v, shapes, r, o, g), (value.float(), ref, offsets, logits), grad_out)
    ref64, ref64_grads = _grads(lambda v, r, o, g: _module_math(v, shapes, r, o, g),
                                (value.double(), ref.double(), offsets.double(), logits.double()), grad_out.double())
    names = ("grad_value", "grad_reference_points", "grad_offsets", "grad_logits")
    result = {"out": _err(out, ref32, ref64), "seconds": time.time() - started,
              "dtypes": [str(out.dtype)] + [str(g.dtype) for g in grads]}
    for key, a, b, c in zip(names, grads, ref_grads, ref64_grads):
        result[key] = _err(a, b, c)
    return name, result


def _case_module(name, dtype):
    from piip6b.models.deform_attn import MSDeformAttn, grid_reference_points

    started = time.time()
    torch.manual_seed(3)
    ours = MSDeformAttn(40, feat_dim=24, heads=2, levels=1, points=4, ratio=2.5, kernel="triton")  # head dim 50
    with torch.no_grad():  # move away from the init (zero offsets' weights, uniform attention)
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    reference = MSDeformAttn(40, feat_dim=24, heads=2, levels=1, points=4, ratio=2.5, kernel="pytorch")
    reference.load_state_dict(ours.state_dict())
    ours, reference = ours.to(dtype), reference.to(dtype)
    query = torch.randn(2, 12, 40).to(dtype)
    feat = torch.randn(2, 5 * 7, 24).to(dtype)
    refs = grid_reference_points((3, 4))
    result = {}
    outs = []
    for module in (ours, reference):
        q, f = query.clone().requires_grad_(), feat.clone().requires_grad_()
        out = module(q, refs, f, [(5, 7)])
        out.float().square().sum().backward()
        outs.append((out.detach(), q.grad, f.grad, {n: p.grad for n, p in module.named_parameters()}))
    (a, qa, fa, pa), (b, qb, fb, pb) = outs
    result["out"] = _err(a, b, b)
    result["grad_query"] = _err(qa, qb, qb)
    result["grad_feat"] = _err(fa, fb, fb)
    for n in pa:
        result[f"grad_{n}"] = _err(pa[n], pb[n], pb[n])
    result["seconds"] = time.time() - started
    result["dtypes"] = [str(a.dtype)]
    return name, result


def _check_no_triton_on_cpu() -> dict:
    """Before anything imports triton: the CPU default path must not import it."""
    from piip6b.models.deform_attn import MSDeformAttn, grid_reference_points, resolve_kernel

    module = MSDeformAttn(16, heads=2)
    out = module(torch.randn(1, 4, 16), grid_reference_points((2, 2)), torch.randn(1, 9, 16), [(3, 3)])
    out.sum().backward()
    return {
        "triton_imported": "triton" in sys.modules,
        "kernel_module_imported": "piip6b.models.kernels.ms_deform_attn_triton" in sys.modules,
        "auto_on_cpu": resolve_kernel("auto", out),
        "auto_on_meta": resolve_kernel("auto", torch.empty(1, device="meta")),
    }


def _check_determinism_alert() -> dict:
    from piip6b.models.kernels.ms_deform_attn_triton import ms_deform_attn

    value, shapes, loc, weights = _inputs(1, 2, 1, 2, [(2, 2)], 1)
    value.requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        ms_deform_attn(value, shapes, loc, weights).sum().backward()
    except RuntimeError as error:
        return {"raised": "deterministic" in str(error)}
    finally:
        torch.use_deterministic_algorithms(False)
    return {"raised": False}


def worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker needs TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    report = {"no_triton_on_cpu": _check_no_triton_on_cpu()}
    cases = []
    # Three odd-sized levels, 3 points (9 per head: padded to 16 in the kernel), 2 heads, head dim 5,
    # some locations outside [0, 1].
    cases.append(_case_unfused("fp32_3levels_odd", *_inputs(2, 7, 2, 5, [(4, 5), (3, 3), (2, 7)], 3)))
    # The 6B-side injector's head dim (1600 / 16 = 100, padded to a 128-wide tile), 4 points.
    cases.append(_case_unfused("fp32_head100", *_inputs(1, 5, 2, 100, [(7, 9)], 4, seed=4)))
    # Locations far outside, just outside and on the border: zero padding (outputs of fully
    # outside points are exactly 0 and give no gradient).
    value, shapes, loc, weights = _inputs(1, 9, 2, 3, [(3, 4), (1, 2)], 2, low=-3.0, high=4.0, seed=5)
    loc[0, 0] = 1e4
    loc[0, 1] = -1e4
    loc[0, 2, :, :, :, 0] = -0.13  # just left of the map, within one cell (corner 1 still inside)
    loc[0, 3, :, :, :, 1] = 1.07
    cases.append(_case_unfused("fp32_out_of_range", value, shapes, loc, weights))
    # Every query of a head samples the same point: colliding value-gradient atomics in one tile.
    value, shapes, loc, weights = _inputs(1, 24, 2, 6, [(5, 5)], 2, seed=6)
    loc[:] = loc[:, :1]
    cases.append(_case_unfused("fp32_shared_corners", value, shapes, loc, weights))
    # bf16 values, fp32 sampling and accumulation; the value gradient comes back in bf16.
    cases.append(_case_unfused("bf16_values_head100", *_inputs(1, 5, 2, 100, [(6, 5)], 4, value_dtype=torch.bfloat16, seed=7)))
    # Fused softmax + reference + offset / (W, H), two levels, head dim 40 (the ViT-H side's),
    # reference points shared over the batch and requiring grad.
    generator = torch.Generator().manual_seed(8)
    shapes = [(5, 3), (2, 2)]
    value = torch.randn(2, 19, 2, 40, generator=generator)
    ref = torch.rand(1, 6, 2, generator=generator)
    offsets = torch.randn(2, 6, 2, 2, 2, 2, generator=generator) * 2
    logits = torch.randn(2, 6, 2, 4, generator=generator) * 2
    cases.append(_case_fused("fused_fp32_2levels", value, shapes, ref, offsets, logits))
    # Fused, bf16 values and bf16 output (what MSDeformAttn runs in a bf16 model), per-batch refs.
    generator = torch.Generator().manual_seed(9)
    shapes = [(4, 7)]
    value = torch.randn(2, 28, 1, 100, generator=generator).bfloat16()
    ref = torch.rand(2, 5, 2, generator=generator)
    offsets = torch.randn(2, 5, 1, 1, 4, 2, generator=generator) * 3
    logits = torch.randn(2, 5, 1, 4, generator=generator)
    cases.append(_case_fused("fused_bf16_out_bf16", value, shapes, ref, offsets, logits, out_dtype=torch.bfloat16))
    # The module end to end: kernel="triton" (fused path) against kernel="pytorch", same weights.
    cases.append(_case_module("module_fp32", torch.float32))
    cases.append(_case_module("module_bf16", torch.bfloat16))
    report["cases"] = dict(cases)
    report["determinism_alert"] = _check_determinism_alert()
    print(json.dumps(report))


# ----------------------------------------------------------------------------------------------
# Tests (this process never imports triton)
# ----------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def report():
    started = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], capture_output=True, text=True,
                          env=child_env(TRITON_INTERPRET="1"), cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.time() - started
    print(json.dumps(result, indent=1))
    return result


def _assert_fp32(err: dict, what: str) -> None:
    assert err["rel"] <= FP32_REL, f"{what}: {err}"
    # Not less accurate than the fp32 reference itself (both against float64), up to fp32 noise.
    assert err["abs64"] <= 4 * err["ref_abs64"] + FP32_REL * err["max"], f"{what}: {err}"


@needs_triton
def test_cpu_default_path_never_imports_triton(report):
    check = report["no_triton_on_cpu"]
    assert check == {"triton_imported": False, "kernel_module_imported": False, "auto_on_cpu": "pytorch", "auto_on_meta": "pytorch"}


@needs_triton
@pytest.mark.parametrize("case", ["fp32_3levels_odd", "fp32_head100", "fp32_out_of_range", "fp32_shared_corners"])
def test_unfused_fp32_matches_pytorch(report, case):
    result = report["cases"][case]
    for key in ("out", "grad_value", "grad_locations", "grad_weights"):
        _assert_fp32(result[key], f"{case} {key}")
    assert result["dtypes"] == ["torch.float32"] * 4


@needs_triton
def test_bf16_values_accumulate_in_fp32(report):
    result = report["cases"]["bf16_values_head100"]
    # Same bf16 inputs widened to fp32 on both sides: the forward and the location/weight gradients
    # are fp32-exact; the value gradient is accumulated in fp32 and rounded once to bf16.
    for key in ("out", "grad_locations", "grad_weights"):
        _assert_fp32(result[key], key)
    assert result["grad_value"]["excess_rtne"] <= BF16_EXCESS, result["grad_value"]
    assert result["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.float32", "torch.float32"]


@needs_triton
def test_fused_softmax_and_locations_match_module_math(report):
    result = report["cases"]["fused_fp32_2levels"]
    for key in ("out", "grad_value", "grad_reference_points", "grad_offsets", "grad_logits"):
        _assert_fp32(result[key], key)


@needs_triton
def test_fused_bf16_output_is_one_rounding_of_fp32(report):
    result = report["cases"]["fused_bf16_out_bf16"]
    assert result["dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.float32", "torch.float32"]
    # The kernel stores its fp32 accumulator once as bf16. On a GPU that rounds to nearest even
    # (within 2^-8); Triton's interpreter truncates (within one ulp, 2^-7): the CPU check allows that.
    assert result["out"]["excess_ulp"] <= BF16_EXCESS, result["out"]
    for key in ("grad_reference_points", "grad_offsets", "grad_logits"):
        _assert_fp32(result[key], key)
    assert result["grad_value"]["excess_rtne"] <= BF16_EXCESS, result["grad_value"]


@needs_triton
@pytest.mark.parametrize("case, rel", [("module_fp32", FP32_REL), ("module_bf16", 2e-2)])
def test_module_triton_matches_pytorch_kernel(report, case, rel):
    result = report["cases"][case]
    errors = {k: v for k, v in result.items() if isinstance(v, dict)}
    assert len(errors) == 3 + 8  # out, grad query/feat, and every parameter's gradient
    for key, err in errors.items():
        assert err["rel"] <= rel, f"{case} {key}: {err}"


@needs_triton
def test_backward_raises_under_deterministic_algorithms(report):
    assert report["determinism_alert"] == {"raised": True}


@needs_triton
def test_benchmark_cpu_check_runs():
    """bench/deform_attn_kernel.py --cpu-check: the GPU benchmark's correctness part, interpreted."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "deform_attn_kernel.py"), "--cpu-check"],
                          capture_output=True, text=True, env=child_env(), cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU check (Triton interpreter) PASSED" in proc.stdout
    assert proc.stdout.count("[ok]") == 6


@needs_triton
def test_kernels_compile_for_sm90():
    """Ahead-of-time compilation for H100/H200 (sm_90) on this CPU: catches what the interpreter
    accepts but the compiler does not (it caught a reassigned constexpr in the corner loop)."""
    env = child_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "deform_attn_kernel.py"), "--compile-check"],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compile check for sm_90 PASSED" in proc.stdout
    assert proc.stdout.count("[ok]") == 6 and "spill 0 B" in proc.stdout


def test_auto_resolves_to_pytorch_off_cuda():
    from piip6b.models.deform_attn import MSDeformAttn, resolve_kernel

    assert resolve_kernel("auto", torch.empty(1)) == "pytorch"
    assert resolve_kernel("auto", torch.empty(1, device="meta")) == "pytorch"
    assert resolve_kernel("triton", torch.empty(1)) == "triton"
    assert MSDeformAttn(16, heads=2).kernel == "auto"
    with pytest.raises(ValueError, match="unknown kernel"):
        MSDeformAttn(16, heads=2, kernel="cuda")


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
