"""Per-GPU memory and per-step communication of a preset under ZeRO-1/2/3 and hpZ, and a recommendation.

Nothing here allocates or trains. Parameter counts come from the backbone built on the `meta`
device; activations from a meta-device forward that records what autograd saves for backward
(`torch.autograd.graph.saved_tensors_hooks`), with attention counted as a fused kernel
(flash / SDPA-efficient: q, k, v, output and a per-row log-sum-exp, no N×N matrix).

Memory model, bf16 training with fp32 masters and AdamW (DeepSpeed's bf16 ZeRO optimizers), P
parameters, N data-parallel ranks, g ranks per node:
- parameters: bf16, 2P (ZeRO-1/2); 2P/N plus whole copies of the persistent parameters (ZeRO-3);
  hpZ adds a secondary bf16 partition over the node, 2P/g;
- gradients: bf16, 2P (ZeRO-1) or 2P/N (ZeRO-2/3), plus the fp32 partition gradient the optimizer
  step reads, 4P/N;
- optimizer: fp32 master + exp_avg + exp_avg_sq = 12P/N at every stage;
- activations: the saved-for-backward bytes of one micro-batch; with checkpointing, what stays
  outside the checkpointed units plus each unit's inputs plus the largest unit recomputed;
- buffers: gradient reduction buckets (two with overlap_comm) and, for ZeRO-3, the prefetch bucket
  and the largest gathered module; plus a fixed framework overhead (CUDA context, NCCL, cuBLAS).
Scope: the backbone. A task head (FPN + Mask R-CNN heads, UperNet) adds its own parameters, optimizer
state and activations on top; the fixed overhead is meant to cover it only for small heads.
Communication, ring collectives moving (N-1)/N of the tensor per GPU: ZeRO-1/2 reduce-scatter the
gradients and all-gather the updated parameters (2P + 2P bytes; ZeRO-2 reduces every micro-batch);
ZeRO-3 also all-gathers the non-persistent parameters in forward and again in backward (3 × 2P
per micro-batch); hpZ does the backward all-gather inside the node.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from piip6b.engine.sharding import EngineConfig
from piip6b.models import PIIPSpec, build_from_spec

GIB = 2**30
BF16 = 2
FP32 = 4
FRAMEWORK_OVERHEAD_BYTES = int(1.5 * GIB)  # CUDA context + NCCL + cuBLAS workspaces + allocator slack
TIE = 1e-3  # step-time estimates this close count as equal
HEADROOM = 0.9  # a plan "fits" when its estimate uses at most this share of the GPU's memory
_BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")


# --- activations, measured on the meta device -------------------------------------------------
class _FusedAttentionFootprint(torch.autograd.Function):
    """Stands in for a fused attention kernel: saves q, k, v, out and an fp32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # never run: meta only
        raise NotImplementedError


class _FusedAttentionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttentionFootprint.apply(q, k, v)
        return func(*args, **(kwargs or {}))


@dataclass
class ActivationFootprint:
    """Saved-for-backward bytes of one image through the backbone (bf16)."""

    total: int  # no checkpointing
    outside_units: int  # saved outside every block / interaction unit
    unit_saved: dict[str, int]  # per block or interaction unit: bytes saved inside it
    unit_inputs: dict[str, int]  # per unit: bytes of its tensor inputs (kept under checkpointing)

    def checkpointed(self, interactions: bool = True) -> int:
        """Bytes with every block (and, if `interactions`, every interaction unit) checkpointed."""
        units = {n for n in self.unit_saved if interactions or _BLOCK_NAME.search(n)}
        kept = self.total - sum(self.unit_saved[n] for n in units)
        recompute = max((self.unit_saved[n] for n in units), default=0)
        return kept + sum(self.unit_inputs[n] for n in units) + recompute


def measure_activations(spec: PIIPSpec, input_size: int | None = None) -> ActivationFootprint:
    """Trace one bf16 training forward of `spec` at a square input on the meta device."""
    size = input_size or spec.img_sizes[-1]
    with torch.device("meta"):
        model = build_from_spec(spec, attn_backend="sdpa").to(torch.bfloat16).train()
        images = torch.empty(1, 3, size, size, dtype=torch.bfloat16)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # keeps storages alive so their addresses stay unique
    state: dict[str, Any] = {"unit": None, "saved": 0}
    unit_saved: dict[str, int] = {}
    unit_inputs: dict[str, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in seen:
            seen.add(key)
            keep.append(tensor)
            state["saved"] += storage.nbytes()
            if state["unit"] is not None:
                unit_saved[state["unit"]] += storage.nbytes()
        return tensor

    def enter(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if state["unit"] is None:
                state["unit"] = name
                unit_saved.setdefault(name, 0)
                unit_inputs[name] = sum(a.untyped_storage().nbytes() for a in _tensors(args))
        return hook

    def leave(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if state["unit"] == name:
                state["unit"] = None
        return hook

    handles = []
    for name, module in model.named_modules():
        if _BLOCK_NAME.search(name) or hasattr(module, "use_checkpoint"):
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name)))
    try:
        with _FusedAttentionMode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    total = state["saved"]
    return ActivationFootprint(total, total - sum(unit_saved.values()), unit_saved, unit_inputs)


def _tensors(args: Any) -> list[torch.Tensor]:
    if torch.is_tensor(args):
        return [args]
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in _tensors(a)]
    return []


# --- parameters ---------------------------------------------------------------------------------
@dataclass
class ParamFootprint:
    total: int
    persistent: int  # elements kept whole on every rank under ZeRO-3 (numel <= threshold)
    largest_module: int  # elements of the largest module's direct parameters (one ZeRO-3 fetch)


def measure_params(spec: PIIPSpec, persistence_threshold: int) -> ParamFootprint:
    with torch.device("meta"):
        model = build_from_spec(spec)
    numels = [p.numel() for p in model.parameters()]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamFootprint(sum(numels), sum(n for n in numels if n <= persistence_threshold), largest)


# --- the estimate -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_mem_gib: float
    nodes: int = 1
    inter_node_gbs: float = 25.0  # GB/s per GPU across nodes (e.g. 200 Gb/s InfiniBand per GPU)
    intra_node_gbs: float = 150.0  # GB/s per GPU inside a node (NVLink, achieved bus bandwidth)
    achieved_tflops: float = 300.0  # bf16 TFLOP/s per GPU the model actually reaches

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.nodes < 1:
            raise ValueError(f"need at least one GPU and one node, got gpus={self.gpus}, nodes={self.nodes}")
        if self.gpus % self.nodes:
            raise ValueError(f"{self.gpus} GPUs do not split evenly over {self.nodes} nodes")
        if self.gpu_mem_gib <= 0:
            raise ValueError(f"gpu memory must be positive, got {self.gpu_mem_gib} GiB")

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


@dataclass(frozen=True)
class Layout:
    stage: int
    hpz: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        return f"ZeRO-{self.stage}" + ("+hpZ" if self.hpz else "") + (", ckpt" if self.checkpointing else "")


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, int]  # bytes per GPU: params, grads, optimizer, activations, buffers, overhead
    comm_inter_bytes: float  # per GPU per optimizer step, over collectives spanning nodes
    comm_intra_bytes: float  # per GPU per step, inside a node
    comm_s: float
    compute_s: float
    fits: bool
    micro_batch: int = 1  # images per GPU per forward
    grad_accum: int = 1  # forwards per optimizer step

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def state_bytes(self) -> int:
        """Parameters + optimizer state: the figure `sharding.state_bytes_per_rank` measures."""
        return self.memory["params"] + self.memory["optimizer"]

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s  # no overlap assumed: an upper bound


def state_memory(params: ParamFootprint, stage: int, world: int, hpz_group: int = 1) -> dict[str, int]:
    """Parameters, gradients and optimizer state per rank, in bytes."""
    p = params.total
    if stage in (1, 2):
        param_bytes = BF16 * p
    elif stage == 3:
        param_bytes = BF16 * (math.ceil(p / world) + params.persistent)
        if hpz_group > 1:
            param_bytes += BF16 * math.ceil(p / hpz_group)
    else:
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    grad_bytes = (BF16 * p if stage == 1 else BF16 * math.ceil(p / world)) + FP32 * math.ceil(p / world)
    optimizer_bytes = 3 * FP32 * math.ceil(p / world)
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": optimizer_bytes}


def estimate(params: ParamFootprint, activations: ActivationFootprint, flops_per_image: float,
             layout: Layout, cluster: Cluster, batch_per_gpu: int, grad_accum: int = 1,
             engine: EngineConfig | None = None) -> Estimate:
    """One layout's per-GPU memory and per-step communication. `flops_per_image`: forward MACs."""
    engine = engine or EngineConfig()
    world, per_node = cluster.gpus, cluster.gpus_per_node
    hpz_group = per_node if layout.hpz else 1
    memory = state_memory(params, layout.stage, world, hpz_group)
    per_image = activations.checkpointed() if layout.checkpointing else activations.total
    memory["activations"] = per_image * batch_per_gpu
    buckets = BF16 * engine.reduce_bucket_size * (2 if engine.overlap_comm else 1)
    if layout.stage == 3:
        buckets += BF16 * (engine.prefetch_bucket_size + params.largest_module)
    memory["buffers"] = buckets
    memory["overhead"] = FRAMEWORK_OVERHEAD_BYTES

    ring = (world - 1) / world
    p = params.total
    gathered = p - params.persistent if layout.stage == 3 else p
    reduce_times = 1 if layout.stage == 1 else grad_accum
    reduce_scatter = BF16 * p * ring * reduce_times
    if layout.stage in (1, 2):
        all_gather_global, all_gather_node = BF16 * p * ring, 0.0  # updated parameters, once a step
    elif layout.hpz:
        all_gather_global = BF16 * gathered * ring * grad_accum  # forward
        all_gather_node = BF16 * gathered * (per_node - 1) / per_node * grad_accum  # backward
    else:
        all_gather_global, all_gather_node = 2 * BF16 * gathered * ring * grad_accum, 0.0
    global_bytes = reduce_scatter + all_gather_global
    global_bw = cluster.inter_node_gbs if cluster.nodes > 1 else cluster.intra_node_gbs
    comm_s = global_bytes / (global_bw * 1e9) + all_gather_node / (cluster.intra_node_gbs * 1e9)
    passes = 4 if layout.checkpointing else 3  # forward + backward (2×), + one recomputed forward
    compute_s = passes * 2 * flops_per_image * batch_per_gpu * grad_accum / (cluster.achieved_tflops * 1e12)
    inter = global_bytes if cluster.nodes > 1 else 0.0
    intra = all_gather_node + (0.0 if cluster.nodes > 1 else global_bytes)
    total = sum(memory.values())
    return Estimate(layout, memory, inter, intra, comm_s, compute_s,
                    fits=total <= HEADROOM * cluster.gpu_mem_gib * GIB, micro_batch=batch_per_gpu,
                    grad_accum=grad_accum)


@dataclass
class Plan:
    spec: PIIPSpec
    cluster: Cluster
    batch_per_gpu: int
    input_size: int
    params: ParamFootprint
    activations: ActivationFootprint
    estimates: list[Estimate] = field(default_factory=list)
    recommended: Estimate | None = None
    grad_accum: int = 1
    split: bool = False  # each layout's micro-batch was chosen (the largest that fits)
    flops_per_image: float = 0.0  # forward MACs at input_size
    engine: EngineConfig = field(default_factory=EngineConfig)

    def estimate_layout(self, layout: Layout, micro_batch: int, grad_accum: int) -> Estimate:
        """One more layout or micro-batch from the same measurements (e.g. what a config asks for)."""
        return estimate(self.params, self.activations, self.flops_per_image, layout, self.cluster, micro_batch,
                        grad_accum, self.engine)

    def overrides(self) -> dict[str, Any]:
        """The recommendation as config overrides: everything `engine.plan=auto` sets (empty when
        nothing fits)."""
        if self.recommended is None:
            return {}
        r = self.recommended
        return {
            "engine.zero_stage": r.layout.stage,
            "engine.hpz_partition_size": self.cluster.gpus_per_node if r.layout.hpz else 1,
            "model.grad_checkpointing": 1 if r.layout.checkpointing else 0,
            "model.checkpoint_interactions": r.layout.checkpointing,
            "data.batch_size": r.micro_batch,
            "engine.grad_accum_steps": r.grad_accum,
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON data (`piip6b plan --json`)."""
        return {
            "params": self.params.total, "persistent_params": self.params.persistent,
            "activation_bytes_per_image": self.activations.total,
            "activation_bytes_per_image_checkpointed": self.activations.checkpointed(),
            "estimates": [{"layout": e.layout.name, "stage": e.layout.stage, "hpz": e.layout.hpz,
                           "checkpointing": e.layout.checkpointing, "memory_bytes": e.memory,
                           "total_bytes": e.total_bytes, "fits": e.fits, "comm_inter_bytes": e.comm_inter_bytes,
                           "comm_intra_bytes": e.comm_intra_bytes, "comm_s": e.comm_s, "step_s": e.step_s,
                           "micro_batch": e.micro_batch, "grad_accum": e.grad_accum}
                          for e in self.estimates],
            "recommended": self.recommended.layout.name if self.recommended else None,
            "overrides": self.overrides(),
        }


def make_plan(spec: PIIPSpec, cluster: Cluster, batch_per_gpu: int = 2, input_size: int | None = None,
              grad_accum: int = 1, engine: EngineConfig | None = None, split: bool = False) -> Plan:
    """Estimate every layout and recommend the one with the shortest estimated step that fits.

    Near-ties (within TIE; ZeRO-1 and ZeRO-2 move the same bytes without accumulation) go to the
    smaller footprint. With `split`, the batch_per_gpu x grad_accum images of a step may be split
    differently: each layout is estimated at the largest micro-batch dividing them that fits (the
    fewest forwards, so the fewest ZeRO-2/3 reductions and gathers).
    """
    from piip6b.models.counting import count_flops_for_spec

    engine = engine or EngineConfig()
    size = input_size or spec.img_sizes[-1]
    params = measure_params(spec, engine.param_persistence_threshold)
    activations = measure_activations(spec, size)
    flops = count_flops_for_spec(spec, size).gflops_full * 1e9
    layouts = [Layout(stage, hpz, ckpt) for ckpt in (False, True) for stage, hpz in
               ((1, False), (2, False), (3, False), (3, True)) if not hpz or cluster.nodes > 1]
    images = batch_per_gpu * grad_accum
    splits = ([(m, images // m) for m in range(images, 0, -1) if images % m == 0] if split
              else [(batch_per_gpu, grad_accum)])
    estimates = []
    for layout in layouts:
        candidates = [estimate(params, activations, flops, layout, cluster, micro, accum, engine)
                      for micro, accum in splits]
        estimates.append(next((e for e in candidates if e.fits), candidates[-1]))
    fitting = [e for e in estimates if e.fits]
    best = None
    if fitting:
        fastest = min(e.step_s for e in fitting)
        best = min((e for e in fitting if e.step_s <= fastest * (1 + TIE)), key=lambda e: e.total_bytes)
    return Plan(spec, cluster, batch_per_gpu, size, params, activations, estimates, best, grad_accum, split,
                flops, engine)


def plan_preset(preset: str, cluster: Cluster, *, img_sizes: list[int] | None = None, batch_per_gpu: int = 2,
                input_size: int | None = None, grad_accum: int = 1,
                persistence_threshold: int | None = None, split: bool = False) -> Plan:
    """`make_plan` for a registered preset, with the engine's defaults (ValueError on bad input)."""
    from piip6b.models import get_spec

    if batch_per_gpu < 1 or grad_accum < 1:
        raise ValueError(f"images per GPU and gradient accumulation must be >= 1, got {batch_per_gpu}, {grad_accum}")
    spec = get_spec(preset, img_sizes)
    if input_size is not None and input_size % spec.size_divisor:
        raise ValueError(f"--input {input_size} must be a multiple of {spec.size_divisor} for {preset}")
    engine = EngineConfig() if persistence_threshold is None else EngineConfig(param_persistence_threshold=persistence_threshold)
    return make_plan(spec, cluster, batch_per_gpu, input_size, grad_accum, engine, split)


def format_plan(plan: Plan) -> str:
    c = plan.cluster
    images = (f"{plan.batch_per_gpu * plan.grad_accum} image(s) per GPU per step, in the largest micro-batch "
              "that fits" if plan.split else f"{plan.batch_per_gpu} image(s) per GPU"
              + (f" x {plan.grad_accum} accumulation steps" if plan.grad_accum > 1 else ""))
    lines = [
        f"backbone: {plan.params.total / 1e6:,.1f} M parameters ({plan.params.persistent / 1e6:,.2f} M persistent under "
        f"ZeRO-3); input {plan.input_size}px, {images}; {c.gpus} GPUs on "
        f"{c.nodes} node(s), {c.gpu_mem_gib:g} GiB each",
        f"activations per image: {plan.activations.total / GIB:.2f} GiB, with block + interaction "
        f"checkpointing {plan.activations.checkpointed() / GIB:.2f} GiB",
        "",
        f"{'layout':<18}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'buffers':>8}{'other':>7}"
        f"{'total':>8}  fits  {'comm GB/step':>13}{'comm s':>8}{'step s':>8}" + ("  micro x accum" if plan.split else ""),
    ]
    for e in plan.estimates:
        m = {k: v / GIB for k, v in e.memory.items()}
        comm_gb = (e.comm_inter_bytes + e.comm_intra_bytes) / 1e9
        lines.append(
            f"{e.layout.name:<18}{m['params']:>8.2f}{m['grads']:>8.2f}{m['optimizer']:>8.2f}"
            f"{m['activations']:>8.2f}{m['buffers']:>8.2f}{m['overhead']:>7.2f}{e.total_bytes / GIB:>8.2f}  "
            f"{'yes ' if e.fits else 'no  '}  {comm_gb:>13.1f}{e.comm_s:>8.3f}{e.step_s:>8.3f}"
            + (f"  {e.micro_batch:>5} x {e.grad_accum}" if plan.split else ""))
    lines.append("(GiB per GPU; comm: bytes each GPU moves per optimizer step; step s = compute at "
                 f"{c.achieved_tflops:g} TFLOP/s + comm at {c.inter_node_gbs:g} GB/s across nodes, "
                 f"{c.intra_node_gbs:g} GB/s inside, no overlap)")
    if plan.recommended is None:
        lines.append(f"\nNothing fits in {HEADROOM:.0%} of {c.gpu_mem_gib:g} GiB: use more GPUs, fewer images "
                     "per GPU, or engine.offload_optimizer=cpu.")
    else:
        lines.append(f"\nrecommended: {plan.recommended.layout.name} -> {format_overrides(plan.overrides())}")
        lines.append("(apply it with these overrides, or engine.plan=auto to have a run choose for its own "
                     "world size and GPUs)")
    return "\n".join(lines)


def format_overrides(overrides: dict[str, Any]) -> str:
    """`key=value ...` as a command line takes them (YAML scalars: true/false in lower case)."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())

