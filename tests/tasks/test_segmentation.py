"""UperNet on the tiny PIIP-H6B preset: losses, ignore index, fp32 heads, sliding windows."""

from __future__ import annotations

import copy

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.tasks.segmentation import SegmentationConfig, UperNet

SMALL = dict(num_classes=7, channels=32, aux_channels=32, norm_groups=8, crop_size=(64, 64), stride=(32, 32))


def make_model(**overrides) -> UperNet:
    torch.manual_seed(0)
    return UperNet(create_backbone("piip_h6b_tiny"), SegmentationConfig(**{**SMALL, **overrides}))


def make_batch(size=(96, 128), seed=0) -> dict:
    """32x32 tiles of random classes, each painted in its class's colour plus noise."""
    gen = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, SMALL["num_classes"], (2, size[0] // 32, size[1] // 32), generator=gen)
    labels = tiles.repeat_interleave(32, 1).repeat_interleave(32, 2)
    colours = torch.randn(SMALL["num_classes"], 3, generator=gen)
    images = colours[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(2, 3, *size, generator=gen)
    labels[:, : size[0] // 4] = 255  # an unlabeled band
    return {"images": images, "labels": labels}


def test_losses_and_every_head_module_runs():
    model = make_model().train()
    called = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
             for name, m in model.named_modules() if not name.startswith("backbone")]
    losses = model(make_batch())
    for h in hooks:
        h.remove()
    assert set(losses) == {"loss_seg", "loss_aux"}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    owners = {n for n, m in model.named_modules()
              if not n.startswith("backbone") and any(True for _ in m.parameters(recurse=False))}
    assert owners <= called, owners - called
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_is_mean_over_all_pixels_with_ignored_as_zero():
    model = make_model(dropout=0.0).eval()  # deterministic: no drop path, no dropout
    batch = make_batch()
    with torch.no_grad():
        logits = model(batch)
        model.train()
        model.backbone.eval()
        losses = model(batch)
    labels = batch["labels"]
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=255)
    torch.testing.assert_close(losses["loss_seg"], per_pixel.sum() / labels.numel())
    # All pixels ignored: a finite zero rather than NaN.
    empty = model(dict(batch, labels=torch.full_like(labels, 255)))
    assert empty["loss_seg"].item() == 0.0 and empty["loss_aux"].item() == 0.0
    # The aux term carries the 0.4 weight.
    unweighted = make_model(dropout=0.0, aux_loss_weight=1.0).train()
    unweighted.backbone.eval()
    torch.testing.assert_close(losses["loss_aux"], 0.4 * unweighted(batch)["loss_aux"])


def test_eval_logits_at_input_size():
    model = make_model().eval()
    with torch.no_grad():
        logits = model(make_batch())
    assert logits.shape == (2, SMALL["num_classes"], 96, 128) and logits.dtype == torch.float32


def test_overfits_one_batch():
    model = make_model().train()
    batch = make_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss = sum(model(batch).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first, (first, loss.item())


def test_heads_compute_fp32_with_bf16_parameters():
    reference = make_model(dropout=0.0).train()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())
    low = copy.deepcopy(reference).bfloat16()
    low.backbone.float()
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference(batch), low(batch)
    for key in expected:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(channels=30), "not divisible by segmentation.norm_groups"),
    (dict(test_mode="sliding"), "test_mode"),
    (dict(aux_level=4), "aux_level"),
])
def test_config_errors_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        SegmentationConfig(**{**SMALL, **bad})
