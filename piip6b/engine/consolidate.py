"""From ZeRO shards to whole weights: one complete checkpoint, consolidated through DeepSpeed's own
`zero_to_fp32` functions (the fp32 master weights), exported to one safetensors file or copied
into a model for evaluation.

Export keys follow the reference layout: the backbone under `backbone.` exactly as in the
reference's released checkpoints (docs/SPEC.md §8), heads under their own prefixes; `backbone_only`
writes the bare backbone keys (the reference `*_keys.tsv` layout, loadable into `create_backbone`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from piip6b.engine.checkpoint import (
    CHECKPOINTS_SUBDIR,
    CheckpointError,
    CheckpointManager,
    Manifest,
    tag_for_step,
    weights_only_loads,
)

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
# A backbone's state dict starts with one of these (PIIP branches / the plain-ViT baseline).
_BACKBONE_ROOT_KEYS = ("branch1.", "patch_embed.")


def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A complete checkpoint folder from a run dir, its checkpoints/ folder or a step_* folder:
    the one at `step`, else the newest complete one. CheckpointError says what is wrong."""
    path = Path(path)
    run_dir = path.parent if path.name == CHECKPOINTS_SUBDIR else path
    manager = CheckpointManager(run_dir)
    if step is not None:
        folder = manager.root / tag_for_step(step)
        manager.validate(folder)
        return folder
    return manager.find_resume(explicit=path)


def lazy_fp32_state_dict(checkpoint: Path):
    """name -> fp32 tensor, each assembled from the rank shards only when it is read, so the peak
    memory is the shards plus one tensor, not a second whole copy."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():  # the shards are read (memory-mapped) here; tensors come later
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)


def find_backbone_prefix(names: list[str]) -> str | None:
    """The prefix under which the model keeps its backbone (e.g. 'backbone.' or
    'backbone.body.'), found by the backbone's own first keys; None if there is none."""
    prefixes = {
        name[: name.index(root)]
        for name in names
        for root in _BACKBONE_ROOT_KEYS
        if root in name and (name.index(root) == 0 or name[name.index(root) - 1] == ".")
    }
    return min(prefixes, key=len) if prefixes else None


def rename_to_reference(names: list[str], backbone_only: bool) -> dict[str, str]:
    """Map model key -> exported key (see the module docstring)."""
    prefix = find_backbone_prefix(names)
    if prefix is None:
        if backbone_only:
            raise CheckpointError(
                f"--backbone-only: no backbone found in the checkpoint (no key containing one of {_BACKBONE_ROOT_KEYS})"
            )
        logger.warning("no backbone keys found; exporting the model's keys unchanged")
        return {name: name for name in names}
    mapping = {}
    for name in names:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            mapping[name] = rest if backbone_only else BACKBONE_PREFIX + rest
        elif not backbone_only:
            mapping[name] = name
    return mapping


def export_checkpoint(path: str | Path, out: Path, *, step: int | None = None,
                      dtype: torch.dtype = torch.bfloat16, backbone_only: bool = False) -> dict[str, str]:
    """Consolidate one complete checkpoint (`find_checkpoint(path, step)`) into the safetensors file
    `out`, streaming; returns the file's metadata (`piip6b.source` names the checkpoint)."""
    from piip6b.weights import TensorInfo, write_safetensors

    checkpoint = find_checkpoint(path, step)
    manifest: Manifest = CheckpointManager.validate(checkpoint)
    lazy = lazy_fp32_state_dict(checkpoint)
    mapping = rename_to_reference(list(lazy), backbone_only)

    def out_dtype(source_dtype: torch.dtype) -> torch.dtype:
        return dtype if source_dtype.is_floating_point else source_dtype  # integer buffers stay exact

    header = [(new, TensorInfo(tuple(lazy[old].shape), out_dtype(lazy[old].dtype))) for old, new in mapping.items()]
    tensors = ((new, lazy[old].contiguous().to(out_dtype(lazy[old].dtype))) for old, new in mapping.items())
    metadata = {
        "piip6b.source": str(checkpoint.resolve()),
        "piip6b.step": str(manifest.step),
        "piip6b.world_size": str(manifest.world_size),
        "piip6b.zero_stage": str(manifest.zero_stage),
        "piip6b.config_hash": manifest.config_hash or "",
        "piip6b.code_version": manifest.code_version,
        "piip6b.dtype": str(dtype).removeprefix("torch."),
        "piip6b.layout": "backbone" if backbone_only else "model (backbone under 'backbone.')",
    }
    # Names are rooted at the model the file describes (the whole model, or the bare backbone).
    write_safetensors(out, header, tensors, metadata, target="")
    return metadata


def load_checkpoint_into(model: nn.Module, checkpoint: Path) -> None:
    """Copy a complete checkpoint's fp32 masters into `model` (whole, not sharded), exactly: every
    parameter must be in the checkpoint with its shape, and nothing else may be."""
    state = lazy_fp32_state_dict(checkpoint)
    expected = model.state_dict()
    parameters = dict(model.named_parameters())
    # DeepSpeed's consolidation holds parameters only; buffers keep their values.
    missing = sorted(name for name in set(expected) - set(state) if name in parameters)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match the model built from the config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. Pass the config the run was trained with"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            if name not in state:
                continue
            value = state[name].contiguous()
            if tuple(value.shape) != tuple(tensor.shape):
                raise CheckpointError(f"checkpoint {checkpoint}: {name} has shape {tuple(value.shape)}, "
                                      f"the model {tuple(tensor.shape)}")
            tensor.copy_(value)
