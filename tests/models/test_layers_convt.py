"""ConvTranspose2x2 (GEMM + pixel shuffle) and ChannelsLastConv2d against the torch layers they replace."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn as nn

from piip6b.models import create_backbone
from piip6b.models.layers import ChannelsLastConv2d, Conv2d, ConvTranspose2d, ConvTranspose2x2

FP32 = dict(rtol=1e-5, atol=1e-6)


def _pair(cin: int, cout: int, bias: bool = True, seed: int = 0) -> tuple[ConvTranspose2x2, nn.ConvTranspose2d]:
    torch.manual_seed(seed)
    ours = ConvTranspose2x2(cin, cout, bias=bias)
    with torch.no_grad():  # non-zero bias, so that its path is exercised
        if bias:
            ours.bias.normal_()
    reference = nn.ConvTranspose2d(cin, cout, 2, 2, bias=bias)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [x] + params, grad.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, cout, bias", [((2, 7, 3, 5), 5, True), ((1, 4, 1, 9), 6, False), ((3, 1, 2, 2), 3, True)])
def test_matches_conv_transpose_fp32(shape, cout, bias, memory_format):
    ours, reference = _pair(shape[1], cout, bias)
    torch.manual_seed(1)
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    grad = torch.randn(shape[0], cout, 2 * shape[2], 2 * shape[3])
    out, grads = _forward_backward(ours, x, grad)
    ref_out, ref_grads = _forward_backward(reference, x, grad)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **FP32)
    for name, a, b in zip(["input", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(a, b, **FP32, msg=lambda m: f"grad {name}: {m}")
    # The output keeps the input's memory format (channels-last only where it differs from NCHW).
    if memory_format == torch.channels_last and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


def test_bf16_input_is_as_accurate_as_conv_transpose():
    ours, reference = _pair(16, 8)
    torch.manual_seed(2)
    x = torch.randn(2, 16, 5, 3)
    exact = reference(x).double()  # fp32 reference, same weights
    ours_bf16, ref_bf16 = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    out = ours_bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    err_ours = (out.double() - exact).abs().max().item()
    err_ref = (ref_bf16(x.bfloat16()).double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err_ours <= max(2 * err_ref, 2.0**-7 * scale), (err_ours, err_ref, scale)
    # Backward in bf16 runs and gives bf16 gradients close to the conv's.
    grad = torch.randn_like(exact).bfloat16()
    out_g, grads = _forward_backward(ours_bf16, x.bfloat16(), grad)
    _, ref_grads = _forward_backward(ref_bf16, x.bfloat16(), grad)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_parameters_state_dict_and_init_are_those_of_the_conv_transpose():
    torch.manual_seed(0)
    ours = ConvTranspose2x2(12, 10)
    torch.manual_seed(0)
    before = ConvTranspose2d(12, 10, 2, 2)  # the layer the pyramid used until now
    assert isinstance(ours, nn.ConvTranspose2d)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [("weight", (12, 10, 2, 2)), ("bias", (10,))]
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert torch.equal(ours.weight, before.weight) and torch.equal(ours.bias, before.bias)
    assert ours.kernel_size == (2, 2) and ours.stride == (2, 2) and ours.padding == (0, 0)
    # fan-out He normal (fan_out = 2·2·Cout), zero bias, drawn in fp32 even for a bf16 layer
    big = ConvTranspose2x2(256, 64, dtype=torch.bfloat16)
    assert big.weight.dtype == torch.bfloat16
    assert abs(big.weight.float().std().item() / math.sqrt(2.0 / (4 * 64)) - 1) < 0.02
    assert abs(big.weight.float().mean().item()) < 0.01 * big.weight.float().std().item() * 10
    assert torch.count_nonzero(big.bias) == 0


def test_every_parameter_is_used_in_the_modules_own_forward():
    # ZeRO-3 gathers a module's parameters around its forward: both must be read there.
    ours, _ = _pair(6, 4)
    seen = []
    handle = ours.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    ours(torch.randn(1, 6, 2, 3)).sum().backward()
    handle.remove()
    assert seen == ["pre"] and ours.weight.grad is not None and ours.bias.grad is not None


def test_unbatched_input_channels_last_weights_and_output_size():
    ours, reference = _pair(5, 3)
    x = torch.randn(5, 4, 3)
    torch.testing.assert_close(ours(x), reference(x), **FP32)
    ours.to(memory_format=torch.channels_last)  # as bench/gpu_step.py does to whole models
    torch.testing.assert_close(ours(x[None]), reference(x[None]), **FP32)
    torch.testing.assert_close(ours(x[None], output_size=[8, 6]), reference(x[None]), **FP32)
    with pytest.raises(ValueError, match="twice"):
        ours(x[None], output_size=[9, 6])


def test_channels_last_conv_matches_conv2d():
    torch.manual_seed(0)
    ours = ChannelsLastConv2d(6, 8, 3, padding=1, bias=False)
    reference = Conv2d(6, 8, 3, padding=1, bias=False)
    reference.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight"]
    x = torch.randn(2, 6, 5, 7)
    grad = torch.randn(2, 8, 5, 7)
    out, grads = _forward_backward(ours, x, grad)
    ref_out, ref_grads = _forward_backward(reference, x, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out, **FP32)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("name", ["piip_h6b_tiny", "internvit6b_baseline_tiny"])
def test_backbone_pyramid_and_merges_equal_the_torch_layers(name):
    """The whole tiny backbone with the new layers against the same weights run through
    nn.ConvTranspose2d / nn.Conv2d's own forward: features and every parameter gradient."""
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()  # no drop path: both runs see the same network
    swapped = [m for m in backbone.modules() if isinstance(m, (ConvTranspose2x2, ChannelsLastConv2d))]
    assert sum(isinstance(m, ConvTranspose2x2) for m in swapped) == 3
    assert sum(isinstance(m, ChannelsLastConv2d) for m in swapped) == (4 if name.startswith("piip") else 0)
    size = backbone.img_sizes[-1]
    images = torch.randn(1, 3, size, size)
    probes = None

    def run():
        nonlocal probes
        backbone.zero_grad(set_to_none=True)
        features = backbone(images)
        if probes is None:
            generator = torch.Generator().manual_seed(1)
            probes = [torch.randn(f.shape, generator=generator) for f in features]
        sum((f * p).sum() for f, p in zip(features, probes)).backward()
        return [f.detach() for f in features], {n: p.grad.clone() for n, p in backbone.named_parameters()}

    features, grads = run()
    for m in swapped:
        base = nn.ConvTranspose2d if isinstance(m, ConvTranspose2x2) else nn.Conv2d
        m.forward = types.MethodType(base.forward, m)
    ref_features, ref_grads = run()
    for a, b in zip(features, ref_features):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5 * ref_grads[n].abs().max().item(),
                                   msg=lambda m, n=n: f"{n}: {m}")
