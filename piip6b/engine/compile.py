"""Regional compilation: `torch.compile` applied to each repeated block of a built model.

Compiling the repeated blocks one by one, rather than the whole task model, keeps the data-dependent
parts (proposal sampling, RoI heads, multi-scale inputs) eager, and every block of a kind reuses one
compiled graph: torch.compile caches per function and lifts a module's parameters to graph inputs,
so the 48 blocks of the 6B branch share one graph (another for the ViT-H branch's width, one per
injector direction).

Under ZeRO-3 two things decide how it is applied:
- DeepSpeed gathers parameters in forward pre-hooks on every module. Inside a compiled block those
  hooks are graph breaks (DeepSpeed marks them `torch.compiler.disable`), one per Linear. Each
  compiled block is therefore made a ZeRO-3 leaf (`deepspeed.utils.set_z3_leaf_module`): its
  parameters are gathered together by hooks on the block itself, and its children have none. This
  must happen before `deepspeed.initialize`, which registers the hooks.
- The block's `forward` is compiled, not the module (`module.compile()` would compile the call
  machinery with the hooks in it, and a disabled hook makes dynamo run the whole block eagerly:
  pytorch/pytorch#142358). The hooks run eagerly around the compiled forward.

DeepSpeed's own compile support was the other candidate: `engine.compile()` compiles the whole
wrapped module (heads included, with the graph breaks above), and DeepCompile (`compile.deepcompile`)
replaces ZeRO-3's hooks by its own graph passes over a whole-model graph, which the Mask R-CNN
head's data-dependent shapes do not give.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def compile_blocks(blocks: Iterable[nn.Module], *, zero_stage: int, backend: str = "inductor") -> int:
    """Compile each block's forward in place (before `deepspeed.initialize`); returns how many."""
    blocks = list(blocks)
    if zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_module

        for block in blocks:
            set_z3_leaf_module(block, True)
    for block in blocks:
        # An instance attribute: the state dict, hooks and the class are untouched. Static shapes:
        # dynamo's automatic dynamic recompile (a second input size) failed in inductor on symbolic
        # strides (torch 2.14, bench/cpu_compile.py). Each input size compiles its own graphs, up to
        # dynamo's recompile limit per block class; past it a block runs eagerly.
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
    return len(blocks)
