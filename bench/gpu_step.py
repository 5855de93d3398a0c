"""One-GPU step benchmark: does the parameter-inverted pyramid save wall-clock, not only FLOPs?

Depth-reduced models with the real widths (a quarter of each: 12 of InternViT-6B's 48 blocks, 8 of
ViT-H's 32, 3 of the 12 interactions), bf16 parameters and activations, batch 2. Forward+backward
time with CUDA events after warm-up, achieved TFLOP/s (model FLOPs = 3 × forward MACs × 2, from
the project's counter; recomputation under checkpointing not counted) and MFU against the device's
dense bf16 peak, peak memory. Also: the measured bf16 matmul ceiling, attention backends, and the
deformable interactions' share of the PIIP step. Prints a table last and writes JSON.

    python bench/gpu_step.py [--out results.json] [--iters 10]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip6b.models.attention import attention, flash_attn_available, math_attention  # noqa: E402
from piip6b.models.counting import count_flops_for_spec  # noqa: E402
from piip6b.models.deform_attn import grid_reference_points  # noqa: E402
from piip6b.models.piip import PIIPSpec  # noqa: E402
from piip6b.models.presets import INTERNVIT_6B, VIT_H, build_from_spec, piip_h6b_speedup  # noqa: E402

# Dense bf16 peak (TFLOP/s, no sparsity) by device name substring; the first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0)]

SIX_B = dataclasses.replace(INTERNVIT_6B, depth=12, drop_path_rate=0.0)
VIT_H_QUARTER = dataclasses.replace(VIT_H, depth=8, drop_path_rate=0.0)
GROUPS_6B = ((0, 3), (4, 7), (8, 11))
GROUPS_H = ((0, 1), (2, 4), (5, 7))  # same uneven 2/3 pattern as the full model


def baseline_spec() -> PIIPSpec:
    return PIIPSpec(branches=(SIX_B,), img_sizes=(1024,))


def h6b_spec(speedup: bool = False) -> PIIPSpec:
    interaction = piip_h6b_speedup().interaction if speedup else PIIPSpec((SIX_B,), (1,)).interaction
    interaction = dataclasses.replace(interaction, drop_path_rate=0.0)
    return PIIPSpec(branches=(SIX_B, VIT_H_QUARTER), img_sizes=(512, 1024), groups=(GROUPS_6B, GROUPS_H),
                    interaction=interaction)


def device_peak() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return name, peak
    return name, None


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call, CUDA events around `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def matmul_ceiling(iters: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, 3, iters)
    return 2 * 8192**3 / (ms / 1e3) / 1e12


@contextlib.contextmanager
def sdpa_only(backend):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        yield


def step_benchmark(label: str, spec: PIIPSpec, attn: str, ckpt: int, iters: int, batch: int = 2,
                   sdpa_backend=None) -> dict:
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_from_spec(spec, attn_backend=attn).to(torch.bfloat16).train()
    if ckpt:
        model.set_grad_checkpointing(every=ckpt, interactions=True)
    size = spec.img_sizes[-1]
    images = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)

    def step():
        features = model(images)
        sum(f.float().mean() for f in features).backward()
        model.zero_grad(set_to_none=True)

    context = sdpa_only(sdpa_backend) if sdpa_backend is not None else contextlib.nullcontext()
    torch.cuda.reset_peak_memory_stats()
    with context:
        ms = time_cuda(step, warmup=3, iters=iters)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    macs = count_flops_for_spec(spec, size).gflops_full * 1e9 * batch
    tflops = 3 * 2 * macs / (ms / 1e3) / 1e12
    return {"label": label, "ms": ms, "tflops": tflops, "peak_gib": peak_gib, "fwd_gmacs_per_image": macs / batch / 1e9}


def interaction_share(iters: int, batch: int = 2) -> dict:
    """Forward+backward of the 3 interaction blocks alone, at the PIIP-H6B 1024/512 token shapes."""
    torch.manual_seed(0)
    spec = h6b_spec()
    with torch.device("cuda"):
        model = build_from_spec(spec).to(torch.bfloat16).train()
    grids = [(32, 32), (64, 64)]
    xs = [torch.randn(batch, 32 * 32, 3200, device="cuda", dtype=torch.bfloat16, requires_grad=True),
          torch.randn(batch, 64 * 64, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
    refs = [grid_reference_points(g, torch.device("cuda")) for g in grids]
    with torch.no_grad():  # open the gates so the interaction's output depends on every path
        for name, p in model.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(0.1)

    def step():
        outs = xs
        for block in model.interactions:
            outs = block(outs, grids, refs)
        sum(o.float().mean() for o in outs).backward()
        model.zero_grad(set_to_none=True)

    ms = time_cuda(step, warmup=3, iters=iters)
    return {"label": "H6B interactions only (3 blocks)", "ms": ms}


def _module_tflops(module: torch.nn.Module, shape: tuple[int, ...], grid: tuple[int, int] | None) -> float:
    """Forward MACs of `module` on one input of `shape`, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    import copy

    meta = copy.deepcopy(module).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        x = torch.empty(shape, device="meta")
        meta(x, grid) if grid is not None else meta(x)
    return counter.get_total_flops() / 2


def part_breakdown(iters: int, batch: int = 2, channels_last: bool = False) -> list[dict]:
    """Forward+backward time of each kind of part at its real shape, and the full-depth step time
    projected from them (48 6B blocks, 32 ViT-H blocks, 12 interactions, merges, pyramid)."""
    spec = h6b_spec()
    with torch.device("cuda"):
        model = build_from_spec(spec).to(torch.bfloat16).train()
        baseline = build_from_spec(baseline_spec()).to(torch.bfloat16).train()
    if channels_last:
        for m in (model, baseline):
            m.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    parts = [
        ("6B block, 1024 tokens (H6B branch 1)", model.branch1.blocks[1], (batch, 1024, 3200), (32, 32), 48, "h6b"),
        ("ViT-H block, 4096 tokens (H6B branch 2)", model.branch2.blocks[1], (batch, 4096, 1280), (64, 64), 32, "h6b"),
        ("merge_branch1 (3200->3200 @32x32)", model.merge_branch1, (batch, 3200, 32, 32), None, 1, "h6b"),
        ("merge_branch2 (1280->3200 @64x64)", model.merge_branch2, (batch, 1280, 64, 64), None, 1, "h6b"),
        ("pyramid fpn1 (2x ConvT @64x64)", model.fpn1, (batch, 3200, 64, 64), None, 1, "both"),
        ("pyramid fpn2 (ConvT @64x64)", model.fpn2, (batch, 3200, 64, 64), None, 1, "both"),
        ("6B block, 4096 tokens (baseline)", baseline.blocks[1], (batch, 4096, 3200), (64, 64), 48, "baseline"),
    ]
    rows = []
    for label, module, shape, grid, count, used_by in parts:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        if x.ndim == 4:
            x = x.detach().contiguous(memory_format=fmt).requires_grad_()

        def step():
            out = module(x, grid) if grid is not None else module(x)
            out.float().mean().backward()

        ms = time_cuda(step, warmup=3, iters=iters)
        macs = _module_tflops(module, shape, grid)
        rows.append({"label": label, "ms": ms, "count_full_depth": count, "used_by": used_by,
                     "tflops": 3 * 2 * macs / (ms / 1e3) / 1e12})
    share = interaction_share(iters, batch)
    rows.append({"label": "interaction block (units 1-2)", "ms": share["ms"] / 3, "count_full_depth": 12,
                 "used_by": "h6b", "tflops": None})
    del model, baseline
    return rows


def project_full_depth(rows: list[dict]) -> dict:
    total = {"h6b": 0.0, "baseline": 0.0}
    for row in rows:
        for model in ("h6b", "baseline"):
            if row["used_by"] in (model, "both"):
                total[model] += row["ms"] * row["count_full_depth"]
    return {"h6b_ms": total["h6b"], "baseline_ms": total["baseline"], "ratio": total["h6b"] / total["baseline"]}


def attention_check() -> dict:
    """Backends against fp32 math on the GPU at 6B head shapes (bf16 inputs)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 25, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = math_attention(q.float(), k.float(), v.float())
    result = {}
    for backend in ("sdpa", "math") + (("flash",) if flash_attn_available() else ()):
        out = attention(q, k, v, backend).float()
        result[backend] = {"max_abs_err_vs_fp32_math": (out - reference).abs().max().item()}
    result["flash_attn_installed"] = flash_attn_available()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_step.json"))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--parts", action="store_true",
                        help="only the per-part breakdown and the full-depth projection (NCHW and channels-last)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    name, peak = device_peak()
    ceiling = matmul_ceiling(args.iters)
    print(f"device: {name}; table peak bf16: {peak} TFLOP/s; measured 8192^3 bf16 matmul: {ceiling:.0f} TFLOP/s", flush=True)
    if args.parts:
        report = {}
        for channels_last in (False, True):
            rows = part_breakdown(args.iters, channels_last=channels_last)
            key = "channels_last" if channels_last else "nchw"
            report[key] = {"parts": rows, "projection": project_full_depth(rows)}
            print(f"\n[{key}] {'part':<44}{'ms f+b':>9}{'TFLOP/s':>9}{'x full':>7}")
            for r in rows:
                tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
                print(f"[{key}] {r['label']:<44}{r['ms']:>9.2f}{tf:>9}{r['count_full_depth']:>7}")
            p = report[key]["projection"]
            print(f"[{key}] projected full depth, batch 2: H6B {p['h6b_ms']:.0f} ms, baseline {p['baseline_ms']:.0f} ms, ratio {p['ratio']:.3f}")
        report.update(device=name, matmul_ceiling_tflops=ceiling, torch=torch.__version__, wall_s=time.time() - started)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return 0
    check = attention_check()
    print(f"attention check: {check}", flush=True)
    from torch.nn.attention import SDPBackend

    runs = [
        ("6B baseline @1024", baseline_spec(), "sdpa", 0, None),
        ("6B baseline @1024, ckpt", baseline_spec(), "sdpa", 1, None),
        ("H6B 1024/512", h6b_spec(), "sdpa", 0, None),
        ("H6B 1024/512, ckpt", h6b_spec(), "sdpa", 1, None),
        ("H6B speedup 1024/512", h6b_spec(speedup=True), "sdpa", 0, None),
        ("H6B 1024/512, SDPA flash kernel", h6b_spec(), "sdpa", 0, SDPBackend.FLASH_ATTENTION),
        ("H6B 1024/512, SDPA mem-efficient kernel", h6b_spec(), "sdpa", 0, SDPBackend.EFFICIENT_ATTENTION),
        ("H6B 1024/512, math attention", h6b_spec(), "math", 0, None),
    ]
    if flash_attn_available():
        runs.append(("H6B 1024/512, flash-attn package", h6b_spec(), "flash", 0, None))
    results = []
    for label, spec, attn, ckpt, sdpa_backend in runs:
        try:
            row = step_benchmark(label, spec, attn, ckpt, args.iters, sdpa_backend=sdpa_backend)
        except Exception as error:  # one failed configuration must not lose the others' figures
            row = {"label": label, "error": f"{type(error).__name__}: {error}"}
        row["mfu"] = row["tflops"] / peak if peak and "tflops" in row else None
        results.append(row)
        print(row, flush=True)
    share = interaction_share(args.iters)
    h6b = next(r for r in results if r["label"] == "H6B 1024/512")
    share["share_of_h6b_step"] = share["ms"] / h6b["ms"] if "ms" in h6b else None
    baseline = next(r for r in results if r["label"] == "6B baseline @1024")
    summary = {
        "device": name, "peak_bf16_tflops": peak, "matmul_ceiling_tflops": ceiling,
        "attention_check": check, "runs": results, "interactions": share,
        "h6b_over_baseline_step_time": h6b.get("ms", float("nan")) / baseline.get("ms", float("nan")),
        "torch": torch.__version__, "wall_s": time.time() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"\n{'configuration':<44}{'ms/step':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['label']:<44} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['label']:<44}{r['ms']:>10.1f}{r['tflops']:>10.1f}{mfu:>8}{r['peak_gib']:>10.1f}")
    print(f"{share['label']:<44}{share['ms']:>10.1f}  ({100 * (share['share_of_h6b_step'] or 0):.1f}% of the H6B step)")
    print(f"H6B / baseline step time: {summary['h6b_over_baseline_step_time']:.3f} (goal <= 0.45); "
          f"matmul ceiling {ceiling:.0f} TFLOP/s; wall {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
