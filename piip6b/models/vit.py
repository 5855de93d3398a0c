"""The ViT branches of PIIP: InternViT-6B, MAE ViT-H and DeiT(-III) ViT-L/B/S/T.

Two block classes, as in the reference: `Block` is InternViT's (shared there by the 6B and the MAE
ViT-H branch; layer scale as `ls1.gamma`/`ls2.gamma` submodules), `LayerScaleBlock` is DeiT III's
`Layer_scale_init_Block` of `vit_models` (ViT-L/B/S/T; layer scale as the block's own parameters
`gamma_1`/`gamma_2`, which therefore come first in its state dict). Within a class the flavour is the
norm (RMSNorm or LayerNorm), the qkv bias, the QK-norm over the full width, the layer-scale init, the
MLP's GELU (exact, or the tanh approximation of flash-attn's FusedMLP) and windowed or global
attention. Parameter names and their order are the reference's (docs/SPEC.md §2, §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttnBackend, attention
from .layers import DropPath, LayerScale, Linear, PatchConv2d, RMSNorm, init_fp32_, trunc_normal_init


@dataclass(frozen=True)
class ViTSpec:
    """Architecture of one branch (docs/SPEC.md §2)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    block: Literal["internvit", "deit3"] = "internvit"  # the reference class the blocks follow (module docstring)
    norm: Literal["rms", "layer"] = "layer"
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale: float | None = 1.0  # initial value; None: no layer scale (InternViT blocks only)
    # "gelu_tanh" where the reference config sets mlp_type / Mlp_block = "fused_mlp": flash-attn's
    # FusedMLP with activation="gelu_approx" is the tanh approximation, not the exact GELU.
    mlp_act: Literal["gelu", "gelu_tanh"] = "gelu"
    drop_path_rate: float = 0.0
    drop_path_schedule: Literal["linear", "constant"] = "constant"
    cls_slot: bool = False  # pos_embed keeps the pretrained cls position (6B, MAE ViT-H)
    window_size: int = 0  # 0: global attention; >0: windowed attention in every block
    pretrain_img_size: int = 224
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.block == "deit3" and self.layer_scale is None:
            raise ValueError(f"{self.name}: DeiT III blocks always have a layer scale (gamma_1/gamma_2); give its init value")

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_img_size // self.patch_size

    def drop_path_rates(self) -> list[float]:
        if self.drop_path_schedule == "linear":
            if self.depth == 1:
                return [0.0]
            return [self.drop_path_rate * i / (self.depth - 1) for i in range(self.depth)]
        return [self.drop_path_rate] * self.depth


def _norm(kind: str, dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6) if kind == "rms" else nn.LayerNorm(dim, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention, global or in non-overlapping windows (zero-padded, ViTDet-style)."""

    def __init__(self, spec: ViTSpec, attn_backend: AttnBackend = "auto") -> None:
        super().__init__()
        dim = spec.embed_dim
        if dim % spec.num_heads:
            raise ValueError(f"{spec.name}: embed_dim {dim} is not divisible by num_heads {spec.num_heads}")
        self.num_heads = spec.num_heads
        self.window_size = spec.window_size
        self.attn_backend: AttnBackend = attn_backend
        self.qkv = Linear(dim, 3 * dim, bias=spec.qkv_bias)
        self.proj = Linear(dim, dim)
        # InternViT-6B normalises q and k over the whole width (all heads together), not per head.
        self.q_norm = _norm(spec.norm, dim) if spec.qk_norm else nn.Identity()
        self.k_norm = _norm(spec.norm, dim) if spec.qk_norm else nn.Identity()

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda t: t.view(batch, tokens, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        out = attention(heads(q), heads(k), heads(v), self.attn_backend)
        return out.transpose(1, 2).reshape(batch, tokens, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if not self.window_size:
            return self.proj(self._attend(x))
        batch, _, dim = x.shape
        height, width = grid
        w = self.window_size
        pad_h, pad_w = (-height) % w, (-width) % w
        x = F.pad(x.view(batch, height, width, dim), (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = height + pad_h, width + pad_w
        windows = x.view(batch, hp // w, w, wp // w, w, dim).transpose(2, 3).reshape(-1, w * w, dim)
        out = self._attend(windows)
        out = out.view(batch, hp // w, wp // w, w, w, dim).transpose(2, 3).reshape(batch, hp, wp, dim)
        return self.proj(out[:, :height, :width].reshape(batch, height * width, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """InternViT block (6B and MAE ViT-H): x + drop_path(ls1·attn(norm1 x)), then the same for the MLP."""

    def __init__(self, spec: ViTSpec, drop_path: float, attn_backend: AttnBackend = "auto") -> None:
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = _norm(spec.norm, dim)
        self.attn = Attention(spec, attn_backend)
        self.ls1 = LayerScale(dim, spec.layer_scale) if spec.layer_scale is not None else nn.Identity()
        self.norm2 = _norm(spec.norm, dim)
        self.mlp = Mlp(dim, spec.mlp_dim, spec.mlp_act)
        self.ls2 = LayerScale(dim, spec.layer_scale) if spec.layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), grid)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class LayerScaleBlock(nn.Module):
    """DeiT III block (ViT-L/B/S/T): x + drop_path(gamma_1·attn(norm1 x)), then the same for the MLP.

    The gammas are parameters of the block itself, as in the reference's `Layer_scale_init_Block`
    (and the DeiT III checkpoints), so they lead the block's state dict.
    """

    def __init__(self, spec: ViTSpec, drop_path: float, attn_backend: AttnBackend = "auto") -> None:
        super().__init__()
        dim = spec.embed_dim
        self.init_value = float(spec.layer_scale)
        self.gamma_1 = nn.Parameter(torch.empty(dim))
        self.gamma_2 = nn.Parameter(torch.empty(dim))
        self.norm1 = _norm(spec.norm, dim)
        self.attn = Attention(spec, attn_backend)
        self.norm2 = _norm(spec.norm, dim)
        self.mlp = Mlp(dim, spec.mlp_dim, spec.mlp_act)
        self.drop_path = DropPath(drop_path)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Only the block's own parameters: its children initialise themselves.
        with torch.no_grad():
            self.gamma_1.fill_(self.init_value)
            self.gamma_2.fill_(self.init_value)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def build_block(spec: ViTSpec, drop_path: float, attn_backend: AttnBackend = "auto") -> nn.Module:
    cls = Block if spec.block == "internvit" else LayerScaleBlock
    return cls(spec, drop_path, attn_backend)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = PatchConv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


def new_pos_embed(spec: ViTSpec, grid: int | None = None) -> nn.Parameter:
    """The position table (1, [1 +] grid², dim), truncated-normal initialised; `grid` defaults to the
    pretrained grid (detection configs), the ADE20K configs store it at the input grid."""
    grid = grid or spec.pretrain_grid
    pos_embed = nn.Parameter(torch.empty(1, grid * grid + int(spec.cls_slot), spec.embed_dim))
    init_fp32_(pos_embed, trunc_normal_init(0.02))
    return pos_embed


def resize_pos_embed(
    pos_embed: torch.Tensor, spec: ViTSpec, grid: tuple[int, int], dtype: torch.dtype, stored: int | None = None
) -> torch.Tensor:
    """The position grid (cls slot dropped) bicubically resized, in fp32, to the token grid; added
    as stored where the grids agree (a bicubic resize to the same size is the identity)."""
    stored = stored or spec.pretrain_grid
    pos = pos_embed[:, int(spec.cls_slot):].float()
    pos = pos.reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
    if tuple(grid) != (stored, stored):
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
    return pos.flatten(2).transpose(1, 2).to(dtype)


class ViTBranch(nn.Module):
    """Patch embedding, position table and blocks of one branch (no head, no final norm).

    `forward` embeds the image; the blocks are driven by the owner (PIIP runs them in groups
    between interactions). Every parameter is used inside the forward of the module that owns it,
    which is what ZeRO-3's gather hooks need. `pos_grid`: side of the stored position grid (None:
    the pretrained grid, resized to the token grid on every forward).
    """

    def __init__(self, spec: ViTSpec, attn_backend: AttnBackend = "auto", pos_grid: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.pos_grid = pos_grid or spec.pretrain_grid
        self.pos_embed = new_pos_embed(spec, self.pos_grid)
        self.patch_embed = PatchEmbed(spec.patch_size, spec.embed_dim)
        self.blocks = nn.ModuleList(build_block(spec, dp, attn_backend) for dp in spec.drop_path_rates())

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def grid_pos_embed(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        return resize_pos_embed(self.pos_embed, self.spec, grid, dtype, self.pos_grid)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.patch_embed(image)
        return tokens + self.grid_pos_embed(grid, tokens.dtype), grid
