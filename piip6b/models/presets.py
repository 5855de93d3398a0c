"""Registered backbone presets (docs/SPEC.md §2–3; docs/PRESETS.md: the reference config each one
follows, branch by branch) and their tiny twins for tests.

A preset is a function returning a `PIIPSpec`; `create_backbone(name, **overrides)` builds it.
Tiny presets use the same classes with small widths and depths, and keep the topology (branch
count, norm flavours, QK-norm, cls slots, windowing, uneven interaction groups) of their full preset.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn as nn

from .attention import ATTN_BACKENDS, AttnBackend
from .interaction import InteractionSpec
from .piip import InternViTBaseline, PIIPBackbone, PIIPSpec
from .vit import ViTSpec

# --- branch architectures (docs/SPEC.md §2, docs/PRESETS.md) ------------------------------------
INTERNVIT_6B = ViTSpec("internvit_6b", 3200, 48, 25, 12800, block="internvit", norm="rms", qkv_bias=False,
                       qk_norm=True, layer_scale=0.1, drop_path_rate=0.4, drop_path_schedule="linear", cls_slot=True)
VIT_H = ViTSpec("vit_h_mae", 1280, 32, 16, 5120, block="internvit", layer_scale=1.0, drop_path_rate=0.4,
                drop_path_schedule="linear", cls_slot=True)
# DeiT III `vit_models` branches; the reference builds ViT-T with the same class, so it has a layer
# scale too (init_scale=1 in every config; the DeiT-T weights have none, 1.0 is their identity).
VIT_L = ViTSpec("vit_l_deit3", 1024, 24, 16, 4096, block="deit3", drop_path_rate=0.4)
VIT_B = ViTSpec("vit_b_deit3", 768, 12, 12, 3072, block="deit3", drop_path_rate=0.15)
VIT_S = ViTSpec("vit_s_deit3", 384, 12, 6, 1536, block="deit3", drop_path_rate=0.05)
VIT_T = ViTSpec("vit_t_deit", 192, 12, 3, 768, block="deit3", drop_path_rate=0.05)

# Tiny twins: same flavour, small width/depth. Branch 1 widths stay multiples of 32 for GroupNorm(32);
# every width differs from its neighbours' so that key-layout tests see which branch is which.
TINY_6B = dataclasses.replace(INTERNVIT_6B, name="internvit_6b_tiny", embed_dim=64, depth=4, num_heads=2, mlp_dim=128,
                              pretrain_img_size=64)
TINY_H = dataclasses.replace(VIT_H, name="vit_h_mae_tiny", embed_dim=32, depth=3, num_heads=2, mlp_dim=64,
                             pretrain_img_size=64)
TINY_L = dataclasses.replace(VIT_L, name="vit_l_deit3_tiny", embed_dim=64, depth=4, num_heads=2, mlp_dim=128,
                             pretrain_img_size=64)
TINY_B = dataclasses.replace(VIT_B, name="vit_b_deit3_tiny", embed_dim=64, depth=2, num_heads=2, mlp_dim=128,
                             pretrain_img_size=64)
TINY_S = dataclasses.replace(VIT_S, name="vit_s_deit3_tiny", embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                             pretrain_img_size=64)
TINY_T = dataclasses.replace(VIT_T, name="vit_t_deit_tiny", embed_dim=16, depth=2, num_heads=2, mlp_dim=32,
                             pretrain_img_size=64)
TINY_INTERACTION = InteractionSpec(heads=4)
# interaction_proj=False, norm_layer="none" in the reference configs of H6B-speedup, LH6B and ADE20K H6B.
BARE = dict(with_proj=False, with_norm=False)


def _even_groups(depth: int, count: int) -> tuple[tuple[int, int], ...]:
    step = depth // count
    return tuple((i * step, i * step + step - 1) for i in range(count))


def _h6b_vit_h_groups() -> tuple[tuple[int, int], ...]:
    # The reference's uneven split of ViT-H's 32 blocks over 12 interactions: 4 pairs then 8 triples.
    pairs = [(2 * i, 2 * i + 1) for i in range(4)]
    triples = [(8 + 3 * i, 10 + 3 * i) for i in range(8)]
    return tuple(pairs + triples)


def _windowed(spec: ViTSpec, window: int) -> ViTSpec:
    return dataclasses.replace(spec, window_size=window)


def _fused_mlp(spec: ViTSpec) -> ViTSpec:
    """The branch as built by a reference config with mlp_type / Mlp_block = "fused_mlp"."""
    return dataclasses.replace(spec, mlp_act="gelu_tanh")


PRESETS: dict[str, Callable[[], PIIPSpec]] = {}


def register(name: str) -> Callable[[Callable[[], PIIPSpec]], Callable[[], PIIPSpec]]:
    def wrap(fn: Callable[[], PIIPSpec]) -> Callable[[], PIIPSpec]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = fn
        return fn

    return wrap


# --- full-size presets (docs/PRESETS.md: which reference config each one follows) ----------------
# Image sizes per branch, branch 1 first.
@register("internvit6b_baseline")
def internvit6b_baseline() -> PIIPSpec:
    return PIIPSpec(branches=(INTERNVIT_6B,), img_sizes=(1024,))


@register("internvit6b_baseline_ade20k")
def internvit6b_baseline_ade20k() -> PIIPSpec:
    # The ADE20K baseline config sets mlp_type="fused_mlp" (the COCO one does not), and the mmseg
    # code keeps the position table at the input grid.
    return PIIPSpec(branches=(_fused_mlp(INTERNVIT_6B),), img_sizes=(512,), pos_embed_at_input=True)


@register("piip_h6b")
def piip_h6b() -> PIIPSpec:
    return PIIPSpec(branches=(INTERNVIT_6B, VIT_H), img_sizes=(512, 1024),
                    groups=(_even_groups(48, 12), _h6b_vit_h_groups()))


@register("piip_h6b_speedup")
def piip_h6b_speedup() -> PIIPSpec:
    return dataclasses.replace(piip_h6b(), branches=(_fused_mlp(INTERNVIT_6B), _fused_mlp(VIT_H)),
                               interaction=InteractionSpec(**BARE))


@register("piip_h6b_ade20k")
def piip_h6b_ade20k() -> PIIPSpec:
    # The ADE20K H6B configs (branch 1 at 192/256/384/512, branch 2 at 512): the speedup's flags
    # (fused MLP, bare interactions) in the mmseg code, which keeps position tables at the input grid.
    return dataclasses.replace(piip_h6b_speedup(), img_sizes=(512, 512), pos_embed_at_input=True)


@register("piip_lh6b")
def piip_lh6b() -> PIIPSpec:
    vit_l_384 = dataclasses.replace(VIT_L, name="vit_l_deit3_384", pretrain_img_size=384)
    return PIIPSpec(branches=(_fused_mlp(INTERNVIT_6B), _fused_mlp(VIT_H), _fused_mlp(vit_l_384)),
                    img_sizes=(512, 1024, 1536),
                    groups=(_even_groups(48, 4), _even_groups(32, 4), _even_groups(24, 4)),
                    interaction=InteractionSpec(**BARE))


@register("piip_tsb")
def piip_tsb() -> PIIPSpec:
    return PIIPSpec(branches=(_windowed(VIT_B, 14), _windowed(VIT_S, 14), _windowed(VIT_T, 14)),
                    img_sizes=(672, 1120, 1568), groups=(_even_groups(12, 12),) * 3)


@register("piip_sbl")
def piip_sbl() -> PIIPSpec:
    return PIIPSpec(branches=(_windowed(VIT_L, 28), _windowed(VIT_B, 28), _windowed(VIT_S, 28)),
                    img_sizes=(672, 896, 1568),
                    groups=(_even_groups(24, 12), _even_groups(12, 12), _even_groups(12, 12)))


def _tsbl(branch4: ViTSpec) -> PIIPSpec:
    return PIIPSpec(branches=(_windowed(VIT_L, 28), _windowed(VIT_B, 28), _windowed(VIT_S, 28), _windowed(branch4, 28)),
                    img_sizes=(448, 1120, 1568, 1792),
                    groups=(_even_groups(24, 12),) + (_even_groups(12, 12),) * 3)


@register("piip_tsbl")
def piip_tsbl() -> PIIPSpec:
    # As released: the reference's 4-branch class builds branch 4 from branch 3's settings
    # (`vit_models(**branch3)`), a ViT-S on the largest image; the released checkpoints hold that.
    return _tsbl(VIT_S)


@register("piip_tsbl_vit_t")
def piip_tsbl_vit_t() -> PIIPSpec:
    # As described in the paper (and in the reference config's branch4 dict): ViT-T as branch 4.
    return _tsbl(VIT_T)


# --- tiny twins: same topology, small widths; used by tests and the CPU demo -------------------
@register("internvit6b_baseline_tiny")
def internvit6b_baseline_tiny() -> PIIPSpec:
    return PIIPSpec(branches=(TINY_6B,), img_sizes=(64,))


@register("internvit6b_baseline_ade20k_tiny")
def internvit6b_baseline_ade20k_tiny() -> PIIPSpec:
    return PIIPSpec(branches=(_fused_mlp(TINY_6B),), img_sizes=(64,), pos_embed_at_input=True)


@register("piip_h6b_tiny")
def piip_h6b_tiny() -> PIIPSpec:
    # 6B blocks in pairs against H blocks [0], [1-2]: uneven groups and a fractional skip stride (4/3).
    return PIIPSpec(branches=(TINY_6B, TINY_H), img_sizes=(64, 128),
                    groups=(((0, 1), (2, 3)), ((0, 0), (1, 2))), interaction=TINY_INTERACTION)


@register("piip_h6b_speedup_tiny")
def piip_h6b_speedup_tiny() -> PIIPSpec:
    return dataclasses.replace(piip_h6b_tiny(), branches=(_fused_mlp(TINY_6B), _fused_mlp(TINY_H)),
                               interaction=dataclasses.replace(TINY_INTERACTION, **BARE))


@register("piip_h6b_ade20k_tiny")
def piip_h6b_ade20k_tiny() -> PIIPSpec:
    return dataclasses.replace(piip_h6b_speedup_tiny(), img_sizes=(96, 128), pos_embed_at_input=True)


@register("piip_lh6b_tiny")
def piip_lh6b_tiny() -> PIIPSpec:
    tiny_l = dataclasses.replace(TINY_L, depth=2, embed_dim=48, pretrain_img_size=96)
    tiny_h = dataclasses.replace(TINY_H, depth=2)
    return PIIPSpec(branches=(_fused_mlp(TINY_6B), _fused_mlp(tiny_h), _fused_mlp(tiny_l)), img_sizes=(64, 128, 192),
                    groups=(_even_groups(4, 2), _even_groups(2, 2), _even_groups(2, 2)),
                    interaction=dataclasses.replace(TINY_INTERACTION, **BARE))


@register("piip_tsb_tiny")
def piip_tsb_tiny() -> PIIPSpec:
    # Sizes in the ratio 3:5:7 of the full preset; window 4 forces padded windows (grids 6/10/14).
    return PIIPSpec(branches=(_windowed(TINY_B, 4), _windowed(TINY_S, 4), _windowed(TINY_T, 4)),
                    img_sizes=(96, 160, 224), groups=(_even_groups(2, 2),) * 3, interaction=TINY_INTERACTION)


@register("piip_sbl_tiny")
def piip_sbl_tiny() -> PIIPSpec:
    return PIIPSpec(branches=(_windowed(TINY_L, 4), _windowed(TINY_B, 4), _windowed(TINY_S, 4)),
                    img_sizes=(96, 128, 224),
                    groups=(_even_groups(4, 2), _even_groups(2, 2), _even_groups(2, 2)), interaction=TINY_INTERACTION)


def _tsbl_tiny(branch4: ViTSpec) -> PIIPSpec:
    return PIIPSpec(branches=(_windowed(TINY_L, 4), _windowed(TINY_B, 4), _windowed(TINY_S, 4), _windowed(branch4, 4)),
                    img_sizes=(64, 160, 224, 256),
                    groups=(_even_groups(4, 2),) + (_even_groups(2, 2),) * 3, interaction=TINY_INTERACTION)


@register("piip_tsbl_tiny")
def piip_tsbl_tiny() -> PIIPSpec:
    return _tsbl_tiny(TINY_S)


@register("piip_tsbl_vit_t_tiny")
def piip_tsbl_vit_t_tiny() -> PIIPSpec:
    return _tsbl_tiny(TINY_T)


def list_presets() -> list[str]:
    return sorted(PRESETS)


TINY_SUFFIX = "_tiny"


def is_full_size(name: str) -> bool:
    """Every registered preset is full-size, one of the paper's models meant to start from
    pretrained weights, except the tiny twins (named `<preset>_tiny`, a few million parameters at
    most), which tests and the CPU demo train from random initialisation."""
    get_spec(name)  # unknown names raise with the list of presets
    return not name.endswith(TINY_SUFFIX)


def get_spec(
    name: str,
    img_sizes: Sequence[int] | None = None,
    drop_path_rate: float | None = None,
    interaction_drop_path_rate: float | None = None,
) -> PIIPSpec:
    """The preset's spec with overrides: `img_sizes` per branch (branch 1 first), the branches'
    stochastic-depth rate and the interactions' FFN drop-path rate."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown backbone preset {name!r}.{hint} Known presets: {', '.join(list_presets())}")
    spec = PRESETS[name]()
    if img_sizes is not None:
        img_sizes = tuple(int(s) for s in img_sizes)
        if len(img_sizes) != len(spec.branches):
            raise ValueError(f"preset {name!r} has {len(spec.branches)} branches; img_sizes {img_sizes} must give one size per branch (branch 1 first)")
        spec = dataclasses.replace(spec, img_sizes=img_sizes)
    if drop_path_rate is not None:
        spec = dataclasses.replace(spec, branches=tuple(dataclasses.replace(b, drop_path_rate=drop_path_rate) for b in spec.branches))
    if interaction_drop_path_rate is not None:
        spec = dataclasses.replace(spec, interaction=dataclasses.replace(spec.interaction, drop_path_rate=interaction_drop_path_rate))
    return spec


def build_from_spec(spec: PIIPSpec, attn_backend: AttnBackend = "auto") -> nn.Module:
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {attn_backend!r}; choose one of {ATTN_BACKENDS}")
    cls = InternViTBaseline if len(spec.branches) == 1 else PIIPBackbone
    return cls(spec, attn_backend)


def create_backbone(
    name: str,
    img_sizes: Sequence[int] | None = None,
    drop_path_rate: float | None = None,
    interaction_drop_path_rate: float | None = None,
    attn_backend: AttnBackend = "auto",
) -> nn.Module:
    """Build a registered preset. The device comes from the caller's context
    (`with torch.device("meta"):` builds without memory)."""
    return build_from_spec(get_spec(name, img_sizes, drop_path_rate, interaction_drop_path_rate), attn_backend)


@dataclass
class ModelConfig:
    """The `model:` section of an experiment config."""

    preset: str = "piip_h6b"
    img_sizes: list[int] | None = None  # per branch, branch 1 first; None: the preset's
    drop_path_rate: float | None = None
    interaction_drop_path_rate: float | None = None
    grad_checkpointing: int = 0  # 0: off; k: every k-th block of each branch
    checkpoint_interactions: bool = False
    attn_backend: AttnBackend = "auto"
    pretrained: dict[str, str] | None = None  # branch name ("branch1", ...) or "backbone" -> weights file
    # A full-size preset (`is_full_size`) trains only from `pretrained` weights unless this says the
    # random initialisation is meant: the pre-flight refuses a 6B run that forgot its weights.
    from_scratch: bool = False

    def __post_init__(self) -> None:
        if self.from_scratch and self.pretrained:
            raise ValueError("model.from_scratch is true but model.pretrained is set: keep one of them")
        if self.grad_checkpointing < 0:
            raise ValueError(f"model.grad_checkpointing must be >= 0 (0: off, k: every k-th block), got {self.grad_checkpointing}")

    def __post_init__(self) -> None:
        if self.img_sizes is not None:
            patches = [branch.patch_size for branch in get_spec(self.preset).branches]
            if len(self.img_sizes) == len(patches) and any(
                    size < 1 or size % patch for size, patch in zip(self.img_sizes, patches)):
                raise ValueError(f"model.img_sizes must be positive multiples of each branch's patch size "
                                 f"{patches}, got {list(self.img_sizes)}")
        for name in ("drop_path_rate", "interaction_drop_path_rate"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"model.{name} must lie in [0, 1), got {value}")
        if self.grad_checkpointing < 0:
            raise ValueError(f"model.grad_checkpointing must be >= 0 (0: off), got {self.grad_checkpointing}")

    def build(self) -> nn.Module:
        backbone = create_backbone(self.preset, self.img_sizes, self.drop_path_rate,
                                   self.interaction_drop_path_rate, self.attn_backend)  # type: ignore[arg-type]
        if self.grad_checkpointing or self.checkpoint_interactions:
            backbone.set_grad_checkpointing(self.grad_checkpointing, self.checkpoint_interactions)
        return backbone
