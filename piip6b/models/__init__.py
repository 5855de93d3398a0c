"""The PIIP model family: branches, interactions, backbones and registered presets."""

from .attention import ATTN_BACKENDS, attention, flash_attn_available
from .piip import InternViTBaseline, PIIPBackbone, PIIPSpec
from .presets import ModelConfig, build_from_spec, create_backbone, get_spec, is_full_size, list_presets

__all__ = [
    "ATTN_BACKENDS",
    "InternViTBaseline",
    "ModelConfig",
    "PIIPBackbone",
    "PIIPSpec",
    "attention",
    "build_from_spec",
    "create_backbone",
    "flash_attn_available",
    "get_spec",
    "is_full_size",
    "list_presets",
]
