"""One-GPU benchmark of the trainer's own step at full depth: PIIP-H6B against InternViT-6B@1024.

Each configuration (model x images per GPU) runs in a fresh process that builds the model, the
Mask R-CNN head and the DeepSpeed engine through `build_engine` from the recipe's config
(configs/detection/..., ZeRO-3, bf16, activation checkpointing, the `performance:` settings) and
times the trainer's step (`piip6b.engine.step.train_step`) on random tensors at the recipe's
training size (1024 x 1024, 8 boxes with masks per image). Per configuration, as medians of
`--repeats` steps after `--warmup` steps (gradients are zeroed by every optimizer step):
- backbone forward and backward (CUDA events from hooks on the backbone: its first to its last
  forward op; from the moment all four output maps have their gradient to the end of the
  backward, i.e. the backbone's backward and ZeRO's gradient epilogue), the backbone's model
  FLOP/s (3 x forward FLOPs, recomputation not counted) and MFU;
- the whole training step (heads, losses, backward, ZeRO bookkeeping, AdamW), images/s;
- peak allocated memory, set against `piip6b.plan`'s estimate for the backbone;
- the attention backend and deformable-attention kernel that actually ran (calls counted).
`--parts` (also part of the full run, in its own process) times each kind of part alone at its
real shape, batch 2, the same way, and projects the full-depth backbone from them; it includes one
interaction block (the goal: <= 2.5 ms forward + backward). `--compile` adds the H6B, 2 images,
with `performance.compile=blocks` (graphs, graph breaks, recompiles, compile time).

The run keeps to `--budget-s` (default 540 s): a configuration that would not finish in time is
skipped and reported. GPU clocks (nvidia-smi) and library versions are recorded; JSON goes to
$OUT/gpu_step.json.

    python3 bench/gpu_step.py [--batches 1 2 4] [--repeats 5] [--warmup 3] [--compile] [--budget-s 540]
    python3 bench/gpu_step.py --parts
    python3 bench/gpu_step.py --cpu-dry-run     # the same code on the CPU with the tiny presets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Model -> (full recipe, its tiny CPU twin). Both are timed at the H6B recipe's input side.
RECIPES = {
    "h6b": ("configs/detection/piip_h6b_maskrcnn_1x_coco.yaml", "configs/tiny/piip_h6b_maskrcnn_1x_coco_tiny.yaml"),
    "baseline": ("configs/detection/internvit6b_maskrcnn_1x_coco.yaml",
                 "configs/tiny/internvit6b_maskrcnn_1x_coco_tiny.yaml"),
}
OBJECTS_PER_IMAGE = 8  # COCO's mean is 7.3 instances per image
# The dry run's heads are narrowed like the CPU demo's (configs/tiny/shapes_demo.yaml), so a step
# takes seconds on a CPU; the full run uses the recipe's heads as they are.
DRY_RUN_OVERRIDES = ["detection.fpn_channels=64", "detection.rpn_pre_nms_top_n_train=500",
                     "detection.rpn_post_nms_top_n_train=200", "detection.rois_per_image=64",
                     "detection.box_head_dim=128", "detection.mask_channels=32"]


# ----------------------------------------------------------------------------------- timing
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class BackboneProbe:
    """Marks where the backbone's forward starts and ends, and where its backward starts (all four
    output maps have their gradient); hooks on the backbone module, so the step is the trainer's."""

    def __init__(self, backbone: torch.nn.Module, clock: Clock):
        self.clock = clock
        self.marks: dict[str, Any] = {}
        self._waiting = 0
        backbone.register_forward_pre_hook(self._forward_start)
        backbone.register_forward_hook(self._forward_end)

    def _forward_start(self, module: torch.nn.Module, args: tuple) -> None:
        self.marks = {"forward_start": self.clock.mark()}

    def _forward_end(self, module: torch.nn.Module, args: tuple, outputs: Any) -> None:
        self.marks["forward_end"] = self.clock.mark()
        pending = [o for o in outputs if torch.is_tensor(o) and o.requires_grad]
        self._waiting = len(pending)
        for output in pending:
            output.register_hook(self._gradient_ready)

    def _gradient_ready(self, grad: torch.Tensor) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            self.marks["backward_start"] = self.clock.mark()


def count_deform_kernel_calls() -> dict[str, int]:
    """Count calls per deformable-attention kernel (wrapping the registries the model looks up)."""
    from piip6b.models import deform_attn

    calls: dict[str, int] = {}
    for registry, suffix in ((deform_attn.DEFORM_ATTN_KERNELS, ""), (deform_attn.FUSED_DEFORM_ATTN_KERNELS, " (fused)")):
        for name, kernel in list(registry.items()):
            def counted(*args, _kernel=kernel, _key=name + suffix, **kwargs):
                calls[_key] = calls.get(_key, 0) + 1
                return _kernel(*args, **kwargs)
            registry[name] = counted
    return calls


def attention_backend_used(cfg: Any, device: torch.device) -> str:
    from piip6b.models.attention import resolve_backend

    probe = torch.empty(1, 1, 1, 8, device=device, dtype=torch.bfloat16)
    return resolve_backend(cfg.model.attn_backend, probe)


# ------------------------------------------------------------------------------ the step jobs
def random_detection_batch(images: int, size: int, num_classes: int, generator: torch.Generator) -> dict:
    """Normalised-looking images at the training size and OBJECTS_PER_IMAGE boxes with filled masks."""
    targets = []
    for _ in range(images):
        corners = torch.randint(0, size - 64, (OBJECTS_PER_IMAGE, 2), generator=generator)
        extents = torch.randint(32, 64 + size // 4, (OBJECTS_PER_IMAGE, 2), generator=generator)
        boxes = torch.cat([corners, (corners + extents).clamp(max=size)], 1).float()
        masks = torch.zeros(OBJECTS_PER_IMAGE, size, size, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes + 1, (OBJECTS_PER_IMAGE,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return {"images": torch.randn(images, 3, size, size, generator=generator),
            "image_sizes": torch.tensor([[size, size]] * images), "targets": targets}


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                       "cuda": torch.version.cuda,
                                       "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else None}
    for module in ("deepspeed", "triton", "flash_attn", "torchvision"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - not installed, or fails to import: recorded as absent
            versions[module] = None
    return versions


def gpu_state() -> dict[str, str] | None:
    """Clocks, power and temperature from nvidia-smi (None without it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    fields = ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,"
              "temperature.gpu,memory.used,memory.total")
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    return dict(zip(fields.split(","), (v.strip() for v in out.stdout.splitlines()[0].split(",")))) if out.stdout else None


def run_step_job(job: dict) -> dict:
    """One configuration in this (fresh) process: build through `build_engine`, time `train_step`."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    from piip6b.config import load_config
    from piip6b.engine import distributed
    from piip6b.engine.build import build_engine
    from piip6b.engine.metrics import ThroughputWindow, device_peak_flops
    from piip6b.engine.step import train_step
    from piip6b.models.counting import count_flops
    from piip6b.tasks import build_task

    started = time.perf_counter()
    recipe = RECIPES[job["model"]][1 if job["dry_run"] else 0]
    with tempfile.TemporaryDirectory(prefix="gpu_step_") as run_dir:
        # One forward of `batch` images per step: the layout pinned, not derived from the recipe's global batch.
        cfg = load_config(REPO / recipe, [f"data.batch_size={job['batch']}", "data.global_batch=null",
                                          "engine.grad_accum_steps=1", f"run_dir={run_dir}", "model.pretrained=null",
                                          f"performance.compile={job['compile']}", *job["overrides"]])
        env = distributed.init_distributed()
        clock = Clock(env.device)
        kernel_calls = count_deform_kernel_calls()
        if job["compile"] != "none":
            from torch._dynamo.utils import counters

            counters.clear()
        built = build_engine(cfg, build_task(cfg), env)
        build_s = time.perf_counter() - started
        engine, size = built.engine, job["input"]
        generator = torch.Generator().manual_seed(0)
        batch = random_detection_batch(job["batch"], size, cfg.detection.num_classes, generator)
        from piip6b.devices import to_device

        batch = to_device(batch, env.device)
        probe = BackboneProbe(built.backbone, clock)
        marks: dict[str, Any] = {}
        optimizer_step = engine.step

        def marked_step(*args, **kwargs):  # the end of the backward, the start of the optimizer step
            marks["backward_end"] = clock.mark()
            return optimizer_step(*args, **kwargs)

        engine.step = marked_step
        window = ThroughputWindow(env.world_size, 0.0, 1.0, env.device)
        rows, first_step_s = [], None
        for index in range(job["warmup"] + job["repeats"]):
            if index == job["warmup"]:
                kernel_calls.clear()  # count the timed steps only
            if clock.cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            start = clock.mark()
            result = train_step(engine, iter([batch]), built.batch, env.device, window)
            end = clock.mark()
            clock.sync()
            if index == 0:
                first_step_s = time.perf_counter() - t0
            if index < job["warmup"]:
                continue
            p = probe.marks
            rows.append({"step_ms": clock.ms(start, end),
                         "backbone_forward_ms": clock.ms(p["forward_start"], p["forward_end"]),
                         "backbone_backward_ms": clock.ms(p["backward_start"], marks["backward_end"]),
                         "optimizer_ms": clock.ms(marks["backward_end"], end),
                         "peak_bytes": torch.cuda.max_memory_allocated() if clock.cuda else None,
                         "loss": float(result.losses["loss"])})
        calls_per_step = {k: v / job["repeats"] for k, v in kernel_calls.items()}
        median = {key: statistics.median(r[key] for r in rows)
                  for key in ("step_ms", "backbone_forward_ms", "backbone_backward_ms", "optimizer_ms")}
        median["backbone_ms"] = median["backbone_forward_ms"] + median["backbone_backward_ms"]
        flops = 3 * 2e9 * count_flops(cfg.model.preset, size, cfg.model.img_sizes).gflops_full * job["batch"]
        peak = device_peak_flops(env.device)
        report = {
            **job, "preset": cfg.model.preset, "img_sizes": cfg.model.img_sizes, "device": str(env.device),
            "zero_stage": cfg.engine.zero_stage, "grad_checkpointing": cfg.model.grad_checkpointing,
            "checkpoint_interactions": cfg.model.checkpoint_interactions,
            "performance": dataclasses.asdict(cfg.performance),
            "attention_backend": attention_backend_used(cfg, env.device),
            "deform_kernel_calls_per_step": calls_per_step,
            "build_s": build_s, "first_step_s": first_step_s, "timed_steps": rows, "median": median,
            "backbone_model_flops_per_step": flops,
            "backbone_tflops": flops / (median["backbone_ms"] / 1e3) / 1e12,
            "backbone_mfu": flops / (median["backbone_ms"] / 1e3) / peak,
            "images_per_s": job["batch"] / (median["step_ms"] / 1e3),
            "peak_allocated_bytes": max(r["peak_bytes"] for r in rows) if clock.cuda else None,
            "peak_flops": peak, "versions": _library_versions(),
            "gpu_name": torch.cuda.get_device_name() if clock.cuda else platform.processor() or "cpu",
            "gpu_after": gpu_state() if clock.cuda else None,
        }
        if job["compile"] != "none":
            from torch._dynamo.utils import counters

            report["dynamo"] = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                                "graph_breaks": dict(counters["graph_break"]),
                                "recompiles": dict(counters.get("recompiles", {}))}
        distributed.teardown(engine)
    return report


# ----------------------------------------------------------------------------------- the parts
def _median_ms(clock: Clock, fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.ms(start, end))
    return statistics.median(times)


def _forward_macs(module: torch.nn.Module, inputs: tuple) -> float:
    """Forward MACs of `module` on `inputs`' shapes, counted on the meta device."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from torch.utils._pytree import tree_map

    meta = copy.deepcopy(module).to("meta")
    meta_inputs = tree_map(lambda x: torch.empty_like(x, device="meta") if torch.is_tensor(x) else x, inputs)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(*meta_inputs)
    return counter.get_total_flops() / 2


def _depth_reduced(spec: Any) -> Any:
    """The spec with one interaction group (its first blocks): every kind of part at its real width."""
    from piip6b.models import PIIPSpec

    if len(spec.branches) == 1:
        return dataclasses.replace(spec, branches=(dataclasses.replace(spec.branches[0], depth=2, drop_path_rate=0.0),))
    branches = tuple(dataclasses.replace(b, depth=2, drop_path_rate=0.0) for b in spec.branches)
    groups = tuple(((0, 1),) for _ in branches)
    interaction = dataclasses.replace(spec.interaction, drop_path_rate=0.0)
    return PIIPSpec(branches, spec.img_sizes, groups, interaction, spec.pos_embed_at_input)


def run_parts_job(job: dict) -> dict:
    """Each kind of part alone at its real shape (forward + backward, gradients zeroed between
    repeats), and the full-depth backbone step projected from them."""
    from piip6b.devices import PerformanceSettings, configure_performance
    from piip6b.models import build_from_spec, get_spec
    from piip6b.models.deform_attn import grid_reference_points

    device = torch.device("cpu" if job["dry_run"] else "cuda")
    configure_performance(device, PerformanceSettings())
    clock = Clock(device)
    kernel_calls = count_deform_kernel_calls()
    batch, size = job["parts_batch"], job["input"]
    full_h6b, full_base = get_spec(job["h6b_preset"]), get_spec(job["baseline_preset"])
    torch.manual_seed(0)
    with torch.device(device):
        h6b = build_from_spec(_depth_reduced(full_h6b)).to(torch.bfloat16).train()
        base = build_from_spec(_depth_reduced(full_base)).to(torch.bfloat16).train()
    with torch.no_grad():  # open the interaction gates so every path carries gradient
        for name, p in h6b.named_parameters():
            if name.endswith(("ca_gamma", "cffn_gamma")):
                p.fill_(0.1)
    last = full_h6b.img_sizes[-1]
    grids = [(s * size // last // b.patch_size,) * 2 for b, s in zip(full_h6b.branches, full_h6b.img_sizes)]
    base_grid = (size // full_base.branches[0].patch_size,) * 2
    dims = [b.embed_dim for b in full_h6b.branches]

    def tokens(grid, dim):
        return torch.randn(batch, grid[0] * grid[1], dim, device=device, dtype=torch.bfloat16)

    def fmap(dim, grid):
        return torch.randn(batch, dim, *grid, device=device, dtype=torch.bfloat16)

    refs = [grid_reference_points(g, device) for g in grids]
    parts = [
        ("branch-1 block (6B), H6B grid", h6b.branch1.blocks[1], (tokens(grids[0], dims[0]), grids[0]),
         full_h6b.branches[0].depth, "h6b"),
        ("branch-2 block (ViT-H), H6B grid", h6b.branch2.blocks[1], (tokens(grids[1], dims[1]), grids[1]),
         full_h6b.branches[1].depth, "h6b"),
        ("interaction block (both directions)", h6b.interactions[0], ([tokens(grids[0], dims[0]), tokens(grids[1], dims[1])],
         grids, refs), len(full_h6b.groups[0]), "h6b"),
        ("merge_branch1", h6b.merge_branch1, (fmap(dims[0], grids[0]),), 1, "h6b"),
        ("merge_branch2", h6b.merge_branch2, (fmap(dims[1], grids[1]),), 1, "h6b"),
        ("pyramid fpn1 (H6B)", h6b.fpn1, (fmap(dims[0], grids[-1]),), 1, "h6b"),
        ("pyramid fpn2 (H6B)", h6b.fpn2, (fmap(dims[0], grids[-1]),), 1, "h6b"),
        ("6B block, baseline grid", base.blocks[1], (tokens(base_grid, full_base.branches[0].embed_dim), base_grid),
         full_base.branches[0].depth, "baseline"),
        ("pyramid up1 (baseline)", base.up1, (fmap(full_base.branches[0].embed_dim, base_grid),), 1, "baseline"),
        ("pyramid up2 (baseline)", base.up2, (fmap(full_base.branches[0].embed_dim, base_grid),), 1, "baseline"),
    ]
    rows = []
    for label, module, inputs, count, model in parts:
        leaves = [x for x in (inputs[0] if isinstance(inputs[0], list) else [inputs[0]])]
        for x in leaves:
            x.requires_grad_(True)

        def step():
            out = module(*inputs)
            outs = out if isinstance(out, (list, tuple)) else [out]
            sum(o.float().mean() for o in outs).backward()
            module.zero_grad(set_to_none=True)
            for x in leaves:
                x.grad = None

        ms = _median_ms(clock, step, job["warmup"], job["repeats"])
        macs = _forward_macs(module, inputs)
        # Model FLOPs: forward + backward = 3 x the forward's 2 x MACs (grid_sample is not counted).
        rows.append({"part": label, "ms": ms, "count_full_depth": count, "model": model,
                     "tflops": 3 * 2 * macs / (ms / 1e3) / 1e12 if macs else None})
    projection = {m: sum(r["ms"] * r["count_full_depth"] for r in rows if r["model"] == m) for m in ("h6b", "baseline")}
    return {**job, "device": str(device), "parts": rows, "projection_ms": projection,
            "projection_ratio": projection["h6b"] / projection["baseline"],
            "deform_kernel_calls": kernel_calls, "versions": _library_versions(),
            "gpu_after": gpu_state() if device.type == "cuda" else None}


# ----------------------------------------------------------------------------------- the parent
def planned_peak(model: str, batch: int, size: int, dry_run: bool, gpu_mem_gib: float, overrides: list[str]) -> dict:
    """`piip6b.plan`'s estimate for the recipe's backbone on one GPU (heads not included)."""
    from piip6b.config import load_config
    from piip6b.plan import Cluster, Layout, estimate, measure_activations, measure_params

    cfg = load_config(REPO / RECIPES[model][1 if dry_run else 0], [f"data.batch_size={batch}", "data.global_batch=null",
                                                                   "engine.grad_accum_steps=1", *overrides])
    from piip6b.models import get_spec

    spec = get_spec(cfg.model.preset, cfg.model.img_sizes)
    params = measure_params(spec, cfg.engine.param_persistence_threshold, size)
    acts = measure_activations(spec, size)
    ckpt = bool(cfg.model.grad_checkpointing) and cfg.model.checkpoint_interactions
    e = estimate(params, acts, 0.0, Layout(cfg.engine.zero_stage, checkpointing=ckpt),
                 Cluster(gpus=1, gpu_mem_gib=gpu_mem_gib), batch, engine=cfg.engine)
    return {"peak_allocated_bytes": e.peak_allocated_bytes, "memory": e.memory, "fits": e.fits}


def child_env(dry_run: bool) -> dict[str, str]:
    if dry_run:
        from piip6b.testing import child_env as cpu_child_env

        return cpu_child_env()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_in_fresh_process(job: dict, timeout_s: float, while_waiting: Callable[[], Any] | None = None) -> tuple[dict, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu_step_job_") as tmp:
        result_path = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(job),
                                 "--result", str(result_path)], env=child_env(job["dry_run"]), cwd=REPO)
        extra = while_waiting() if while_waiting else None
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {**job, "error": f"timed out after {timeout_s:.0f} s"}, extra
        if code != 0 or not result_path.is_file():
            return {**job, "error": f"exit code {code}"}, extra
        return json.loads(result_path.read_text()), extra


def summarize(report: dict) -> list[str]:
    lines = [f"{'model':<10}{'img/GPU':>8}{'bb fwd':>9}{'bb bwd':>9}{'bb f+b':>9}{'TFLOP/s':>9}{'MFU':>7}"
             f"{'step ms':>9}{'img/s':>7}{'peak GiB':>9}{'plan GiB':>9}  kernels"]
    steps = [r for r in report["jobs"] if r.get("kind") == "step"]
    for r in steps:
        label = r["model"] + (" +compile" if r.get("compile", "none") != "none" else "")
        if "error" in r:
            lines.append(f"{label:<10}{r['batch']:>8}  {r['error']}")
            continue
        m = r["median"]
        peak = r["peak_allocated_bytes"] / 2**30 if r["peak_allocated_bytes"] else float("nan")
        plan = r.get("planned", {}).get("peak_allocated_bytes", float("nan")) / 2**30
        kernels = ",".join(f"{k}:{v:g}" for k, v in r["deform_kernel_calls_per_step"].items() if v) or "-"
        lines.append(f"{label:<10}{r['batch']:>8}{m['backbone_forward_ms']:>9.1f}{m['backbone_backward_ms']:>9.1f}"
                     f"{m['backbone_ms']:>9.1f}{r['backbone_tflops']:>9.1f}{100 * r['backbone_mfu']:>6.1f}%"
                     f"{m['step_ms']:>9.1f}{r['images_per_s']:>7.2f}{peak:>9.1f}{plan:>9.1f}  "
                     f"attn {r['attention_backend']}, deform {kernels}")
    for batch in sorted({r["batch"] for r in steps}):
        pair = {r["model"]: r for r in steps if r["batch"] == batch and "error" not in r and r.get("compile") == "none"}
        if {"h6b", "baseline"} <= set(pair):
            h, b = pair["h6b"]["median"], pair["baseline"]["median"]
            lines.append(f"{batch} image(s)/GPU: H6B / baseline backbone {h['backbone_ms'] / b['backbone_ms']:.3f} "
                         f"(goal <= 0.45), whole step {h['step_ms'] / b['step_ms']:.3f} (goal <= 0.50)")
    for r in report["jobs"]:
        if r.get("kind") == "parts" and "error" not in r:
            lines.append("")
            lines.append(f"{'part (batch ' + str(r['parts_batch']) + ')':<40}{'ms f+b':>9}{'TFLOP/s':>9}{'x full':>7}")
            for p in r["parts"]:
                tf = f"{p['tflops']:.0f}" if p["tflops"] else "-"
                lines.append(f"{p['part']:<40}{p['ms']:>9.2f}{tf:>9}{p['count_full_depth']:>7}")
            pr = r["projection_ms"]
            lines.append(f"projected full-depth backbone f+b: H6B {pr['h6b']:.0f} ms, baseline {pr['baseline']:.0f} ms, "
                         f"ratio {r['projection_ratio']:.3f}; interaction block goal <= 2.5 ms")
    skipped = [r for r in report["jobs"] if r.get("skipped")]
    if skipped:
        lines.append("skipped (time budget): " + ", ".join(f"{r['kind']} {r.get('model', '')} {r.get('batch', '')}"
                                                           for r in skipped))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="images per GPU to time")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="models to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (ZeRO trace, cuDNN search)")
    parser.add_argument("--parts", action="store_true", help="only the per-part breakdown")
    parser.add_argument("--no-parts", action="store_true", help="skip the per-part breakdown")
    parser.add_argument("--compile", action="store_true", help="also the H6B, 2 images, with performance.compile=blocks")
    parser.add_argument("--override", action="append", default=[], help="config override for every step job")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip what would not finish within this")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny presets on the CPU, through the same code")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_step.json"))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.job:  # a child process: one configuration
        job = json.loads(args.job)
        result = run_parts_job(job) if job["kind"] == "parts" else run_step_job(job)
        Path(args.result).write_text(json.dumps(result))
        return 0

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("bench/gpu_step.py needs a CUDA GPU (or --cpu-dry-run)", file=sys.stderr)
        return 2
    input_size = 128 if dry else 1024
    common = {"dry_run": dry, "input": input_size, "warmup": 1 if dry else args.warmup,
              "repeats": 2 if dry else args.repeats}
    report_gpu = gpu_state() if not dry else None
    # From nvidia-smi: a CUDA context in this parent would hold GPU memory while the children run.
    gpu_mem_gib = float(report_gpu["memory.total"].split()[0]) / 1024 if report_gpu else 64.0
    overrides = (DRY_RUN_OVERRIDES if dry else []) + args.override
    step_jobs = [{"kind": "step", "model": m, "batch": b, "compile": "none", "overrides": overrides, **common}
                 for b in sorted(args.batches, key=lambda b: (b != 2, b)) for m in args.models]
    first = len(args.models)  # the 2-image pair first: the headline ratio
    parts_job = {"kind": "parts", "parts_batch": 2, "h6b_preset": "piip_h6b_tiny" if dry else "piip_h6b",
                 "baseline_preset": "internvit6b_baseline_tiny" if dry else "internvit6b_baseline", **common,
                 "repeats": 2 if dry else max(args.repeats, 10)}
    jobs = [] if args.parts else step_jobs[:first]
    if not args.no_parts:
        jobs.append(parts_job)
    if not args.parts:
        jobs += step_jobs[first:]
        if args.compile:
            jobs.append({**step_jobs[0], "compile": "blocks"})
    started = time.time()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "gpu_before": report_gpu, "jobs": []}
    longest = 0.0
    for job in jobs:
        elapsed = time.time() - started
        if elapsed + max(longest, 30.0) > args.budget_s:
            report["jobs"].append({**job, "skipped": True})
            continue
        plan = (lambda j=job: planned_peak(j["model"], j["batch"], j["input"], dry, gpu_mem_gib, j["overrides"])) \
            if job["kind"] == "step" else None
        t0 = time.time()
        result, planned = run_in_fresh_process(job, args.budget_s - elapsed, plan)
        longest = max(longest, time.time() - t0)
        if planned is not None:
            result["planned"] = planned
        result["wall_s"] = time.time() - t0
        report["jobs"].append(result)
        print(f"[{time.time() - started:5.0f} s] {job['kind']} {job.get('model', '')} {job.get('batch', '')}: "
              + (result.get("error") or f"{result['wall_s']:.0f} s"), flush=True)
    report["wall_s"] = time.time() - started
    lines = summarize(report)
    print("\n".join(lines))
    report["summary"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0 if all("error" not in r for r in report["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
