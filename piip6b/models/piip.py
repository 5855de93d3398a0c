"""PIIP backbones: 2-, 3- and 4-branch parameter-inverted pyramids, and the InternViT-6B baseline.

Branch 1 is the largest model on the smallest image; the last branch reads the input image itself,
every other branch a bilinear resize of it by `its size / last size`. After each group of blocks the
adjacent branches interact; at the end each branch is projected to branch 1's width by a 3×3 conv
stack, resized (fp32) to the last branch's stride-16 grid, summed with learnable weights `w_k`, and
a simple pyramid gives stride 4/8/16/32 maps (docs/SPEC.md §4–5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import AttnBackend
from .deform_attn import grid_reference_points
from .interaction import InteractionBlock, InteractionSpec, Injector
from .layers import ChannelsLastConv2d, ConvTranspose2x2, LayerNorm2d
from .vit import Block, LayerScaleBlock, PatchEmbed, ViTBranch, ViTSpec, build_block, new_pos_embed, resize_pos_embed


@dataclass(frozen=True)
class PIIPSpec:
    """A whole backbone. `groups[k]` lists, per interaction, the (first, last) block of branch k."""

    branches: tuple[ViTSpec, ...]
    img_sizes: tuple[int, ...]  # per branch, branch 1 (largest model, smallest image) first
    groups: tuple[tuple[tuple[int, int], ...], ...] = ()
    interaction: InteractionSpec = field(default_factory=InteractionSpec)
    # False: position tables at each branch's pretrained grid, resized to the token grid on every
    # forward (the reference's mmdet code). True: stored at each branch's own input grid and added as
    # is (its mmseg code, i.e. the ADE20K configs; resized only if the token grid differs).
    pos_embed_at_input: bool = False

    def __post_init__(self) -> None:
        if len(self.img_sizes) != len(self.branches):
            raise ValueError(f"{len(self.branches)} branches but {len(self.img_sizes)} image sizes {self.img_sizes}")
        if len(self.branches) > 1:
            if len(self.groups) != len(self.branches):
                raise ValueError("one interaction-group list per branch is required")
            counts = {len(g) for g in self.groups}
            if len(counts) != 1:
                raise ValueError(f"every branch needs the same number of interaction groups, got {counts}")
            for spec, ranges in zip(self.branches, self.groups):
                covered = [b for first, last in ranges for b in range(first, last + 1)]
                if covered != list(range(spec.depth)):
                    raise ValueError(f"{spec.name}: interaction groups {ranges} must cover blocks 0..{spec.depth - 1} in order")
            if any(a > b for a, b in zip(self.img_sizes, self.img_sizes[1:])):
                raise ValueError(f"image sizes must grow from branch 1 to the last branch, got {self.img_sizes}")

    def pos_grid(self, k: int) -> int | None:
        """Side of branch k's stored position grid (None: its pretrained grid)."""
        return self.img_sizes[k] // self.branches[k].patch_size if self.pos_embed_at_input else None

    @property
    def size_divisor(self) -> int:
        """Smallest multiple of which the input side must be, so that every branch's resized image
        is a whole number of patches and the stride-16 grid halves evenly for stride 32."""
        last = self.img_sizes[-1]
        divisor = 2 * self.branches[-1].patch_size
        for spec, size in zip(self.branches, self.img_sizes):
            num, den = size // math.gcd(size, last), last // math.gcd(size, last)
            divisor = math.lcm(divisor, den * spec.patch_size // math.gcd(num, spec.patch_size))
        return divisor


def _merge_stack(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        ChannelsLastConv2d(in_dim, out_dim, 3, padding=1, bias=False),
        nn.GroupNorm(32, out_dim),
        nn.ReLU(inplace=True),
        ChannelsLastConv2d(out_dim, out_dim, 3, padding=1, bias=False),
        nn.GroupNorm(32, out_dim),
        nn.ReLU(inplace=True),
    )


def _upsample_x4(dim: int, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(ConvTranspose2x2(dim, dim), norm, nn.GELU(), ConvTranspose2x2(dim, dim))


def _upsample_x2(dim: int) -> nn.Sequential:
    return nn.Sequential(ConvTranspose2x2(dim, dim))


class _Backbone(nn.Module):
    """What the two backbone classes share: input checks, checkpointing switches, lr layer ids."""

    spec: PIIPSpec

    @property
    def img_sizes(self) -> tuple[int, ...]:
        return self.spec.img_sizes

    @property
    def size_divisor(self) -> int:
        return self.spec.size_divisor

    @property
    def num_layers(self) -> int:
        return self.spec.branches[0].depth

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        d = self.size_divisor
        if height % d or width % d:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {d}: this backbone (image sizes "
                f"{self.img_sizes}) needs height and width divisible by {d}; pad the batch to a multiple of {d}"
            )

    def set_grad_checkpointing(self, every: int = 1, interactions: bool = False) -> None:
        """Activation checkpointing (non-reentrant): every `every`-th block of each branch
        (0 = off), and each interaction injector when `interactions`."""
        if every < 0:
            raise ValueError(f"grad checkpointing interval must be >= 0, got {every}")
        self._ckpt_every = every
        for module in self.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = interactions

    def repeated_blocks(self) -> list[nn.Module]:
        """Every ViT block of every branch and each interaction injector: the modules that repeat
        with one structure, which regional compilation compiles one by one (`piip6b.engine.compile`).
        They are also the units activation checkpointing recomputes."""
        return [m for m in self.modules() if isinstance(m, (Block, LayerScaleBlock, Injector))]

    def _run_block(self, block: nn.Module, index: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        every = getattr(self, "_ckpt_every", 0)
        if every and index % every == 0 and torch.is_grad_enabled():
            return checkpoint(block, x, grid, use_reentrant=False)
        return block(x, grid)

    def lr_layer_id(self, name: str) -> float:
        """Layer id for layer-wise lr decay (docs/SPEC.md §6), without the reference's flooring.

        Branch 1: embeddings 0, block i → i + 1. Branch k: block i → (i + 1)·(depth₁/depth_k), as the
        reference computes it, so every branch's last block shares branch 1's last id. Everything new
        (interactions, merges, pyramid, w_k) → num_layers + 1 (full lr).
        """
        parts = name.split(".")
        if len(self.spec.branches) == 1:  # the baseline's keys carry no branch prefix
            branch, rest = 0, parts
        elif parts[0].startswith("branch") and parts[0][len("branch"):].isdigit():
            branch, rest = int(parts[0][len("branch"):]) - 1, parts[1:]
        else:
            return float(self.num_layers + 1)
        if rest[0] in ("pos_embed", "patch_embed", "cls_token"):
            return 0.0
        if rest[0] == "blocks":
            return (int(rest[1]) + 1) * (self.num_layers / self.spec.branches[branch].depth)
        return float(self.num_layers + 1)


class PIIPBackbone(_Backbone):
    def __init__(self, spec: PIIPSpec, attn_backend: AttnBackend = "auto") -> None:
        super().__init__()
        if len(spec.branches) < 2:
            raise ValueError("PIIPBackbone needs at least two branches; use InternViTBaseline for one")
        self.spec = spec
        n = len(spec.branches)
        for k in range(n):
            setattr(self, f"w{k + 1}", nn.Parameter(torch.tensor(1.0)))
        for k, branch in enumerate(spec.branches):
            setattr(self, f"branch{k + 1}", ViTBranch(branch, attn_backend, spec.pos_grid(k)))
        dims = [b.embed_dim for b in spec.branches]
        self.interactions = nn.Sequential(*(InteractionBlock(dims, spec.interaction) for _ in spec.groups[0]))
        out_dim = dims[0]
        # State-dict order is the reference's: its 3-branch class declares the pyramid before the
        # merge stacks, its 2- and 4-branch classes after.
        if n != 3:
            self._add_merge_stacks(dims)
        self.fpn1 = _upsample_x4(out_dim, nn.GroupNorm(32, out_dim))
        self.fpn2 = _upsample_x2(out_dim)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        if n == 3:
            self._add_merge_stacks(dims)
        self.out_channels = out_dim

    def _add_merge_stacks(self, dims: list[int]) -> None:
        for k, dim in enumerate(dims):
            setattr(self, f"merge_branch{k + 1}", _merge_stack(dim, dims[0]))

    def branch(self, k: int) -> ViTBranch:
        return getattr(self, f"branch{k + 1}")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(images)
        n = len(self.spec.branches)
        height, width = images.shape[-2:]
        last = self.spec.img_sizes[-1]
        dtype = self.branch(0).patch_embed.proj.weight.dtype
        xs, grids = [], []
        for k in range(n):
            size = self.spec.img_sizes[k]
            image = images
            if size != last:
                image = F.interpolate(images, size=(height * size // last, width * size // last), mode="bilinear", align_corners=False)
            tokens, grid = self.branch(k)(image.to(dtype))
            xs.append(tokens)
            grids.append(grid)
        refs = [grid_reference_points(g, images.device) for g in grids]

        for g, interaction in enumerate(self.interactions):
            for k in range(n):
                first, last_block = self.spec.groups[k][g]
                blocks = self.branch(k).blocks
                for index in range(first, last_block + 1):
                    xs[k] = self._run_block(blocks[index], index, xs[k], grids[k])
            xs = interaction(xs, grids, refs)

        out_grid = grids[-1]
        merged = None
        for k in range(n):
            fmap = xs[k].transpose(1, 2).reshape(xs[k].shape[0], -1, *grids[k])
            fmap = getattr(self, f"merge_branch{k + 1}")(fmap)
            if grids[k] != out_grid:
                # Resizing in fp32: bilinear weights in bf16 lose the sub-pixel positions.
                fmap = F.interpolate(fmap.float(), size=out_grid, mode="bilinear", align_corners=False).to(fmap.dtype)
            term = fmap * getattr(self, f"w{k + 1}")
            merged = term if merged is None else merged + term
        return [level(merged).float() for level in (self.fpn1, self.fpn2, self.fpn3, self.fpn4)]


class InternViTBaseline(_Backbone):
    """The single-branch InternViT-6B baseline with its simple pyramid (`up1`, `up2`, id, maxpool);
    `up1` normalises with a channels-first LayerNorm (the reference's `LayerNorm`, eps 1e-6).

    Parameters are named as in the reference (`pos_embed`, `patch_embed.*`, `blocks.N.*`, `up1.*`,
    `up2.*`), without a `branch1.` prefix.
    """

    def __init__(self, spec: PIIPSpec, attn_backend: AttnBackend = "auto") -> None:
        super().__init__()
        if len(spec.branches) != 1:
            raise ValueError("InternViTBaseline takes exactly one branch")
        self.spec = spec
        branch = spec.branches[0]
        self.pos_grid = spec.pos_grid(0) or branch.pretrain_grid
        self.pos_embed = new_pos_embed(branch, self.pos_grid)
        self.patch_embed = PatchEmbed(branch.patch_size, branch.embed_dim)
        self.blocks = nn.ModuleList(build_block(branch, dp, attn_backend) for dp in branch.drop_path_rates())
        dim = branch.embed_dim
        self.up1 = _upsample_x4(dim, LayerNorm2d(dim))  # channels-first LayerNorm here, not GroupNorm
        self.up2 = _upsample_x2(dim)
        self.up3 = nn.Identity()
        self.up4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.out_channels = dim

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(images)
        tokens, grid = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        x = tokens + resize_pos_embed(self.pos_embed, self.spec.branches[0], grid, tokens.dtype, self.pos_grid)
        for index, block in enumerate(self.blocks):
            x = self._run_block(block, index, x, grid)
        fmap = x.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return [level(fmap).float() for level in (self.up1, self.up2, self.up3, self.up4)]
