"""The two rules every head in this package follows.

1. Heads compute in fp32 whatever dtype the engine stores their parameters in
   (`float32_compute`). DeepSpeed 0.19 with `bf16.enabled` casts *every* parameter to bf16 (under
   ZeRO-3 there is one flat bf16 partition; `data_types.keep_in_fp32_modules` only exempts
   buffers) and keeps the fp32 masters in the optimizer. So the heads cannot keep fp32 storage;
   instead they run with autocast disabled, fp32 inputs, and each weight upcast to fp32 at the op
   that consumes it. Gradients flow back through the cast to the bf16 parameter and on to the
   fp32 master, so nothing the optimizer does can undo it (the reference's defect: its fp32 head
   cast was undone by the engine after the first step).
2. Heads initialise their parameters in fp32 and ZeRO-3-safely (`initialize_parameters`): under
   `zero.Init` a parent's init loop over its children touches already-partitioned, zero-element
   tensors (a silent no-op) and bf16-enabled zero.Init would initialise in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from piip6b import dist

# The ops that read a weight. Only these see their low-precision tensor arguments upcast, so
# everything else running under the mode (DeepSpeed's gather/release hooks copying into bf16
# buffers) is untouched.
_WEIGHT_OPS = frozenset({
    torch.conv2d, torch.conv_transpose2d, torch._C._nn.linear,
    F.group_norm, F.batch_norm, F.layer_norm,
})
_NATIVE_LINEAR = torch._C._nn.linear
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION:
        return value.float()
    return value


class _UpcastWeightOps(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHT_OPS:
            args, kwargs = tree_map(_upcast, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def float32_compute(device_type: str) -> Iterator[None]:
    """Run the enclosed head computation in fp32: autocast off, weights upcast where consumed.

    Inputs must be made fp32 by the caller (`x.float()`). zero.Init (memory_efficient_linear,
    on by default) replaces `F.linear` for the whole process by an autograd Function whose
    backward multiplies the saved bf16 weight with the fp32 gradient; inside this context
    `F.linear` is the native op again so the upcast above applies to it.
    """
    patched_linear = F.linear
    F.linear = _NATIVE_LINEAR
    try:
        with torch.autocast(device_type=device_type, enabled=False), _UpcastWeightOps():
            yield
    finally:
        F.linear = patched_linear


def initialize_parameters(rules: Iterable[tuple[nn.Parameter, Callable[[torch.Tensor], Any]]]) -> None:
    """Apply each `init_fn` to an fp32 tensor and copy it into its parameter.

    ZeRO-3-partitioned parameters (built under `deepspeed.zero.Init`) are gathered first and
    written by rank 0, which broadcasts them; without ZeRO this is a plain in-place init.
    """
    rules = list(rules)
    with dist.gathered([p for p, _ in rules], modifier_rank=0), torch.no_grad():
        for param, init_fn in rules:
            if dist.is_partitioned(param) and not dist.is_main():
                continue  # rank 0's values arrive by broadcast when the context exits
            # new_empty, unlike torch.empty, is not redirected to bf16 by zero.Init.
            value = param.new_empty(param.shape, dtype=torch.float32)
            init_fn(value)
            param.copy_(value)


def zeros_(tensor: torch.Tensor) -> None:
    nn.init.zeros_(tensor)


def ones_(tensor: torch.Tensor) -> None:
    nn.init.ones_(tensor)


def normal_(std: float) -> Callable[[torch.Tensor], None]:
    return lambda tensor: nn.init.normal_(tensor, std=std)


def xavier_uniform_(tensor: torch.Tensor) -> None:
    nn.init.xavier_uniform_(tensor)


def kaiming_normal_fan_out_(tensor: torch.Tensor) -> None:
    nn.init.kaiming_normal_(tensor, mode="fan_out", nonlinearity="relu")


def layer_init_rules(
    module: nn.Module, weight_init: Callable[[torch.Tensor], Any]
) -> Iterator[tuple[nn.Parameter, Callable[[torch.Tensor], Any]]]:
    """Rules for every conv/linear/norm below `module`: `weight_init` for conv and linear weights,
    zero biases, unit-scale norms."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            yield layer.weight, weight_init
        elif isinstance(layer, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)) and layer.weight is not None:
            yield layer.weight, ones_
        else:
            continue
        if layer.bias is not None:
            yield layer.bias, zeros_


