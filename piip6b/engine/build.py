"""Engine assembly: from an experiment config and a task to a DeepSpeed engine, in the one order
that works. `piip6b.train`, the benchmarks and the tests all build through `build_engine`.

1. The process-wide CUDA settings are made (`devices.configure_performance`), and every rank seeds
   the same way, so modules that stay whole (stages 1/2, persistent parameters) start identical.
2. The DeepSpeed config is derived once from the typed config; it is the only place the ZeRO stage
   is decided (`EngineConfig` refuses a second source in `deepspeed_overrides`).
3. ZeRO-3: the model is constructed under zero.Init, in fp32, so no rank ever holds it whole and
   the initialisers draw in fp32; without zero.Init it is partitioned right after construction.
4. Pretrained weights stream into the partitions (validated first, `plan_sources`' coverage rule).
5. The fp32 partitions are cast to bf16 (DeepSpeed skips this cast for zero.Init-built models).
6. With `performance.compile: blocks`, the backbone's repeated blocks are compiled (and made ZeRO-3
   leaves, which `deepspeed.initialize` must see).
7. Layer-decay parameter groups and AdamW, then `deepspeed.initialize`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from piip6b import dist
from piip6b.devices import configure_performance
from piip6b.engine import optim, sharding
from piip6b.engine.compile import compile_blocks
from piip6b.seeding import seed_everything

if TYPE_CHECKING:
    from piip6b.config import ExperimentConfig
    from piip6b.engine.distributed import DistEnv
    from piip6b.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's images are split: per rank, per forward, across ranks."""

    micro_batch: int  # images per rank per forward
    grad_accum: int  # forwards per optimizer step
    world_size: int

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def samples_per_forward(self) -> int:
        """Images consumed by one forward of every rank (the sampler's stride)."""
        return self.micro_batch * self.world_size

    @classmethod
    def derive(cls, world_size: int, *, global_batch: int | None, max_micro_batch: int,
               grad_accum: int | None = None) -> BatchLayout:
        """The one rule from a recipe to a layout (torchtitan's global batch, mmdet's 16 images).

        With a `global_batch`, every rank takes ceil(global_batch / world_size) images per step,
        so the global batch is kept exactly where the world size divides it and otherwise becomes
        the next multiple of the world size (64 ranks cannot share 16 images: at least 64). Those
        images are split into the fewest forwards of at most `max_micro_batch` each that divide them
        evenly, unless `grad_accum` pins the number of forwards. Without a `global_batch` the
        layout is pinned by hand: `max_micro_batch` images per forward, `grad_accum` (or 1) forwards.
        """
        if world_size < 1 or max_micro_batch < 1 or (grad_accum is not None and grad_accum < 1):
            raise ValueError(f"world size, micro-batch and accumulation must be >= 1, got "
                             f"{world_size}, {max_micro_batch}, {grad_accum}")
        if global_batch is None:
            return cls(max_micro_batch, grad_accum or 1, world_size)
        if global_batch < 1:
            raise ValueError(f"data.global_batch must be >= 1, got {global_batch}")
        per_rank = -(-global_batch // world_size)
        if grad_accum is None:
            grad_accum = next(a for a in range(-(-per_rank // max_micro_batch), per_rank + 1) if per_rank % a == 0)
        elif per_rank % grad_accum:
            raise ValueError(
                f"engine.grad_accum_steps={grad_accum} does not divide the {per_rank} images per rank that "
                f"data.global_batch={global_batch} needs on {world_size} ranks: unset it (derived) or use a divisor")
        micro = per_rank // grad_accum
        if micro > max_micro_batch:
            raise ValueError(
                f"engine.grad_accum_steps={grad_accum} makes micro-batches of {micro} images (data.global_batch="
                f"{global_batch} on {world_size} ranks), more than data.batch_size={max_micro_batch}: unset "
                "engine.grad_accum_steps (derived) or raise data.batch_size")
        return cls(micro, grad_accum, world_size)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, world_size: int) -> BatchLayout:
        return cls.derive(world_size, global_batch=cfg.data.global_batch, max_micro_batch=cfg.data.batch_size,
                          grad_accum=cfg.engine.grad_accum_steps)


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine; calling it runs the task model's forward
    optimizer: Any  # DeepSpeed's wrapper around the AdamW below
    model: nn.Module  # the task model (backbone + heads) the engine wraps
    backbone: nn.Module
    param_groups: list[optim.ParamGroupInfo]
    ds_config: dict
    batch: BatchLayout


def build_engine(
    cfg: ExperimentConfig,
    task: Task,
    env: DistEnv,
    *,
    build_backbone: Callable[[], nn.Module] | None = None,
) -> BuiltEngine:
    """Build, shard, initialise from pretrained weights and wrap the task's model (collective).

    `build_backbone` replaces `cfg.model.build` (a benchmark's non-preset backbone); everything
    else comes from `cfg`: engine, optimiser, micro-batch, seed and `cfg.model.pretrained`.
    """
    batch = BatchLayout.from_config(cfg, env.world_size)
    configure_performance(env.device, cfg.performance)
    seed_everything(cfg.seed)
    ds_config = sharding.deepspeed_config(cfg.engine, cfg.optim, batch.micro_batch, batch.world_size, batch.grad_accum)
    with sharding.model_construction(cfg.engine, ds_config):
        backbone = (build_backbone or cfg.model.build)()
        model = task.build_model(backbone)
    sharding.partition_built_model(model, cfg.engine, ds_config)
    if cfg.model.pretrained:
        load_pretrained_sharded(backbone, cfg.model.pretrained)
    if cfg.engine.bf16:
        sharding.cast_partitioned_params(model, torch.bfloat16)
    if cfg.performance.compile == "blocks":
        compile_blocks(backbone.repeated_blocks(), zero_stage=cfg.engine.zero_stage,
                       backend=cfg.performance.compile_backend)
    groups, infos = optim.build_param_groups(model, backbone, cfg.optim)
    engine, optimizer = sharding.initialize(model, optim.build_optimizer(groups, cfg.optim), ds_config)
    return BuiltEngine(engine, optimizer, model, backbone, infos, ds_config, batch)


def load_pretrained_sharded(
    backbone: nn.Module,
    sources: Mapping[str, str],
    *,
    allow_missing: Iterable[str] = (),
) -> None:
    """Stream weight files into the backbone's (possibly ZeRO-3 partitioned) parameters.

    `sources` maps a branch name ("branch1", ...) or "backbone" to a file. All files are validated
    against the partitioned shapes before the first tensor moves (`plan_sources`: exact per file,
    no parameter given twice, together covering every parameter that is not new by construction
    unless `allow_missing` names it), and rank 0 prints each file's report. Then tensors are
    copied one module at a time: host memory holds one pretrained tensor plus one gathered
    parameter. Every rank reads the files (every rank must walk the same parameters for the
    gathers); rank 0's values are what gets scattered. Collective.
    """
    plans = plan_pretrained(backbone, sources, allow_missing=allow_missing)
    params = dict(backbone.named_parameters())
    buffers = dict(backbone.named_buffers())
    try:
        for plan in plans:
            if dist.is_main():
                log.info("%s", plan.report.summary())
            for name, tensor in plan.tensors():
                param = params.get(name)
                if param is None:  # a buffer: never partitioned
                    buffers[name].copy_(tensor.to(buffers[name].dtype))
                    continue
                with dist.gathered([param], modifier_rank=0), torch.no_grad():
                    if dist.is_main() or not dist.is_partitioned(param):
                        param.data.copy_(tensor.to(param.dtype))
    finally:
        for plan in plans:
            plan.close()


def plan_pretrained(backbone: nn.Module, sources: Mapping[str, str], *, allow_missing: Iterable[str] = ()) -> list:
    """The weights loader's plans for `model.pretrained` (`plan_sources`: file headers only, no tensor
    read), for a backbone built, partitioned or on the meta device. The caller closes the plans."""
    from piip6b.weights import plan_sources

    for target in sources:
        if target != "backbone" and not isinstance(getattr(backbone, target, None), nn.Module):
            raise ValueError(f"model.pretrained names {target!r}, which the backbone does not have "
                             f"(use 'backbone' or a branch name such as 'branch1')")
    return plan_sources(dict(sources), backbone, allow_missing=allow_missing)
