"""Convert one weight file into this project's (the reference's) key layout for a backbone, as ONE
safetensors file.

Sources: a pretrained file (InternViT-6B release or Hugging Face layout, MAE, DeiT, DeiT III), a
released PIIP checkpoint (mmdetection / DeepSpeed) or one of our own files. The preset is built on
the meta device (no memory); tensors stream from the source's memory map to the output, so
converting the 12 GB 6B file needs about one tensor of extra memory. The output's metadata records
the preset, the source, its sha256, the format read, every conversion and the hash of the output.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .export import file_sha256, write_safetensors
from .formats import TensorInfo, open_source
from .layouts import get_layout
from .loader import ModelLike, WeightsLoadError, plan_load, target_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _default_target(layout_full_names: bool, spec: dict) -> str | None:
    if layout_full_names:
        return None
    branches = sorted({k.split(".")[0] for k in spec if re.match(r"branch\d+\.", k)})
    if branches:
        raise WeightsLoadError(f"a single pretrained ViT fills one branch; pass --target (one of {', '.join(branches)})")
    return None


def convert_file(
    source: str | Path,
    model: ModelLike,
    out: str | Path,
    *,
    preset: str,
    target: str | None = None,
    format: str = "auto",
    dtype: str = "source",
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    hash_source: bool = True,
    log: Callable[[str], object] | None = print,
) -> str:
    """Validate `source` against `model` (the backbone of `preset`, best built on the meta device;
    target: the module the file fills, e.g. "branch1"; default the whole backbone, or the subtree
    recorded in one of our own files), then stream it into `out`. `dtype` "source" keeps each
    tensor's dtype from the file (resizes computed in fp32). Returns the sha256 of the output's
    tensor data. WeightsLoadError / WeightsFormatError name any problem."""
    spec = target_spec(model)
    out_dtype = DTYPES.get(dtype)
    with open_source(source) as src:
        layout = get_layout(format, src)
        if target is None:
            target = (src.metadata.get("piip6b.target") or None) if layout.name == "piip6b" else \
                _default_target(layout.full_names, spec)
        plan = plan_load(src, spec, target=target, format=layout.name,
                         allow_missing=allow_missing, allow_unexpected=allow_unexpected)
        if log is not None:
            log(plan.report.summary())

        def out_dtype_of(entry) -> torch.dtype:
            if out_dtype is not None:
                return out_dtype
            return src.info(entry.source).dtype if entry.source is not None else entry.dst.dtype

        header = [(e.target, TensorInfo(e.dst.shape, out_dtype_of(e))) for e in plan.entries]
        dtypes = dict(header)
        tensors = ((name, tensor.to(dtypes[name].dtype)) for name, tensor in plan.tensors(cast=False))
        report = plan.report
        metadata = {
            "piip6b.kind": "converted",
            "piip6b.preset": preset,
            "piip6b.source": str(Path(source).resolve()),
            "piip6b.source_format": layout.name,
            "piip6b.source_container": src.container or "",
            "piip6b.source_sha256": file_sha256(src.path) if hash_source else "",
            "piip6b.conversions": json.dumps({
                "resized": [[n, list(a), list(b), "bicubic"] for n, a, b in report.resized],
                "filled": [[n, why] for n, why in report.filled],
                "renamed": [[a, b, why] for a, b, why in report.renamed],
                "ignored": [[n, why] for n, why in report.ignored],
                "missing_allowed": report.missing,
                "unexpected_allowed": report.unexpected,
                "dtype": dtype,
            }),
        }
        return write_safetensors(out, header, tensors, metadata, target=target or "")
