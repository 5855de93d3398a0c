"""Key layouts of the weight files this project loads, and how their names map onto ours.

Our names are the reference's (`tests/fixtures/reference/*.tsv.gz`): a ViT branch is
`pos_embed`, `patch_embed.proj.{weight,bias}`, `blocks.N.{norm1, attn.qkv, attn.proj,
attn.q_norm, attn.k_norm, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}.*` for InternViT-6B and
ViT-H branches, and `blocks.N.{gamma_1, gamma_2, norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}` for DeiT III / DeiT branches (ViT-L/B/S/T).

Every layout says, per source key, one of: the name it becomes (relative to the module it is
loaded into), that it is known and deliberately not loaded (with the reason, which the report
prints), or nothing (an unexpected key: an error). Names were read from the releasing code:
- InternVL release `intern_vit_6b_224px.pth` (InternVL `classification/models/intern_vit_6b.py`):
  `pos_embed` (1, 1+16², 3200), `patch_embed.proj.*` (kernel 14), `cls_token`, `blocks.N.*` with
  `ls1.gamma`/`ls2.gamma` and RMSNorm `attn.q_norm`/`attn.k_norm`; possibly `clip_projector.*`,
  `norm.*`, `head.*`; optionally nested under `module`.
- Hugging Face OpenGVLab/InternViT-6B-224px (`modeling_intern_vit.py`): `embeddings.class_embedding`,
  `embeddings.patch_embedding.{weight,bias}`, `embeddings.position_embedding`,
  `encoder.layers.N.{attn.qkv, attn.proj, attn.q_norm, attn.k_norm, mlp.fc1, mlp.fc2, norm1, norm2}`
  and bare parameters `encoder.layers.N.ls1` / `ls2`.
- MAE `mae_pretrain_vit_huge.pth` and DeiT `deit_tiny_patch16_224-*.pth` (timm names under
  `model`, no layer scale), DeiT-III `deit_3_*.pth` (layer scale as `blocks.N.gamma_1/gamma_2`).
- Released PIIP checkpoints: mmdetection 2.x (`state_dict`) or DeepSpeed (`module`) holding
  `backbone.<reference names>` and detector/segmentor heads.
- This project's safetensors (metadata `piip6b.format`): our names as written. Format "1" files
  (and engine checkpoints of that time) were written before every preset followed the reference's
  names; `LEGACY_RENAMES` maps them (see there), and each rename is listed in the load report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .formats import WeightSource, WeightsFormatError


@dataclass(frozen=True)
class Ignored:
    reason: str


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    renames: tuple[tuple[str, str], ...]  # (regex, replacement): first full match wins
    ignores: tuple[tuple[str, str], ...] = ()  # (regex, reason)
    # The source network had no layer scale: fill the target's ls gammas with the identity (1.0).
    fills_layer_scale: bool = False
    # Names are whole-backbone (or whole-model) names rather than one branch's.
    full_names: bool = False
    _compiled: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Ignores first: a catch-all rename (full-name layouts) must not swallow a known head key.
        self._compiled.extend((re.compile(p), Ignored(why)) for p, why in self.ignores)
        self._compiled.extend((re.compile(p), r) for p, r in self.renames)

    def map_key(self, key: str) -> str | Ignored | None:
        for pattern, action in self._compiled:
            if pattern.fullmatch(key):
                return action if isinstance(action, Ignored) else pattern.sub(action, key)
        return None


_VIT_TIMM = (
    (r"pos_embed", r"pos_embed"),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|attn\.q_norm|attn\.k_norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
     r"blocks.\1.\2.\3"),
    (r"blocks\.(\d+)\.(ls[12])\.gamma", r"blocks.\1.\2.gamma"),
    (r"blocks\.(\d+)\.(gamma_[12])", r"blocks.\1.\2"),  # DeiT III layer scale
)
_CLS = (r"cls_token", "cls token: PIIP branches use no cls token")
_CLS_HEAD = (
    _CLS,
    (r"(norm|fc_norm)\.(weight|bias)", "final norm of the classifier: PIIP branches end at the last block"),
    (r"head\.(weight|bias)", "classification head"),
)
_HEAD_PREFIXES = (
    r"(neck|rpn_head|roi_head|bbox_head|mask_head|decode_head|auxiliary_head|query_head|dn_query_generator)\..+",
    "detector/segmentor head of the release: this project's heads are built fresh with their own names",
)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "internvit_release",
            "InternViT-6B as released with InternVL (intern_vit_6b_224px.pth)",
            renames=_VIT_TIMM,
            ignores=_CLS_HEAD + ((r"clip_projector\..+", "InternVL-C attention-pooling projector, not part of the ViT"),),
        ),
        Layout(
            "internvit_hf",
            "InternViT-6B in the Hugging Face layout (OpenGVLab/InternViT-6B-224px safetensors)",
            renames=(
                (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
                (r"embeddings\.position_embedding", r"pos_embed"),
                (r"encoder\.layers\.(\d+)\.(ls[12])", r"blocks.\1.\2.gamma"),
                (r"encoder\.layers\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|attn\.q_norm|attn\.k_norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
                 r"blocks.\1.\2.\3"),
            ),
            ignores=((r"embeddings\.class_embedding", "cls token: PIIP branches use no cls token"),),
        ),
        Layout(
            "mae",
            "MAE ViT (mae_pretrain_vit_*.pth, timm names, no layer scale)",
            renames=_VIT_TIMM,
            ignores=_CLS_HEAD + (
                (r"mask_token", "MAE pre-training mask token"),
                (r"decoder_.+", "MAE pre-training decoder"),
            ),
            fills_layer_scale=True,
        ),
        Layout(
            "deit3",
            "DeiT III ViT (deit_3_*.pth, layer scale as gamma_1/gamma_2)",
            renames=_VIT_TIMM,
            ignores=_CLS_HEAD,
        ),
        Layout(
            "deit",
            "DeiT ViT (deit_*_patch16_*.pth, timm names, no layer scale)",
            renames=_VIT_TIMM,
            ignores=_CLS_HEAD + (
                (r"dist_token", "distillation token"),
                (r"head_dist\.(weight|bias)", "distillation head"),
            ),
            fills_layer_scale=True,
        ),
        Layout(
            "piip_release",
            "released PIIP checkpoint (mmdetection 2.x 'state_dict' or DeepSpeed 'module'; reference names)",
            renames=((r"(.+)", r"\1"),),
            ignores=(_HEAD_PREFIXES,),
            full_names=True,
        ),
        Layout(
            "piip6b",
            "this project's safetensors (reference names)",
            renames=((r"(.+)", r"\1"),),
            full_names=True,
        ),
    )
}

PIIP6B_FORMAT_KEY = "piip6b.format"  # safetensors metadata key marking this project's files
PIIP6B_TARGET_KEY = "piip6b.target"  # module path the file's names are rooted at ("" = model root)
_WHOLE_BACKBONE = re.compile(r"(backbone\.)?(branch\d+\.|interactions\.|merge_branch\d+\.|fpn\d+\.|up\d+\.)")


def detect_layout(source: WeightSource) -> Layout:
    """Guess the layout from key names (and this project's metadata). Pass `format=` to override."""
    keys = source.keys()
    if PIIP6B_FORMAT_KEY in source.metadata:
        return LAYOUTS["piip6b"]
    present = set(keys)
    if any(k.startswith(("embeddings.patch_embedding.", "encoder.layers.")) for k in keys):
        return LAYOUTS["internvit_hf"]
    if any(k.startswith("backbone.") or _WHOLE_BACKBONE.match(k) for k in keys):
        return LAYOUTS["piip_release"]
    if "blocks.0.attn.q_norm.weight" in present:
        return LAYOUTS["internvit_release"]
    if "blocks.0.gamma_1" in present:
        return LAYOUTS["deit3"]
    if "mask_token" in present or any(k.startswith("decoder_") for k in keys):
        return LAYOUTS["mae"]
    if "blocks.0.attn.qkv.weight" in present and "patch_embed.proj.weight" in present:
        kernel = source.info("patch_embed.proj.weight").shape[-1]
        # MAE ViT-H/L/B are patch-14/16 without layer scale like DeiT; ViT-H (the only MAE this
        # project uses) is the patch-14 one.
        return LAYOUTS["mae" if kernel == 14 else "deit"]
    raise WeightsFormatError(
        f"{source.path}: unrecognised key layout (first keys: {keys[:6]}). Pass the format explicitly, "
        f"one of {sorted(LAYOUTS)}."
    )


def get_layout(name: str | None, source: WeightSource) -> Layout:
    if name is None or name == "auto":
        return detect_layout(source)
    if name not in LAYOUTS:
        raise WeightsFormatError(f"unknown weight format '{name}'; choose one of {sorted(LAYOUTS)} or 'auto'.")
    return LAYOUTS[name]


# Layer scales a source without one (MAE ViT-H, DeiT-T) leaves to the identity: InternViT-style
# `ls1.gamma` / `ls2.gamma` and DeiT III-style `gamma_1` / `gamma_2`.
LAYER_SCALE_KEY = re.compile(r"blocks\.\d+\.(ls[12]\.gamma|gamma_[12])")

# Whole-backbone names this project wrote before its state dicts followed the reference's for every
# preset (safetensors with piip6b.format "1", engine checkpoints of that time), and their current
# names: (regex on the old name, replacement, why). Applied only to names the model does not have.
LEGACY_RENAMES: tuple[tuple[str, str, str], ...] = (
    (r"(.*interaction_units_(\d)(\d))\.branch\3to\2_(proj|injector)(\..+)", r"\1.branch2to1_\4\5",
     "interaction units name their sides branch1/branch2 whatever the branch indices (reference names)"),
    (r"(.*interaction_units_(\d)(\d))\.branch\2to\3_(proj|injector)(\..+)", r"\1.branch1to2_\4\5",
     "interaction units name their sides branch1/branch2 whatever the branch indices (reference names)"),
    (r"(.*blocks\.\d+)\.ls([12])\.gamma", r"\1.gamma_\2",
     "DeiT III blocks hold their layer scale as gamma_1/gamma_2 (reference names)"),
)
_LEGACY = [(re.compile(p), r, why) for p, r, why in LEGACY_RENAMES]
# DeiT-T branches had no layer scale then; the reference's has one (init 1.0, the exact identity).
LEGACY_MISSING_LAYER_SCALE = re.compile(r"(.*blocks\.\d+)\.gamma_[12]")


def legacy_name(name: str) -> tuple[str, str] | None:
    """(current name, why) for a name of the old layout, or None."""
    for pattern, replacement, why in _LEGACY:
        if pattern.fullmatch(name):
            return pattern.sub(replacement, name), why
    return None

# Parts of a backbone that no pretrained file can contain: they start from their own init.
NEW_BY_CONSTRUCTION = (
    r"(.*\.)?interactions\..+",
    r"(.*\.)?merge_branch\d+\..+",
    r"(.*\.)?(fpn|up)\d+\..+",
    r"(.*\.)?w\d+",
)


def is_new_by_construction(full_name: str, model_has_backbone: bool) -> bool:
    """Interactions, merges, pyramid, branch weights and (in a detector/segmentor) the heads."""
    if any(re.fullmatch(p, full_name) for p in NEW_BY_CONSTRUCTION):
        return True
    return model_has_backbone and not full_name.startswith("backbone.")
