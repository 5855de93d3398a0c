"""Parameter and FLOP counts of a backbone, on the `meta` device (no memory, no compute).

Two conventions (docs/SPEC.md §7):
- *full*: every module of the backbone as built, at the given input.
- *readme*: what the PIIP README's tables count. Parameters: the branches with pos_embed sized to
  each branch's input grid, the interactions, one 1×1 projection per smaller branch to branch 1's
  width and four 1×1 FPN laterals to 256 channels; no 3×3 merge stacks, no ConvT pyramid. FLOPs:
  multiply-accumulates at the largest input (square) of the same parts.

FLOPs are counted with `torch.utils.flop_counter` (matmuls, convolutions; attention runs through the
explicit math backend so QKᵀ and AV are counted as batched matmuls). The full convention keeps what
was counted, padded windows included. The README convention replaces the attention matmuls by the
reference's analytic terms, 2·N²·C per global layer and 2·N·w²·C per windowed layer with N the
unpadded token count, and counts the qkv projection of windowed layers over the unpadded tokens
only. Where a grid is not a multiple of the window (SBL/TSBL, window 28) the model, like the
reference's flash-attention windowed path, pads the tokens *before* qkv; the README's figures are
reproduced only without that padding (as the reference's non-flash `WindowedAttention`, which pads
after qkv, computes it): with it SBL 672/896/1568 is 8.4 % and TSBL 448/1120/1568/1792 4.3 % over.
Two more terms are added by hand because no module of ours computes them:
- deformable sampling, `grid_sample` is not counted by torch: the reference's 5·HW·K·C per
  deformable attention (HW queries, K = 4 points, C the query width);
- the README model's 1×1 projection of each smaller branch to branch 1's width at the output grid
  (the README counts it in both columns; our merge uses 3×3 stacks, left out of the README column).
All FLOP figures are multiply-accumulates (G = 1e9 MACs), as in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .presets import build_from_spec, create_backbone, get_spec
from .piip import PIIPSpec

FPN_WIDTH = 256  # the FPN laterals the README's parameter column includes
_README_EXCLUDED = ("merge_branch", "fpn", "up")  # 3×3 merge stacks and the ConvT pyramid


def _is_excluded(name: str) -> bool:
    return name.split(".")[0].startswith(_README_EXCLUDED)


def _part_of(name: str) -> str:
    head = name.split(".")[0]
    if head.startswith("branch"):
        return head
    if head.startswith("merge_branch"):
        return "merge"
    if head.startswith(("fpn", "up")):
        return "pyramid"
    if head == "interactions":
        return "interactions"
    if head.startswith("w") and head[1:].isdigit():
        return "merge_weights"
    return "branch1"  # the baseline's branch keys have no prefix


@dataclass
class ParamCount:
    total: int
    readme_total: int
    by_part: dict[str, int]


def count_params(preset: str, img_sizes: list[int] | None = None) -> ParamCount:
    spec = get_spec(preset, img_sizes)
    with torch.device("meta"):
        backbone = create_backbone(preset, img_sizes)
    by_part: dict[str, int] = {}
    for name, param in backbone.named_parameters():
        part = _part_of(name)
        by_part[part] = by_part.get(part, 0) + param.numel()
    readme = sum(n for part, n in by_part.items() if part.startswith("branch") or part == "interactions")
    width1 = spec.branches[0].embed_dim
    shapes = {name: p.shape for name, p in backbone.named_parameters()}
    for k, (branch, size) in enumerate(zip(spec.branches, spec.img_sizes)):
        grid = size // branch.patch_size
        stored = shapes["pos_embed" if len(spec.branches) == 1 else f"branch{k + 1}.pos_embed"].numel()
        readme += branch.embed_dim * (grid * grid + branch.cls_slot) - stored
        if k > 0:
            readme += branch.embed_dim * width1 + width1
    readme += 4 * (width1 * FPN_WIDTH + FPN_WIDTH)
    return ParamCount(sum(by_part.values()), readme, by_part)


@dataclass
class FlopCount:
    input_size: int
    gflops_readme: float
    gflops_full: float
    by_part: dict[str, float]  # full convention, GMACs per top-level part


def _analytic_terms(spec: PIIPSpec, input_size: int) -> tuple[float, float, float, float]:
    """(deformable sampling, README 1×1 projection, README attention, qkv MACs on window padding)
    at a square input."""
    last = spec.img_sizes[-1]
    sides = [(size * input_size // last) // b.patch_size for b, size in zip(spec.branches, spec.img_sizes)]
    tokens = [side**2 for side in sides]
    dims = [b.embed_dim for b in spec.branches]
    attention = sum(b.depth * 2 * n * (b.window_size**2 if b.window_size else n) * b.embed_dim
                    for b, n in zip(spec.branches, tokens))
    padding = 0.0
    for b, side in zip(spec.branches, sides):
        if b.window_size:
            padded = -(-side // b.window_size) * b.window_size
            padding += b.depth * (padded**2 - side**2) * b.embed_dim * 3 * b.embed_dim
    deform = 0.0
    if len(spec.branches) > 1:
        per_interaction = sum(5 * tokens[k] * spec.interaction.points * dims[k] * (2 if 0 < k < len(dims) - 1 else 1)
                              for k in range(len(dims)))
        deform = per_interaction * len(spec.groups[0])
    projection = sum(dims[k] * dims[0] * tokens[-1] for k in range(1, len(dims)))
    return deform, projection, attention, padding


def count_flops(preset: str, input_size: int | None = None, img_sizes: list[int] | None = None) -> FlopCount:
    """Backbone MACs of a preset for one square image of side `input_size` (default: the largest
    branch size)."""
    return count_flops_for_spec(get_spec(preset, img_sizes), input_size)


def count_flops_for_spec(spec: PIIPSpec, input_size: int | None = None) -> FlopCount:
    size = input_size or spec.img_sizes[-1]
    if size % spec.size_divisor:
        raise ValueError(f"input {size} is not a multiple of {spec.size_divisor}, which this backbone needs")
    with torch.device("meta"):
        backbone = build_from_spec(spec, attn_backend="math")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            backbone(torch.empty(1, 3, size, size))
    root = type(backbone).__name__
    counts = counter.get_flop_counts()
    # Each module's entry includes its callees'; keep only the outermost entries below the root
    # (blocks are called directly, not through their branch's forward, so depth varies).
    names = [n for n in counts if n.startswith(root + ".")]
    outermost = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    by_part: dict[str, float] = {}
    excluded = 0.0
    for module_name in outermost:
        child = module_name[len(root) + 1:]
        macs = sum(counts[module_name].values()) / 2
        by_part[_part_of(child)] = by_part.get(_part_of(child), 0.0) + macs / 1e9
        if _is_excluded(child):
            excluded += macs
    deform, projection, attention, padding = _analytic_terms(spec, size)
    total = counter.get_total_flops() / 2
    # Only the attention's QKᵀ and AV are batched matmuls here (linears are mm/addmm).
    counted_attention = counts["Global"].get(torch.ops.aten.bmm, 0) / 2
    by_part["deformable_sampling"] = deform / 1e9
    return FlopCount(
        input_size=size,
        gflops_readme=(total - excluded - counted_attention - padding + attention + deform + projection) / 1e9,
        gflops_full=(total + deform) / 1e9,
        by_part=by_part,
    )
