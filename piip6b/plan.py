"""Per-GPU memory and per-step communication of a preset under ZeRO-1/2/3 and hpZ, and a recommendation.

Nothing here allocates or trains. Parameter counts come from the backbone built on the `meta`
device; activations from a meta-device forward that records what autograd saves for backward
(`torch.autograd.graph.saved_tensors_hooks`), with attention counted as a fused kernel
(flash / SDPA-efficient: q, k, v, output and a per-row log-sum-exp, no N×N matrix).

Memory model, bf16 training with fp32 masters and AdamW, P parameters, N data-parallel ranks, g ranks
per node; what DeepSpeed 0.19 allocates, checked against a CPU run (bench/cpu_sharding.py,
tests/engine/test_plan.py). Held for the whole run:
- parameters: bf16, 2P (ZeRO-1/2); 2P/N plus whole copies of the persistent parameters (ZeRO-3);
  hpZ adds a secondary bf16 partition over the node, 2P/g;
- gradients: bf16, 2P/N (ZeRO-2/3: the reduced partition) or 2P (ZeRO-1 reduces at the step);
- optimizer: fp32 master + exp_avg + exp_avg_sq = 12P/N at every stage;
- buffers: ZeRO-3's gradient reduction bucket (bf16, `engine.reduce_bucket_size`).
On top, the larger of two phases:
- forward/backward: the saved-for-backward activations of the micro-batch (with checkpointing:
  what stays outside the checkpointed units, each unit's inputs and the largest unit recomputed)
  and what is in flight: under ZeRO-3 the parameters gathered at once (replayed from the module
  trace, below) plus the prefetch bucket, under ZeRO-1/2 the gradient buckets (two with
  overlap_comm);
- optimizer step: the fp32 copy of one sub-group's gradient (ZeRO-3: `engine.sub_group_size`
  elements; ZeRO-1/2: the whole partition), made through a bf16 flattened copy (6 bytes per
  element at once) and, for an unfused AdamW, two more fp32 temporaries of it (12 bytes in all).
Plus a fixed framework overhead (CUDA context, NCCL, cuBLAS), not part of the allocator's peak.
Scope: the backbone. A task head (FPN + Mask R-CNN heads, UperNet) adds its own parameters, optimizer
state and activations on top; the fixed overhead is meant to cover it only for small heads.

Communication per rank per optimizer step, as payloads (the whole tensor each collective assembles
or reduces; a ring moves (N-1)/N of it per rank for an all-gather or reduce-scatter, twice that for
an all-reduce):
- ZeRO-1/2: DeepSpeed all-reduces the bf16 gradient buckets (2P; ZeRO-2 after every micro-batch,
  ZeRO-1 once per step) and all-gathers the updated bf16 partitions (2P);
- ZeRO-3: reduce-scatter of every bf16 gradient after every micro-batch (2P), all-gathers of the
  non-persistent parameters replayed from the module trace, and an all-gather of the updated
  persistent parameters after the step. DeepSpeed gathers a module's parameters when it runs and
  releases them afterwards unless the module runs again (in the backward) within
  `engine.max_reuse_distance` elements of the trace: so the forward gathers every non-persistent
  parameter once, the backward only those released in between (none when every module's forward
  and backward are less than 1e9 elements apart, as in a model under ~5e8 parameters; for the 6B
  models all but the last ~1e9 elements of the forward). Activation checkpointing re-runs each
  unit's forward inside the backward. hpZ does the backward all-gathers inside the node.
"""

from __future__ import annotations

import dataclasses
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
    numels: tuple[int, ...] = ()  # every parameter's element count (empty: padding ignored)
    persistence_threshold: int = 0
    trace: ParamTrace | None = None  # the module calls of one forward (None: not recorded)

    def padded(self, world: int, persistent: bool | None = None) -> int:
        """Elements of all (or only the persistent / non-persistent) parameters, each padded to a
        multiple of `world` as ZeRO partitions it: what its collectives carry."""
        if not self.numels:
            return {None: self.total, True: self.persistent, False: self.total - self.persistent}[persistent]
        return sum(world * math.ceil(n / world) for n in self.numels
                   if persistent is None or (n <= self.persistence_threshold) == persistent)


def measure_params(spec: PIIPSpec, persistence_threshold: int, input_size: int | None = None) -> ParamFootprint:
    """Counts from the backbone on the meta device, with its ZeRO-3 module trace at `input_size`."""
    with torch.device("meta"):
        model = build_from_spec(spec)
    numels = tuple(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamFootprint(sum(numels), sum(n for n in numels if n <= persistence_threshold), largest, numels,
                          persistence_threshold, measure_trace(spec, input_size))


# --- the ZeRO-3 parameter trace, recorded on the meta device ------------------------------------
@dataclass
class ParamTrace:
    """Every module call of one forward, in order, as ZeRO-3 sees them (DeepSpeed hooks every module
    and fetches its own parameters when it is called)."""

    modules: list[int]  # per call: which module (a module called twice appears twice)
    numels: list[tuple[int, ...]]  # per call: element counts of the module's own parameters
    units: list[int | None]  # per call: the checkpointing unit it runs in (a block or an injector)

    def fetch_order(self, checkpointing: bool) -> tuple[list[int], int]:
        """Calls in the order of one forward + backward, and how many of them are the forward.

        The backward visits the calls in reverse; with checkpointing, a unit's calls first run
        forward again (the recomputation), then backward.
        """
        calls = list(range(len(self.modules)))
        backward: list[int] = []
        segment: list[int] = []
        for call in reversed(calls):
            if segment and self.units[call] == self.units[segment[0]] and self.units[call] is not None:
                segment.append(call)
                continue
            backward += self._segment_backward(segment, checkpointing)
            segment = [call]
        backward += self._segment_backward(segment, checkpointing)
        return calls + backward, len(calls)

    def _segment_backward(self, reversed_calls: list[int], checkpointing: bool) -> list[int]:
        if checkpointing and reversed_calls and self.units[reversed_calls[0]] is not None:
            return reversed_calls[::-1] + reversed_calls
        return reversed_calls


def measure_trace(spec: PIIPSpec, input_size: int | None = None) -> ParamTrace:
    """Record the module calls of one forward of `spec` at a square input on the meta device."""
    from piip6b.models.interaction import Injector

    size = input_size or spec.img_sizes[-1]
    with torch.device("meta"):
        model = build_from_spec(spec, attn_backend="sdpa")
        images = torch.empty(1, 3, size, size)
    index = {module: i for i, module in enumerate(model.modules())}
    units = {module for name, module in model.named_modules() if _BLOCK_NAME.search(name) or isinstance(module, Injector)}
    trace = ParamTrace([], [], [])
    stack: list[int] = []

    def enter(module: torch.nn.Module, args: tuple) -> None:
        if module in units and not stack:
            stack.append(index[module])
        trace.modules.append(index[module])
        trace.numels.append(tuple(p.numel() for p in module.parameters(recurse=False)))
        trace.units.append(stack[0] if stack else None)

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if stack and stack[0] == index[module]:
            stack.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return trace


@dataclass
class Zero3Gathers:
    """Elements one rank all-gathers in one forward + backward under ZeRO-3 (padded to a multiple
    of the ranks), and the most that are gathered at the same time."""

    forward: int
    backward: int
    peak_live: int


def zero3_gathers(trace: ParamTrace, world: int, persistence_threshold: int, max_reuse_distance: int,
                  checkpointing: bool) -> Zero3Gathers:
    """Replay DeepSpeed's fetch/release rule (`PartitionedParameterCoordinator`, trace complete)."""
    order, n_forward = trace.fetch_order(checkpointing)
    sizes = [sum(trace.numels[c]) for c in order]  # the reuse distance counts every parameter
    gathered = [sum(world * math.ceil(n / world) for n in trace.numels[c] if n > persistence_threshold)
                for c in order]
    before = [0]  # elements used before each position of the order
    for size in sizes:
        before.append(before[-1] + size)
    following: dict[int, int] = {}
    next_use = [None] * len(order)
    for position in range(len(order) - 1, -1, -1):
        module = trace.modules[order[position]]
        next_use[position] = following.get(module)
        following[module] = position
    available: set[int] = set()
    forward = backward = live = peak = 0
    for position, call in enumerate(order):
        module = trace.modules[call]
        if module not in available:
            available.add(module)
            live += gathered[position]
            if position < n_forward:
                forward += gathered[position]
            else:
                backward += gathered[position]
        peak = max(peak, live)
        again = next_use[position]
        if again is None or before[again] - before[position + 1] >= max_reuse_distance:
            available.discard(module)
            live -= gathered[position]
    return Zero3Gathers(forward, backward, peak)


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


@dataclass(frozen=True)
class CommVolume:
    """Payload bytes one rank puts through each kind of collective per optimizer step (the whole
    tensor each all-gather assembles or each reduce-scatter / all-reduce reduces)."""

    all_gather: float
    reduce_scatter: float
    all_reduce: float
    all_gather_in_node: float = 0.0  # hpZ: the backward all-gathers, from the node's secondary copy

    def ring_bytes(self, world: int, per_node: int) -> tuple[float, float]:
        """(bytes over the whole job's ring, bytes over the node's ring) one rank sends."""
        ring = (world - 1) / world
        job = (self.all_gather + self.reduce_scatter + 2 * self.all_reduce) * ring
        return job, self.all_gather_in_node * (per_node - 1) / per_node


@dataclass
class Estimate:
    layout: Layout
    # bytes per GPU. Held through forward, backward and step: params, grads, optimizer, buffers.
    # Forward/backward: activations, in_flight (gathered parameters or gradient buckets).
    # Optimizer step: step_temporaries. And the framework overhead.
    memory: dict[str, int]
    comm: CommVolume
    comm_inter_bytes: float  # per GPU per optimizer step, over collectives spanning nodes
    comm_intra_bytes: float  # per GPU per step, inside a node
    comm_s: float
    compute_s: float
    fits: bool
    micro_batch: int = 1  # images per GPU per forward
    grad_accum: int = 1  # forwards per optimizer step

    @property
    def held_bytes(self) -> int:
        return sum(self.memory[k] for k in ("params", "grads", "optimizer", "buffers"))

    @property
    def peak_allocated_bytes(self) -> int:
        """The allocator's peak: what is held plus the larger of the two phases (no overhead)."""
        m = self.memory
        return self.held_bytes + max(m["activations"] + m["in_flight"], m["step_temporaries"])

    @property
    def total_bytes(self) -> int:
        return self.peak_allocated_bytes + self.memory["overhead"]

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
    share = math.ceil(p / world)
    if stage in (1, 2):
        param_bytes = BF16 * p
    elif stage == 3:
        param_bytes = BF16 * (share + params.persistent)
        if hpz_group > 1:
            param_bytes += BF16 * math.ceil(p / hpz_group)
    else:
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    grad_bytes = BF16 * (p if stage == 1 else share)  # fp32 gradients exist only in the step
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": 3 * FP32 * share}


def zero3_profile(params: ParamFootprint, world: int, checkpointing: bool, engine: EngineConfig) -> Zero3Gathers:
    """What one forward + backward gathers; without a recorded trace, every non-persistent parameter
    twice (forward and backward) and at most the largest module at a time."""
    if world == 1:  # DeepSpeed uses a single rank's partition as the parameter: nothing is gathered
        return Zero3Gathers(0, 0, 0)
    if params.trace is None:
        gathered = params.padded(world, persistent=False)
        return Zero3Gathers(gathered, gathered, params.largest_module)
    return zero3_gathers(params.trace, world, params.persistence_threshold, engine.max_reuse_distance,
                         checkpointing)


def estimate(params: ParamFootprint, activations: ActivationFootprint, flops_per_image: float,
             layout: Layout, cluster: Cluster, batch_per_gpu: int, grad_accum: int = 1,
             engine: EngineConfig | None = None, fused_optimizer: bool = True) -> Estimate:
    """One layout's per-GPU memory and per-step communication. `flops_per_image`: forward MACs.
    `fused_optimizer`: AdamW without per-step temporaries (the trainer's default)."""
    engine = engine or EngineConfig()
    world, per_node = cluster.gpus, cluster.gpus_per_node
    hpz_group = per_node if layout.hpz else 1
    share = math.ceil(params.total / world)
    memory = state_memory(params, layout.stage, world, hpz_group)
    bucket = BF16 * engine.reduce_bucket_size
    memory["buffers"] = bucket if layout.stage == 3 else 0
    per_image = activations.checkpointed() if layout.checkpointing else activations.total
    memory["activations"] = per_image * batch_per_gpu
    step_slice = share if layout.stage < 3 else min(engine.sub_group_size, share)
    # DeepSpeed flattens the slice's bf16 gradients, then casts the copy to fp32; an unfused AdamW
    # then adds `sqrt(v)` and its quotient (bench/cpu_sharding.py: 380 and 750 MiB for 67 M).
    memory["step_temporaries"] = step_slice * (BF16 + FP32 if fused_optimizer else 3 * FP32)
    memory["overhead"] = FRAMEWORK_OVERHEAD_BYTES

    padded = params.padded(world)
    if layout.stage == 3:
        gathers = zero3_profile(params, world, layout.checkpointing, engine)
        gatherable = params.padded(world, persistent=False)
        memory["in_flight"] = BF16 * min(gathers.peak_live + engine.prefetch_bucket_size, gatherable) if world > 1 else 0
        backward_in_node = layout.hpz
        comm = CommVolume(
            all_gather=BF16 * (grad_accum * (gathers.forward + (0 if backward_in_node else gathers.backward))
                               + (params.padded(world, persistent=True) if world > 1 else 0)),  # updated persistent params
            reduce_scatter=BF16 * padded * grad_accum,
            all_reduce=0.0,
            all_gather_in_node=BF16 * grad_accum * gathers.backward if backward_in_node else 0.0)
    else:
        memory["in_flight"] = bucket * (2 if engine.overlap_comm else 1)
        reductions = 1 if layout.stage == 1 else grad_accum
        # A single rank's partition is the whole model: DeepSpeed skips the all-gather, not the all-reduce.
        comm = CommVolume(all_gather=BF16 * padded if world > 1 else 0.0, reduce_scatter=0.0,
                          all_reduce=BF16 * params.total * reductions)
    job_bytes, node_bytes = comm.ring_bytes(world, per_node)
    job_bw = cluster.inter_node_gbs if cluster.nodes > 1 else cluster.intra_node_gbs
    comm_s = job_bytes / (job_bw * 1e9) + node_bytes / (cluster.intra_node_gbs * 1e9)
    passes = 4 if layout.checkpointing else 3  # forward + backward (2×), + one recomputed forward
    compute_s = passes * 2 * flops_per_image * batch_per_gpu * grad_accum / (cluster.achieved_tflops * 1e12)
    inter = job_bytes if cluster.nodes > 1 else 0.0
    intra = node_bytes + (0.0 if cluster.nodes > 1 else job_bytes)
    result = Estimate(layout, memory, comm, inter, intra, comm_s, compute_s, fits=False, micro_batch=batch_per_gpu,
                      grad_accum=grad_accum)
    result.fits = result.total_bytes <= HEADROOM * cluster.gpu_mem_gib * GIB
    return result


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
                           "peak_allocated_bytes": e.peak_allocated_bytes, "total_bytes": e.total_bytes,
                           "fits": e.fits, "comm_payload_bytes": dataclasses.asdict(e.comm),
                           "comm_inter_bytes": e.comm_inter_bytes,
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
    params = measure_params(spec, engine.param_persistence_threshold, size)
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
        f"{'layout':<18}{'params':>8}{'grads':>8}{'optim':>8}{'buffer':>8}{'activ':>8}{'flight':>8}"
        f"{'step':>7}{'other':>7}{'peak':>8}  fits  {'comm GB/step':>13}{'comm s':>8}{'step s':>8}"
        + ("  micro x accum" if plan.split else ""),
    ]
    for e in plan.estimates:
        m = {k: v / GIB for k, v in e.memory.items()}
        comm_gb = (e.comm_inter_bytes + e.comm_intra_bytes) / 1e9
        lines.append(
            f"{e.layout.name:<18}{m['params']:>8.2f}{m['grads']:>8.2f}{m['optimizer']:>8.2f}{m['buffers']:>8.2f}"
            f"{m['activations']:>8.2f}{m['in_flight']:>8.2f}{m['step_temporaries']:>7.2f}{m['overhead']:>7.2f}"
            f"{e.total_bytes / GIB:>8.2f}  {'yes ' if e.fits else 'no  '}  {comm_gb:>13.1f}{e.comm_s:>8.3f}{e.step_s:>8.3f}"
            + (f"  {e.micro_batch:>5} x {e.grad_accum}" if plan.split else ""))
    lines.append("(GiB per GPU; peak = params + grads + optim + buffer + the larger of forward/backward (activ + "
                 "flight: gathered parameters or gradient buckets) and the optimizer step (step), + other; comm: bytes each GPU sends per optimizer step; "
                 f"step s = compute at {c.achieved_tflops:g} TFLOP/s + comm at {c.inter_node_gbs:g} GB/s across "
                 f"nodes, {c.intra_node_gbs:g} GB/s inside, no overlap)")
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

