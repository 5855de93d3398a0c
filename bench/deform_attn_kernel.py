"""Deformable attention: the PyTorch path against the fused Triton kernel (issue 13, items 1 and 2).

GPU run (one CUDA GPU, about a minute plus Triton's first compilations):

    python3 bench/deform_attn_kernel.py [--repeats 50] [--out results.json] [--sweep]

1. correctness at the real PIIP-H6B shapes, batch 2: the Triton kernel (fused softmax + locations)
   against the PyTorch path (`ms_deform_attn_pytorch` with the module's own softmax/location math),
   fp32 and bf16 values: max abs / rel error of the output and of every gradient, and how far two
   backward runs' value gradients differ (fp32 atomics);
2. forward and forward+backward times, median of `--repeats` (≥ 20) after warm-up, CUDA events,
   for both directions of one H6B interaction unit:
   6B queries (32×32, value dim 1600 = 16 heads × 100) over the ViT-H grid (64×64), and
   ViT-H queries (64×64, value dim 640 = 16 heads × 40) over the 6B grid (32×32):
   - the sampling core: PyTorch path / Triton unfused / Triton fused;
   - the whole MSDeformAttn module (bf16 projections): kernel="pytorch" / "triton";
   - one whole InteractionBlock (both injectors, FFNs, norms; bf16), the issue's ≤ 2.5 ms goal;
3. the simple pyramid (item 2): nn.ConvTranspose2d against ConvTranspose2x2 (fpn1 = 2×ConvT with
   GN+GELU, fpn2 = 1×ConvT) at [2, 3200, 64, 64] bf16, NCHW and channels-last inputs, and the 3×3
   merge stack with Conv2d against ChannelsLastConv2d on the token-grid view the model feeds it.
`--sweep` first tries block sizes / warps for both kernels and uses the fastest.
Prints tables and writes JSON (default $OUT/deform_attn_kernel.json or ./deform_attn_kernel.json).

CPU check (no GPU; Triton's interpreter, tiny shapes with the real head dims 100 and 40):

    python3 bench/deform_attn_kernel.py --cpu-check

runs part 1 only and exits non-zero if an error exceeds its tolerance.

Compile check (no GPU needed: Triton's NVIDIA backend and its bundled ptxas):

    python3 bench/deform_attn_kernel.py --compile-check [--arch 90]

compiles the forward and backward kernels (fused/bf16 at the H6B head dims with the default launch
configurations, and an unfused fp32 two-level variant) down to a cubin and prints registers,
spills and the vector widths of the gathers and atomics — what the interpreter cannot check.
"""

from __future__ import annotations

import os
import sys

if "--cpu-check" in sys.argv:  # must precede any import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip6b.models.deform_attn import MSDeformAttn, grid_reference_points, ms_deform_attn_pytorch  # noqa: E402
from piip6b.models.interaction import InteractionBlock, InteractionSpec  # noqa: E402


@dataclass(frozen=True)
class Direction:
    label: str
    query_dim: int  # width of the query branch (= value_proj input with interaction_proj)
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    heads: int = 16
    points: int = 4
    value_ratio: float = 0.5

    @property
    def head_dim(self) -> int:
        return int(self.query_dim * self.value_ratio) // self.heads


def h6b_directions(img: int = 1024) -> list[Direction]:
    six_b, vit_h = (img // 2 // 16,) * 2, (img // 16,) * 2
    return [Direction(f"6B q {six_b[0]}x{six_b[1]} <- ViT-H keys {vit_h[0]}x{vit_h[1]}, D 100", 3200, six_b, vit_h),
            Direction(f"ViT-H q {vit_h[0]}x{vit_h[1]} <- 6B keys {six_b[0]}x{six_b[1]}, D 40", 1280, vit_h, six_b)]


def tiny_directions() -> list[Direction]:
    # The real head dims (100, 40) with 2 heads, small odd grids: a few interpreter programs each.
    return [Direction("tiny 6B-like: q 3x4 <- keys 5x6, D 100", 400, (3, 4), (5, 6), heads=2),
            Direction("tiny H-like: q 5x6 <- keys 3x4, D 40", 160, (5, 6), (3, 4), heads=2)]


# ------------------------------------------------------------------------------------------------
# inputs and the paths compared
# ------------------------------------------------------------------------------------------------
def make_inputs(d: Direction, batch: int, device, value_dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = d.query_grid[0] * d.query_grid[1]
    keys = d.key_grid[0] * d.key_grid[1]
    return {
        "value": torch.randn(batch, keys, d.heads, d.head_dim, generator=g).to(device, value_dtype),
        # Offsets of a few cells (Deformable-DETR init: 1..4 cells on a circle, then learnt).
        "offsets": (torch.randn(batch, q, d.heads, 1, d.points, 2, generator=g) * 3).to(device),
        "logits": torch.randn(batch, q, d.heads, d.points, generator=g).to(device),
        "ref": grid_reference_points(d.query_grid, device=device),
        "grad_out": torch.randn(batch, q, d.heads * d.head_dim, generator=g).to(device, value_dtype),
        "shapes": [d.key_grid],
    }


def pytorch_path(value, shapes, ref, offsets, logits, out_dtype):
    """MSDeformAttn's unfused math (deform_attn.py) around ms_deform_attn_pytorch."""
    batch, queries, heads, levels, points, _ = offsets.shape
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=offsets.device)
    locations = ref[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    return ms_deform_attn_pytorch(value.float(), shapes, locations, weights).to(out_dtype)


def triton_unfused(value, shapes, ref, offsets, logits, out_dtype):
    from piip6b.models.kernels.ms_deform_attn_triton import ms_deform_attn

    batch, queries, heads, levels, points, _ = offsets.shape
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=offsets.device)
    locations = ref[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    return ms_deform_attn(value, shapes, locations, weights, out_dtype=out_dtype)


def triton_fused(value, shapes, ref, offsets, logits, out_dtype):
    from piip6b.models.kernels.ms_deform_attn_triton import ms_deform_attn_fused

    return ms_deform_attn_fused(value, shapes, ref, offsets, logits, out_dtype)


PATHS = {"pytorch": pytorch_path, "triton_unfused": triton_unfused, "triton_fused": triton_fused}


def run_path(fn, inputs: dict, out_dtype, backward: bool = True):
    leaves = [inputs[k].detach().requires_grad_() for k in ("value", "offsets", "logits")]
    out = fn(leaves[0], inputs["shapes"], inputs["ref"], leaves[1], leaves[2], out_dtype)
    if not backward:
        return out, None
    grads = torch.autograd.grad(out, leaves, inputs["grad_out"].to(out.dtype))
    return out, grads


# ------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------
def errors(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    scale = b.abs().max().item() or 1.0
    abs_err = (a - b).abs().max().item()
    return {"max_abs": abs_err, "max_rel": abs_err / scale, "max_ref": scale}


def correctness(directions, batch: int, device) -> list[dict]:
    """Fused Triton kernel vs the PyTorch path. fp32 values: every tensor to fp32 tolerance.
    bf16 values and bf16 output (what the model runs): the kernel against the fp32 reference
    rounded once to bf16 — within one bf16 ulp; location/weight gradients fp32-tight."""
    rows = []
    for d in directions:
        for value_dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(d, batch, device, value_dtype, seed=1)
            # Same bf16-rounded grad_out for both; the reference computes in fp32 from the same values.
            out, grads = run_path(triton_fused, inputs, value_dtype)
            ref, ref_grads = run_path(pytorch_path, inputs, torch.float32)
            row = {"direction": d.label, "value_dtype": str(value_dtype).replace("torch.", ""),
                   "out": errors(out, ref)}
            for name, a, b in zip(("grad_value", "grad_offsets", "grad_logits"), grads, ref_grads):
                row[name] = errors(a, b)
            if device.type == "cuda":  # run-to-run spread of the atomically accumulated value gradient
                _, again = run_path(triton_fused, inputs, value_dtype)
                row["grad_value_rerun_max_abs_diff"] = (again[0].double() - grads[0].double()).abs().max().item()
            fp32_tol, bf16_tol = 1e-5, 2.0**-7  # relative to max |ref|
            limits = {"out": fp32_tol if value_dtype == torch.float32 else bf16_tol,
                      "grad_value": fp32_tol if value_dtype == torch.float32 else bf16_tol,
                      "grad_offsets": fp32_tol, "grad_logits": fp32_tol}
            row["ok"] = all(row[k]["max_rel"] <= limit for k, limit in limits.items())
            rows.append(row)
    return rows


def module_check(directions, batch: int, device, dtype) -> list[dict]:
    """MSDeformAttn kernel="triton" against kernel="pytorch" with the same weights (moved off init)."""
    rows = []
    for d in directions:
        torch.manual_seed(0)
        a = MSDeformAttn(d.query_dim, heads=d.heads, points=d.points, ratio=d.value_ratio, kernel="triton")
        with torch.no_grad():
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        b = MSDeformAttn(d.query_dim, heads=d.heads, points=d.points, ratio=d.value_ratio, kernel="pytorch")
        b.load_state_dict(a.state_dict())
        a, b = a.to(device, dtype), b.to(device, dtype)
        query = torch.randn(batch, d.query_grid[0] * d.query_grid[1], d.query_dim, device=device, dtype=dtype)
        feat = torch.randn(batch, d.key_grid[0] * d.key_grid[1], d.query_dim, device=device, dtype=dtype)
        ref = grid_reference_points(d.query_grid, device=device)
        outs = []
        for m in (a, b):
            out = m(query, ref, feat, [d.key_grid])
            out.float().square().mean().backward()
            outs.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
        row = {"direction": d.label, "dtype": str(dtype).replace("torch.", ""), "out": errors(outs[0][0], outs[1][0])}
        worst = max(((n, errors(outs[0][1][n], outs[1][1][n])) for n in outs[0][1]), key=lambda kv: kv[1]["max_rel"])
        row["worst_param_grad"] = {"name": worst[0], **worst[1]}
        limit = 1e-5 if dtype == torch.float32 else 3e-2
        row["ok"] = row["out"]["max_rel"] <= limit and worst[1]["max_rel"] <= limit
        rows.append(row)
    return rows


def print_correctness(rows, module_rows) -> None:
    print("\ncorrectness: Triton (fused) vs PyTorch path — max abs / max rel (rel = max abs / max |ref|)")
    for r in rows:
        cells = "  ".join(f"{k} {r[k]['max_abs']:.2e}/{r[k]['max_rel']:.1e}" for k in ("out", "grad_value", "grad_offsets", "grad_logits"))
        extra = f"  rerun dV {r['grad_value_rerun_max_abs_diff']:.1e}" if "grad_value_rerun_max_abs_diff" in r else ""
        print(f"  [{'ok' if r['ok'] else 'FAIL'}] {r['direction']:<45} value {r['value_dtype']:<8} {cells}{extra}")
    for r in module_rows:
        w = r["worst_param_grad"]
        print(f"  [{'ok' if r['ok'] else 'FAIL'}] module {r['direction']:<38} {r['dtype']:<8} out {r['out']['max_abs']:.2e}/"
              f"{r['out']['max_rel']:.1e}  worst param grad {w['name']} {w['max_abs']:.2e}/{w['max_rel']:.1e}")


# ------------------------------------------------------------------------------------------------
# 2./3. timings
# ------------------------------------------------------------------------------------------------
def time_cuda(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` runs after `warmup`, CUDA events per run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def time_core(directions, batch, device, warmup, repeats) -> list[dict]:
    rows = []
    for d in directions:
        inputs = make_inputs(d, batch, device, torch.bfloat16)
        for name, fn in PATHS.items():
            fwd = time_cuda(lambda: torch.no_grad()(run_path)(fn, inputs, torch.bfloat16, backward=False), warmup, repeats)
            fb = time_cuda(lambda: run_path(fn, inputs, torch.bfloat16), warmup, repeats)
            rows.append({"part": "sampling core", "direction": d.label, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": fb})
    return rows


def _set_kernel(module: nn.Module, kernel: str) -> None:
    for m in module.modules():
        if isinstance(m, MSDeformAttn):
            m.kernel = kernel


def time_modules(directions, batch, device, warmup, repeats) -> list[dict]:
    rows = []
    for d in directions:
        m = MSDeformAttn(d.query_dim, heads=d.heads, points=d.points, ratio=d.value_ratio).to(device, torch.bfloat16)
        query = torch.randn(batch, d.query_grid[0] * d.query_grid[1], d.query_dim, device=device, dtype=torch.bfloat16,
                            requires_grad=True)
        feat = torch.randn(batch, d.key_grid[0] * d.key_grid[1], d.query_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True)
        ref = grid_reference_points(d.query_grid, device=device)
        for kernel in ("pytorch", "triton"):
            _set_kernel(m, kernel)

            def step():
                m(query, ref, feat, [d.key_grid]).float().mean().backward()

            rows.append({"part": "MSDeformAttn module", "direction": d.label, "impl": kernel,
                         "fwd_bwd_ms": time_cuda(step, warmup, repeats)})
    return rows


def time_interaction_block(batch, device, warmup, repeats, img: int = 1024) -> list[dict]:
    dims = [3200, 1280]
    grids = [(img // 32, img // 32), (img // 16, img // 16)]
    block = InteractionBlock(dims, InteractionSpec()).to(device, torch.bfloat16).train()
    xs = [torch.randn(batch, h * w, c, device=device, dtype=torch.bfloat16, requires_grad=True) for (h, w), c in zip(grids, dims)]
    refs = [grid_reference_points(g, device=device) for g in grids]
    rows = []
    for kernel in ("pytorch", "triton"):
        _set_kernel(block, kernel)

        def step():
            outs = block(xs, grids, refs)
            sum(o.float().mean() for o in outs).backward()

        rows.append({"part": "InteractionBlock (H6B, both directions)", "direction": "6B 32x32 <-> ViT-H 64x64",
                     "impl": kernel, "fwd_bwd_ms": time_cuda(step, warmup, repeats)})
    return rows


def time_pyramid(batch, device, warmup, repeats, dim: int = 3200, grid: int = 64) -> list[dict]:
    from piip6b.models.layers import ChannelsLastConv2d, Conv2d, ConvTranspose2x2

    def convt(new: bool):
        return ConvTranspose2x2(dim, dim) if new else nn.ConvTranspose2d(dim, dim, 2, 2)

    def merge(new: bool, cin: int):
        conv = ChannelsLastConv2d if new else Conv2d
        return nn.Sequential(conv(cin, dim, 3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU(inplace=True),
                             conv(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(32, dim), nn.ReLU(inplace=True))

    rows = []
    for new in (False, True):
        impl = "ConvTranspose2x2 (GEMM + shuffle)" if new else "nn.ConvTranspose2d"
        parts = {"fpn1 (ConvT-GN-GELU-ConvT)": nn.Sequential(convt(new), nn.GroupNorm(32, dim), nn.GELU(), convt(new)),
                 "fpn2 (ConvT)": nn.Sequential(convt(new))}
        for label, module in parts.items():
            module = module.to(device, torch.bfloat16)
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(batch, dim, grid, grid, device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_()

                def step():
                    module(x).float().mean().backward()

                rows.append({"part": label, "direction": "NCHW in" if fmt == torch.contiguous_format else "channels-last in",
                             "impl": impl, "fwd_bwd_ms": time_cuda(step, warmup, repeats)})
            del module
    for new in (False, True):
        impl = "ChannelsLastConv2d" if new else "Conv2d"
        for label, cin, g in (("merge_branch1 (3200 @32x32)", 3200, 32), ("merge_branch2 (1280 @64x64)", 1280, 64)):
            module = merge(new, cin).to(device, torch.bfloat16)
            tokens = torch.randn(batch, g * g, cin, device=device, dtype=torch.bfloat16, requires_grad=True)

            def step():  # the model's input: the token tensor viewed as a map (NHWC strides)
                module(tokens.transpose(1, 2).reshape(batch, cin, g, g)).float().mean().backward()

            rows.append({"part": label, "direction": "token-grid view", "impl": impl, "fwd_bwd_ms": time_cuda(step, warmup, repeats)})
            del module
    return rows


def sweep(directions, batch, device, warmup, repeats) -> dict:
    """Fastest (block_q, num_warps) per kernel and head dim; installed as CONFIG_OVERRIDES."""
    from piip6b.models.kernels import ms_deform_attn_triton as k

    chosen = {}
    for d in directions:
        inputs = make_inputs(d, batch, device, torch.bfloat16)
        for kind in ("fwd", "bwd"):
            best = None
            for block_q in (8, 16, 32, 64):
                for warps in (2, 4, 8):
                    k.CONFIG_OVERRIDES[(kind, d.head_dim, d.points)] = k.LaunchConfig(block_q, warps)
                    try:
                        if kind == "fwd":
                            ms = time_cuda(lambda: torch.no_grad()(run_path)(triton_fused, inputs, torch.bfloat16, backward=False), warmup, repeats)
                        else:
                            ms = time_cuda(lambda: run_path(triton_fused, inputs, torch.bfloat16), warmup, repeats)
                    except Exception as error:  # e.g. out of resources
                        print(f"  sweep {kind} D={d.head_dim} block_q={block_q} warps={warps}: {type(error).__name__}")
                        continue
                    print(f"  sweep {kind} D={d.head_dim} block_q={block_q:>2} warps={warps}: {ms:.4f} ms")
                    if best is None or ms < best[0]:
                        best = (ms, block_q, warps)
            k.CONFIG_OVERRIDES[(kind, d.head_dim, d.points)] = k.LaunchConfig(best[1], best[2])
            default = k.default_config(d.head_dim, d.points, kind == "bwd")
            chosen[f"{kind} D={d.head_dim}"] = {"block_q": best[1], "num_warps": best[2], "ms": best[0],
                                                "default": [default.block_q, default.num_warps]}
    return chosen


def compile_check(arch: int) -> list[dict]:
    """Ahead-of-time compilation of both kernels for `sm_<arch>` (no GPU)."""
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from piip6b.models.kernels import ms_deform_attn_triton as k

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    variants = []
    for head_dim in (100, 40):  # the model: fused, bf16 values and output, 1 level, 4 points, 16 heads
        variants.append(("fwd", True, head_dim, 1, 4, "*bf16", "*bf16", True))
        variants.append(("bwd", True, head_dim, 1, 4, "*bf16", "*bf16", True))
    variants.append(("fwd", False, 5, 2, 2, "*fp32", "*fp32", True))  # unfused, two levels
    variants.append(("bwd", False, 5, 2, 2, "*fp32", "*fp32", False))  # ... without a value gradient
    rows = []
    for kind, fused, head_dim, levels, points, value_t, out_t, value_grad in variants:
        fn = k._ms_deform_attn_fwd if kind == "fwd" else k._ms_deform_attn_bwd
        config = k.default_config(head_dim, levels * points, kind == "bwd")
        pointers = {"value_ptr": value_t, "loc_ptr": "*fp32", "attn_ptr": "*fp32", "ref_ptr": "*fp32"}
        if kind == "fwd":
            pointers["out_ptr"] = out_t
        else:
            pointers.update(grad_out_ptr=out_t, grad_value_ptr="*fp32", grad_loc_ptr="*fp32", grad_attn_ptr="*fp32")
        constants = dict(HEADS=16, HEAD_DIM=head_dim, LEVELS=levels, POINTS=points,
                         LP_PAD=triton.next_power_of_2(levels * points), FUSED=fused, BLOCK_Q=config.block_q,
                         BLOCK_D=triton.next_power_of_2(head_dim))
        if kind == "bwd":
            constants["VALUE_GRAD"] = value_grad
        names = list(fn.arg_names)
        signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                           attrs={(names.index(n),): [["tt.divisibility", 16]] for n in pointers})
        label = f"{kind} {'fused' if fused else 'unfused'} D={head_dim} L={levels} P={points} {value_t[1:]} block_q={config.block_q}"
        started = time.time()
        row = {"kernel": label}
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})
        except Exception as error:  # a compile error is the finding
            row.update(ok=False, error=f"{type(error).__name__}: {error}")
            rows.append(row)
            continue
        ptx = compiled.asm["ptx"]
        row.update(ok=True, seconds=time.time() - started,
                   loads=sorted(set(re.findall(r"ld\.global[a-z0-9.]*", ptx))),
                   atomics=sorted(set(re.findall(r"(?:atom|red)\.global[a-z0-9.]*", ptx))))
        if ptxas.exists():
            ptx_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"msda_check_{os.getpid()}.ptx"
            ptx_file.write_text(ptx)
            arch_name = re.search(r"\.target\s+(\S+)", ptx).group(1)
            info = subprocess.run([str(ptxas), f"-arch={arch_name}", "-v", str(ptx_file), "-o", os.devnull],
                                  capture_output=True, text=True).stderr
            ptx_file.unlink()
            found = re.search(r"Used (\d+) registers", info)
            spills = re.search(r"(\d+) bytes spill stores", info)
            row.update(registers=int(found.group(1)) if found else None, spill_bytes=int(spills.group(1)) if spills else None)
        rows.append(row)
    return rows


def print_timings(rows) -> None:
    print(f"\n{'part':<42}{'case':<48}{'impl':<36}{'fwd ms':>9}{'f+b ms':>9}")
    for r in rows:
        fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else "-"
        print(f"{r['part']:<42}{r['direction']:<48}{r['impl']:<36}{fwd:>9}{r['fwd_bwd_ms']:>9.3f}")


# ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-check", action="store_true", help="correctness only, tiny shapes, Triton interpreter on CPU")
    parser.add_argument("--compile-check", action="store_true", help="compile the kernels for --arch (no GPU) and report")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-check (90 = H100/H200)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img", type=int, default=1024, help="input side (the ViT-H branch's); the 6B branch gets half")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="tune block_q / num_warps first")
    parser.add_argument("--no-pyramid", action="store_true", help="skip part 3 (ConvT pyramid and merges)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "deform_attn_kernel.json"))
    args = parser.parse_args()
    started = time.time()

    if args.compile_check:
        rows = compile_check(args.arch)
        for r in rows:
            if r["ok"]:
                print(f"  [ok] {r['kernel']:<58} regs {r.get('registers')} spill {r.get('spill_bytes')} B  "
                      f"loads {','.join(r['loads'])}  atomics {','.join(r['atomics']) or '-'}  ({r['seconds']:.1f} s)")
            else:
                print(f"  [FAIL] {r['kernel']}: {r['error']}")
        ok = all(r["ok"] for r in rows)
        print(f"\ncompile check for sm_{args.arch} {'PASSED' if ok else 'FAILED'} in {time.time() - started:.1f} s")
        return 0 if ok else 1

    if args.cpu_check:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        rows = correctness(tiny_directions(), 1, device)
        module_rows = module_check(tiny_directions(), 1, device, torch.float32)
        print_correctness(rows, module_rows)
        ok = all(r["ok"] for r in rows + module_rows)
        print(f"\nCPU check (Triton interpreter) {'PASSED' if ok else 'FAILED'} in {time.time() - started:.1f} s")
        return 0 if ok else 1

    if not torch.cuda.is_available():
        print("bench/deform_attn_kernel.py needs a CUDA GPU (or --cpu-check)", file=sys.stderr)
        return 2
    if args.repeats < 20:
        parser.error("--repeats must be at least 20")
    device = torch.device("cuda")
    import triton

    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    directions = h6b_directions(args.img)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "batch": args.batch, "img": args.img, "repeats": args.repeats, "warmup": args.warmup}

    rows = correctness(directions, args.batch, device)
    module_rows = module_check(directions, args.batch, device, torch.float32) + \
        module_check(directions, args.batch, device, torch.bfloat16)
    print_correctness(rows, module_rows)
    report["correctness"], report["module_check"] = rows, module_rows

    if args.sweep:
        report["sweep"] = sweep(directions, args.batch, device, 3, 20)
        print(f"sweep: {json.dumps(report['sweep'])}")

    timings = time_core(directions, args.batch, device, args.warmup, args.repeats)
    timings += time_modules(directions, args.batch, device, args.warmup, args.repeats)
    timings += time_interaction_block(args.batch, device, args.warmup, args.repeats, args.img)
    if not args.no_pyramid:
        timings += time_pyramid(args.batch, device, args.warmup, args.repeats)
    report["timings"] = timings
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report["wall_s"] = time.time() - started
    print_timings(timings)
    block = {r["impl"]: r["fwd_bwd_ms"] for r in timings if r["part"].startswith("InteractionBlock")}
    print(f"\nInteractionBlock f+b: pytorch {block['pytorch']:.3f} ms, triton {block['triton']:.3f} ms (goal <= 2.5 ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}; all correctness checks {'ok' if all(r['ok'] for r in rows + module_rows) else 'NOT ok'}")
    return 0 if all(r["ok"] for r in rows + module_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
