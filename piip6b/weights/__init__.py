"""Pretrained and released weights in, this project's safetensors out.

    report = load_pretrained(backbone, "intern_vit_6b_224px.pth", target="branch1")
    load_pretrained_branches(backbone, {"branch1": "intern_vit_6b_224px.pth",
                                        "branch2": "mae_pretrain_vit_huge.pth"})
    for name, tensor in iter_converted(path, spec_or_model, target="branch1"): ...  # ZeRO-3 feeding
    write_safetensors(out, header, tensors, metadata)  /  save_state_dict(out, state_dict, metadata)

Loads are exact (every key accounted for, one printed report), validated before anything is
modified, never unpickle code, and stream from memory maps tensor by tensor.
"""

from .export import file_sha256, save_state_dict, write_safetensors
from .formats import TensorInfo, WeightSource, WeightsFormatError, open_source
from .layouts import LAYOUTS, detect_layout
from .loader import (
    LoadPlan,
    LoadReport,
    WeightsLoadError,
    iter_converted,
    load_pretrained,
    load_pretrained_branches,
    plan_load,
    plan_sources,
    target_spec,
)

__all__ = [
    "LAYOUTS",
    "LoadPlan",
    "LoadReport",
    "TensorInfo",
    "WeightSource",
    "WeightsFormatError",
    "WeightsLoadError",
    "detect_layout",
    "file_sha256",
    "iter_converted",
    "load_pretrained",
    "load_pretrained_branches",
    "open_source",
    "plan_load",
    "plan_sources",
    "save_state_dict",
    "target_spec",
    "write_safetensors",
]
