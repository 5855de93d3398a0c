"""DeepSpeed ZeRO configuration, partitioned model construction and weight streaming.

Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, so every module's parameters are
partitioned as soon as its constructor returns and no rank ever holds the whole 6B model.
Construction happens in fp32 even when training in bf16: zero.Init otherwise creates every
parameter directly in bf16 and the initialisers then draw in bf16 (biased sums, ~4k distinct values
per tensor; see the DeepSpeed notes). The fp32 partitions are cast to the training dtype afterwards
(`cast_partitioned_params`), which rounds each value once, to nearest.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import nn

from piip6b.dist import is_partitioned
from piip6b.engine.optim import OptimConfig
from piip6b.mappings import deep_merge

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    zero_stage: Literal[1, 2, 3] = 3
    bf16: bool = True
    # Forwards per optimizer step. None: derived with the micro-batch from data.global_batch and the
    # world size (1 when data.global_batch is unset); a number pins it (`BatchLayout.derive`).
    grad_accum_steps: int | None = None
    # "auto": `piip6b plan`'s recommendation for this world size and GPU memory replaces zero_stage,
    # hpz_partition_size, model.grad_checkpointing / checkpoint_interactions, data.batch_size and
    # grad_accum_steps when the run starts (piip6b.recipe.apply_plan; the start-up summary marks them).
    plan: Literal["off", "auto"] = "off"
    gpu_mem_gib: float | None = None  # per GPU, for the pre-flight memory check and plan=auto; None: torch.cuda's
    zero_init: bool = True  # stage 3: build the model already partitioned
    # Parameters with at most this many elements stay whole on every rank under ZeRO-3 (no gather
    # per use). 1e5 keeps norms, biases, gates and the small branches' pos_embed resident; every
    # Linear of a 6B/H block (>= 1.6M elements) is partitioned.
    # The small high-resolution branch is partitioned too, by measurement (bench/cpu_sharding.py,
    # 2 ranks): a threshold keeping the ViT-H-like branch whole cost +24 % parameter bytes per rank
    # and gave no faster step (8.1 s vs 6.0 s, noisy CPU). At full size no threshold can single the
    # branch out: the 6.55M needed for ViT-H's fc1 also keeps every interaction tensor, 959M
    # parameters (1.9 GB bf16) on every rank, more than the whole ZeRO-3 share at 8 GPUs.
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int | None = None  # cap on all persistent elements (None: no cap)
    hpz_partition_size: int = 1  # ZeRO++ secondary partition (ranks per node); 1 = off
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    # A parameter gathered for the forward stays whole until its backward if fewer elements than
    # this are used in between, so it is not gathered twice (DeepSpeed's default). It is what keeps
    # the backward all-gather of a model under 1e9 parameters at zero, and ~2 GB of the 6B model's
    # last blocks gathered into the backward (`piip6b.plan` replays the rule).
    max_reuse_distance: int = 1_000_000_000
    # ZeRO-3 steps the optimizer on slices ("sub-groups") of at most this many elements of a
    # parameter group and makes an fp32 copy of one slice's gradient at a time: that copy is the
    # optimizer step's temporary (4 bytes x this). DeepSpeed's default 1e9 costs 4 GB per GPU in the
    # step once a rank holds a group that large (one GPU, or a few ranks); 1e8 bounds it at 0.4 GB
    # and is still a single fused AdamW call of 1e8 elements per slice.
    sub_group_size: int = 100_000_000
    offload_optimizer: Literal["none", "cpu"] = "none"
    nonfinite: Literal["skip", "stop"] = "stop"  # a step with a non-finite loss or gradient norm
    # Under `skip`, this many skipped steps in a row stop the run as `stop` would: a bad batch is
    # skipped and forgotten, a diverged model would otherwise skip every remaining step and exit 0.
    max_consecutive_skips: int = 5
    # Merged into the DeepSpeed config last, for DeepSpeed settings this schema does not name. A key
    # that the typed config derives (the ZeRO stage, batch sizes, bf16, clipping...) is refused:
    # two sources for one setting is how a run builds under one ZeRO stage and trains under another.
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grad_accum_steps is not None and self.grad_accum_steps < 1:
            raise ValueError(f"engine.grad_accum_steps must be >= 1 (or unset: derived), got {self.grad_accum_steps}")
        if self.gpu_mem_gib is not None and self.gpu_mem_gib <= 0:
            raise ValueError(f"engine.gpu_mem_gib must be positive (or unset: measured), got {self.gpu_mem_gib}")
        for name in ("hpz_partition_size", "reduce_bucket_size", "prefetch_bucket_size",
                     "max_live_parameters", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("param_persistence_threshold", "model_persistence_threshold"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"engine.{name} must be >= 0, got {value}")
        if self.hpz_partition_size > 1 and self.zero_stage != 3:
            raise ValueError("hpz_partition_size (ZeRO++) needs zero_stage 3")
        typed = _typed_deepspeed_config(self, OptimConfig(), micro_batch_size=1, world_size=1)
        for path in _leaf_paths(self.deepspeed_overrides):
            owner = next((_DERIVED_FROM[".".join(path[:i])] for i in range(1, len(path) + 1)
                          if ".".join(path[:i]) in _DERIVED_FROM), None)
            if owner is None and _lookup(typed, path) is not _MISSING:
                owner = "the engine/optim/data sections"
            if owner is not None:
                raise ValueError(f"deepspeed_overrides sets {'.'.join(path)!r}, which piip6b derives from "
                                 f"its own config ({owner}): set it there instead")


# DeepSpeed keys (and sub-trees) the typed config owns, and where each comes from.
_DERIVED_FROM = {
    "train_micro_batch_size_per_gpu": "data.global_batch / data.batch_size",
    "gradient_accumulation_steps": "data.global_batch / engine.grad_accum_steps",
    "train_batch_size": "data.global_batch (or data.batch_size x world size x engine.grad_accum_steps)",
    "gradient_clipping": "optim.clip_grad_norm",
    "bf16.enabled": "engine.bf16",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.overlap_comm": "engine.overlap_comm",
    "zero_optimization.reduce_bucket_size": "engine.reduce_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold": "engine.param_persistence_threshold",
    "zero_optimization.stage3_model_persistence_threshold": "engine.model_persistence_threshold",
    "zero_optimization.stage3_prefetch_bucket_size": "engine.prefetch_bucket_size",
    "zero_optimization.stage3_max_live_parameters": "engine.max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance": "engine.max_reuse_distance",
    "zero_optimization.sub_group_size": "engine.sub_group_size",
    "zero_optimization.zero_hpz_partition_size": "engine.hpz_partition_size",
    "zero_optimization.offload_optimizer": "engine.offload_optimizer",
}
_MISSING = object()


def _leaf_paths(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key))


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`; a whole sub-mapping counts as set (overriding a part of it collides)."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch_size: int,
                     world_size: int, grad_accum: int = 1) -> dict:
    """The DeepSpeed config dict for a run; the one place our typed config meets DeepSpeed's keys.
    The batch numbers are the run's `BatchLayout` (derived from the config and the world size)."""
    return deep_merge(_typed_deepspeed_config(engine, optim, micro_batch_size, world_size, grad_accum),
                      engine.deepspeed_overrides)


def _typed_deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch_size: int,
                            world_size: int, grad_accum: int = 1) -> dict:
    zero: dict[str, Any] = {
        "stage": engine.zero_stage,
        "overlap_comm": engine.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": engine.reduce_bucket_size,
        # DeepSpeed's default swaps torch.nn.functional.linear, process-wide and for good, for its
        # own matmul-then-add-bias under zero.Init: every Linear of a ZeRO-3 run (training and the
        # trainer's evaluation) then rounds differently in bf16 from the same weights evaluated
        # without DeepSpeed (`piip6b eval`). torch's own linear is ZeRO-3-safe (the module hooks
        # gather weights for backward) and keeps both paths on one set of numerics.
        "memory_efficient_linear": False,
    }
    if engine.zero_stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": engine.param_persistence_threshold,
            "stage3_prefetch_bucket_size": engine.prefetch_bucket_size,
            "stage3_max_live_parameters": engine.max_live_parameters,
            "stage3_max_reuse_distance": engine.max_reuse_distance,
            "sub_group_size": engine.sub_group_size,
            "zero_hpz_partition_size": engine.hpz_partition_size,
        })
        if engine.model_persistence_threshold is not None:
            zero["stage3_model_persistence_threshold"] = engine.model_persistence_threshold
    if engine.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,  # images per rank per forward
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        # The reference set clipping in its mmcv config, which DeepSpeed never saw; here it is
        # DeepSpeed's own clipping, applied inside the ZeRO optimizer step.
        "gradient_clipping": optim.clip_grad_norm,
        # check_grad_overflow makes bf16 ZeRO-1/2 skip a step with a non-finite gradient norm
        # (ZeRO-3 always does); the loop then counts or stops on it.
        "bf16": {"enabled": engine.bf16, "check_grad_overflow": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # With optimizer offload DeepSpeed refuses any client optimizer but its own CPU Adam unless
        # told otherwise; ours (torch AdamW with layer-decay groups) then steps on the CPU copies.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return config


def construction_config(ds_config: dict) -> dict:
    """The config zero.Init builds with: same partitioning, but fp32 so initialisers draw in fp32.

    (zero.Init's `dtype=` argument is not usable for this: on CPUs without fp16 support an operator
    precedence bug turns float32 into bfloat16.)
    """
    return deep_merge(ds_config, {"bf16": {"enabled": False}})


def _zero_init_class() -> type:
    import deepspeed
    import deepspeed.comm as ds_dist

    class ScalarSafeInit(deepspeed.zero.Init):
        """zero.Init that can also partition 0-d parameters (PIIP's branch weights w1, w2 are
        scalars, as in the reference's state dict). DeepSpeed 0.19 broadcasts each new parameter
        through `param.data.view(torch.uint8)`, which torch refuses for 0-d tensors; a 1-element
        view of the same storage is broadcast instead, leaving shape and ds_shape `()`."""

        def _zero_init_param(self, param):
            if param.dim() != 0:
                return super()._zero_init_param(param)
            self._convert_to_deepspeed_param(param)
            group = self.get_partition_dp_group(param)
            source = 0 if ds_dist.get_world_group() == group else ds_dist.get_global_rank(group, 0)
            ds_dist.broadcast(param.data.reshape(1).view(torch.uint8), source, group)
            param.partition()

    return ScalarSafeInit


@contextlib.contextmanager
def _scalar_safe_engine_broadcast() -> Iterator[None]:
    """Let DeepSpeed's engine broadcast 0-d parameters (PIIP's branch weights w1, w2 are scalars, as
    in the reference's state dict). DeepSpeed 0.19's `_broadcast_model` sends every replicated
    parameter as `p.data.view(torch.uint8)`, which torch refuses for 0-d tensors, so ZeRO-1/2 (and
    stage 3's persistent parameters) could not start. During that broadcast only, each 0-d
    parameter's data is a 1-element view of the same storage; its shape is restored right after.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    def broadcast_model(engine: Any) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for param in scalars:
            param.data = param.data.reshape(1)
        try:
            original(engine)
        finally:
            for param in scalars:
                param.data = param.data.reshape(())

    DeepSpeedEngine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> tuple[Any, Any]:
    """`deepspeed.initialize` for our models; returns (engine, optimizer)."""
    import deepspeed

    with _scalar_safe_engine_broadcast():
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


@contextlib.contextmanager
def model_construction(engine: EngineConfig, ds_config: dict) -> Iterator[None]:
    """Context in which to build the model: zero.Init for stage 3, plain construction otherwise.

    zero.Init broadcasts every new parameter from rank 0, so ranks need not share a seed for the
    model to start identical; the loop seeds them identically anyway, for stages 1/2.
    """
    if engine.zero_stage == 3 and engine.zero_init:
        with _zero_init_class()(config_dict_or_path=construction_config(ds_config)):
            yield
    else:
        yield


def partition_built_model(model: nn.Module, engine: EngineConfig, ds_config: dict) -> None:
    """ZeRO-3 without zero.Init: partition the plainly built model now, with the scalar-safe
    converter (DeepSpeed would otherwise do it inside `initialize` with its own, which fails on
    0-d parameters). A no-op for stages 1/2 and for models built under zero.Init."""
    if engine.zero_stage == 3 and not engine.zero_init:
        _zero_init_class()(module=model, config_dict_or_path=construction_config(ds_config))


def cast_partitioned_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast zero.Init-built (fp32) parameters to the training dtype, partitions and resident copies.

    DeepSpeed's engine skips its own cast for zero.Init models (it assumes they were built in the
    training dtype), so this must run before `deepspeed.initialize`.
    """
    for param in model.parameters():
        if not is_partitioned(param) or param.ds_tensor.dtype == dtype:
            continue
        param.ds_tensor.data = param.ds_tensor.data.to(dtype)
        param.data = param.data.to(dtype)  # empty placeholder, or the whole tensor if persistent


def state_bytes_per_rank(engine: Any) -> dict[str, int]:
    """Bytes this rank holds for model parameters and optimizer state (the ZeRO memory figure)."""
    # Tensors are told apart by storage, offset and size: `param.data` is a new Python object on
    # every access and its id is reused once freed, so an id-keyed count skips parameters.
    seen: set[tuple[int, int, int]] = set()

    def tensor_bytes(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if t.numel() == 0 or key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    model_bytes = 0
    for p in engine.module.parameters():
        if is_partitioned(p):  # its shard, plus the whole tensor if it is persistent
            model_bytes += tensor_bytes(p.ds_tensor)
        model_bytes += tensor_bytes(p.data)
    optim_bytes = 0
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        optim_bytes += sum(tensor_bytes(v) for v in state.values() if torch.is_tensor(v))
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        optim_bytes += sum(tensor_bytes(t) for t in getattr(engine.optimizer, attr, None) or [])
    return {"model_bytes": model_bytes, "optimizer_bytes": optim_bytes,
            "total_bytes": model_bytes + optim_bytes}