"""`piip6b export RUN_DIR [--step S] --out model.safetensors [--dtype bf16|fp32] [--backbone-only]`

Consolidates the ZeRO shards of one complete checkpoint (the fp32 master weights, through
DeepSpeed's own `zero_to_fp32` functions) into a single safetensors file. Keys follow the
reference layout: the backbone under `backbone.` exactly as in the reference's released
checkpoints (docs/SPEC.md §8), heads under their own prefixes; `--backbone-only` writes the bare backbone
keys (the reference `*.tsv` layout, loadable into `create_backbone(...)`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from piip6b.engine.checkpoint import (
    CHECKPOINTS_SUBDIR,
    CheckpointError,
    CheckpointManager,
    Manifest,
    tag_for_step,
)

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
# A backbone's state dict starts with one of these (PIIP branches / the plain-ViT baseline).
_BACKBONE_ROOT_KEYS = ("branch1.", "patch_embed.")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (or its checkpoints/ folder)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of floating-point tensors in the file (default: bf16)")
    parser.add_argument("--backbone-only", action="store_true",
                        help="write only the backbone, with bare reference keys (no 'backbone.' prefix)")


def _checkpoint_folder(run_dir: Path, step: int | None) -> Path:
    run_dir = run_dir.parent if run_dir.name == CHECKPOINTS_SUBDIR else run_dir
    manager = CheckpointManager(run_dir)
    if step is None:
        found = manager.find_resume()
        if found is None:
            raise CheckpointError(f"{run_dir} holds no complete checkpoint (expected {manager.root}/step_*)")
        return found
    path = manager.root / tag_for_step(step)
    manager.validate(path)
    return path


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


def export_checkpoint(checkpoint: Path, out: Path, dtype: torch.dtype, backbone_only: bool = False) -> dict[str, str]:
    """Consolidate `checkpoint` (a complete step_* folder) into `out`; returns the file's metadata."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from piip6b.weights import TensorInfo, write_safetensors

    manifest: Manifest = CheckpointManager.validate(checkpoint)
    # Lazy: each tensor is gathered from the rank shards only when it is written, and the writer
    # streams, so the peak memory is the fp32 shards plus one tensor, not a full second copy.
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)
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


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = _checkpoint_folder(args.run_dir, args.step)
        metadata = export_checkpoint(checkpoint, args.out, DTYPES[args.dtype], args.backbone_only)
    except CheckpointError as error:
        print(f"piip6b export: {error}", file=sys.stderr)
        return 2
    logger.info("exported %s -> %s %s", checkpoint, args.out, json.dumps(metadata))
    return 0
