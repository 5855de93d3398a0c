"""The start-up summary: what a run is about to do, once, before it does it.

Rank 0 prints it when training starts and `piip6b check` prints it (or, with --json, its facts) on a
login node. It is built from the resolved recipe and what the pre-flight found (`piip6b.preflight`),
so it shows what will actually run: the batch split for this world size, the lr after its scaling
rule, the schedule in samples and steps, the engine layout (and which settings the planner chose),
the attention kernels this device uses, the precision, the data and the weight files with hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from piip6b.config import ExperimentConfig
    from piip6b.preflight import Findings
    from piip6b.recipe import Recipe

GB = 1e9


@dataclass
class StartupSummary:
    facts: dict[str, Any]  # JSON data (`piip6b check --json`)
    lines: list[str]  # the printed form
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines + [f"warning: {w}" for w in self.warnings])

    def to_dict(self) -> dict[str, Any]:
        return {**self.facts, "warnings": list(self.warnings)}


def _tag(origin: str) -> str:
    return "" if origin in ("recipe", "pinned") else f" ({origin})"


def startup_summary(cfg: ExperimentConfig, recipe: Recipe, findings: Findings) -> StartupSummary:
    """The summary of `cfg` resolved as `recipe`, with what the pre-flight found."""
    from piip6b.recipe import describe_lr

    batch, origins = recipe.batch, recipe.origins
    sched = cfg.schedule
    length = f"{sched.max_iters:,} iterations of {recipe.recipe_batch or recipe.global_batch}" if sched.max_iters \
        else f"{sched.max_epochs} epochs of {recipe.dataset_size:,}"
    ckpt = cfg.model.grad_checkpointing
    checkpointing = ("off" if not ckpt else "every block" if ckpt == 1 else f"every {ckpt}th block") + (
        " + interactions" if cfg.model.checkpoint_interactions else "")
    hpz = cfg.engine.hpz_partition_size
    precision = ("bf16 weights and activations, fp32 master weights and AdamW state, fp32 losses"
                 if cfg.engine.bf16 else "fp32")
    recipe_batch = (f"data.global_batch={recipe.recipe_batch}" if recipe.recipe_batch is not None
                    else "pinned: data.batch_size x engine.grad_accum_steps x ranks")
    facts: dict[str, Any] = {
        "name": cfg.name,
        "run_dir": cfg.run_dir,
        **recipe.to_dict(),
        "nodes": findings.nodes,
        "zero_stage": cfg.engine.zero_stage,
        "hpz_partition_size": hpz,
        "activation_checkpointing": checkpointing,
        "attention_backend": findings.attention,
        "deform_attn_kernel": findings.deform_kernel,
        "device": findings.device,
        "precision": precision,
        "from_plan": list(findings.planned),
        "pretrained": [w.to_dict() for w in findings.weights],
        "from_scratch": cfg.model.from_scratch,
        "data": findings.data,
        "resume_from": findings.resume_from,
        "checkpoint_bytes": findings.checkpoint_bytes,
        "free_disk_bytes": findings.free_disk_bytes,
        "memory": findings.memory,
    }
    lines = [
        f"{cfg.name}: {recipe.world_size} rank(s) on {findings.nodes} node(s), {findings.device}; run dir {cfg.run_dir}",
        f"  batch     {recipe.global_batch} images per step{_tag(origins['global_batch'])} = {recipe.world_size} "
        f"rank(s) x {batch.micro_batch} per forward{_tag(origins['micro_batch'])} x {batch.grad_accum} "
        f"accumulation step(s){_tag(origins['grad_accum'])}   [{recipe_batch}]",
        f"  lr        {describe_lr(recipe)}",
        f"  schedule  {sched.policy}, {length} = {recipe.total_samples:,} samples = {recipe.total_steps:,} steps; "
        f"warm-up {recipe.warmup_samples:,} samples ({-(-recipe.warmup_samples // recipe.global_batch):,} steps)",
        f"  engine    ZeRO-{cfg.engine.zero_stage}{_tag(origins['zero_stage'])}, hpZ "
        f"{hpz if hpz > 1 else 'off'}{_tag(origins['hpz_partition_size'])}, activation checkpointing "
        f"{checkpointing}{_tag(origins['grad_checkpointing'])}; {precision}",
        f"  kernels   attention {findings.attention} (model.attn_backend={cfg.model.attn_backend}), deformable "
        f"attention {findings.deform_kernel}, on {findings.device}",
        f"  model     {cfg.model.preset} {list(cfg.model.img_sizes) if cfg.model.img_sizes else '(preset sizes)'}",
    ]
    if findings.weights:
        lines += [f"  weights   {w.target}: {w.path} [{w.format}] sha256 {w.sha256} (of the {w.hash_of})"
                  for w in findings.weights]
    else:
        lines.append("  weights   none: random initialisation" + (" (model.from_scratch=true)" if cfg.model.from_scratch
                                                                   else " (a tiny preset)"))
    for split, counts in findings.data.get("splits", {}).items():
        annotations = f", {counts['annotations']:,} annotations" if counts.get("annotations") is not None else ""
        lines.append(f"  data      {split}: {counts['images']:,} images{annotations}"
                     + (f" ({findings.data['root']})" if findings.data.get("root") else ""))
    lines.append(f"  resume    {findings.resume_from or 'no checkpoint: a fresh start'}")
    lines.append(f"  disk      {findings.free_disk_bytes / GB:,.1f} GB free; a checkpoint is ~{findings.checkpoint_bytes / GB:,.2f}"
                 f" GB, {cfg.checkpoint.keep_last or 'all'} kept")
    lines.append(f"  memory    {findings.memory['note']}")
    lines.append(f"  watch     {cfg.run_dir}/train.log, tensorboard --logdir {cfg.run_dir}/tb")
    if findings.planned:
        lines.append(f"  plan      engine.plan=auto set {', '.join(findings.planned)}")
    return StartupSummary(facts, lines, list(recipe.warnings) + list(findings.warnings))
