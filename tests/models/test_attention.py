"""Attention backends against plain softmax(QKᵀ)V math, and windowed attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from piip6b.models.attention import attention, math_attention, resolve_backend
from piip6b.models.presets import TINY_6B, TINY_B
from piip6b.models.vit import Attention


def _naive(q, k, v):
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_backends_match_plain_math(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, backend), _naive(q, k, v))


def test_auto_is_sdpa_on_cpu_and_flash_refuses_cpu():
    q = torch.randn(1, 1, 4, 8)
    assert resolve_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match="flash"):
        resolve_backend("flash", q)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("fast", q)


def test_qk_norm_is_over_the_full_width():
    torch.manual_seed(0)
    module = Attention(TINY_6B, "math")
    x = torch.randn(1, 5, TINY_6B.embed_dim)
    q, k, v = module.qkv(x).chunk(3, -1)
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    q, k = rms(q) * module.q_norm.weight, rms(k) * module.k_norm.weight
    heads = lambda t: t.view(1, 5, TINY_6B.num_heads, -1).transpose(1, 2)  # noqa: E731
    expected = module.proj(_naive(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(1, 5, -1))
    torch.testing.assert_close(module(x, (1, 5)), expected, rtol=1e-5, atol=1e-6)


def test_windowed_attention_equals_attention_per_padded_window():
    torch.manual_seed(0)
    spec = dataclasses.replace(TINY_B, window_size=4)
    windowed = Attention(spec, "sdpa")
    height, width = 6, 5  # padded to 8 x 8: four windows, three of them partly padding
    x = torch.randn(2, height * width, spec.embed_dim)
    out = windowed(x, (height, width))
    padded = torch.zeros(2, 8, 8, spec.embed_dim)
    padded[:, :height, :width] = x.view(2, height, width, -1)
    expected = torch.zeros(2, 8, 8, spec.embed_dim)
    for i in range(2):
        for j in range(2):
            window = padded[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(2, 16, -1)
            q, k, v = windowed.qkv(window).chunk(3, -1)
            heads = lambda t: t.view(2, 16, spec.num_heads, -1).transpose(1, 2)  # noqa: E731
            o = _naive(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, 4, 4, -1)
            expected[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = o
    expected = windowed.proj(expected[:, :height, :width].reshape(2, height * width, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_math_attention_keeps_dtype():
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    assert math_attention(q, q, q).dtype == torch.bfloat16
