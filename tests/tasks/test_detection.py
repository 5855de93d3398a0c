"""Mask R-CNN on the tiny PIIP-H6B preset: losses, predictions, fp32 heads, init, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.tasks.heads import float32_compute
from piip6b.tasks.detection import DetectionConfig, MaskRCNN

# Small widths so a step takes well under a second; the code paths are the full recipe's.
SMALL = dict(num_classes=5, fpn_channels=32, box_head_dim=64, mask_channels=32, rois_per_image=64,
             rpn_anchors_per_image=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)


def make_model(**overrides) -> MaskRCNN:
    torch.manual_seed(0)
    return MaskRCNN(create_backbone("piip_h6b_tiny"), DetectionConfig(**{**SMALL, **overrides}))


def make_batch(num_objects=(2, 0), size=(128, 96), seed=0) -> dict:
    """Padded images of true sizes `size` and (size - 32 px), rectangles with filled masks."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    sizes = [(h, w), (h - 32, w - 32)]
    targets = []
    for (ih, iw), count in zip(sizes, num_objects):
        boxes, masks = [], torch.zeros((count, ih, iw), dtype=torch.uint8)
        for k in range(count):
            x1, y1 = torch.randint(0, iw // 2, (1,), generator=gen).item(), torch.randint(0, ih // 2, (1,), generator=gen).item()
            x2, y2 = x1 + 16 + 8 * k, y1 + 20 + 4 * k
            boxes.append([x1, y1, min(x2, iw), min(y2, ih)])
            masks[k, y1:y2, x1:x2] = 1
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": 1 + torch.arange(count, dtype=torch.int64) % SMALL["num_classes"],
            "masks": masks,
        })
    return {"images": torch.randn(2, 3, h, w, generator=gen), "image_sizes": torch.tensor(sizes), "targets": targets}


LOSS_KEYS = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def modules_with_params(model):
    """The head modules that own parameters (the backbone's own ZeRO-3 behaviour is tested with it)."""
    return {name for name, m in model.named_modules()
            if not name.startswith("backbone") and any(True for _ in m.parameters(recurse=False))}


def called_modules(model, batch):
    called = set()
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.add(name)) for name, m in model.named_modules()]
    try:
        out = model(batch)
    finally:
        for h in hooks:
            h.remove()
    return out, called


@pytest.mark.parametrize("num_objects", [(2, 1), (0, 0)])
def test_training_losses_finite_and_every_module_runs(num_objects):
    model = make_model().train()
    losses, called = called_modules(model, make_batch(num_objects))
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values()), losses
    # ZeRO-3 safety: every module owning parameters ran, even with no objects in the batch.
    assert modules_with_params(model) <= called, modules_with_params(model) - called
    sum(losses.values()).backward()
    head_params = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    assert all(p.grad is not None for p in head_params)


def _needs_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(_needs_grad(v) for v in value)


def test_backward_reaches_the_same_modules_whatever_the_batch():
    """DeepSpeed ZeRO-3 records a module in its backward trace when the module's output needs a
    gradient, and every rank's trace must match: that set may not depend on the objects in the batch
    (here: a batch with objects vs one with none, so no positive RoI reaches the mask branch)."""
    model = make_model().train()

    def modules_needing_grad(batch):
        seen = set()
        hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.add(name) if _needs_grad(o) else None)
                 for name, m in model.named_modules()]
        try:
            torch.manual_seed(0)
            model(batch)
        finally:
            for h in hooks:
                h.remove()
        return seen

    with_objects = modules_needing_grad(make_batch((2, 1)))
    assert "roi_heads.mask_roi_pool" in with_objects
    assert modules_needing_grad(make_batch((0, 0))) == with_objects


def test_eval_predictions_at_true_image_size():
    model = make_model(score_threshold=0.0).eval()
    batch = make_batch()
    with torch.no_grad():
        predictions, called = called_modules(model, batch)
    assert modules_with_params(model) <= called
    assert len(predictions) == 2
    for pred, (h, w) in zip(predictions, batch["image_sizes"].tolist()):
        n = pred["boxes"].shape[0]
        assert 0 < n <= SMALL["rpn_post_nms_top_n_test"]
        assert pred["masks"].shape == (n, h, w) and pred["masks"].dtype == torch.bool
        assert pred["labels"].min() >= 1 and pred["labels"].max() <= SMALL["num_classes"]
        assert pred["boxes"][:, 2].max() <= w and pred["boxes"][:, 3].max() <= h
        assert pred["scores"].dtype == torch.float32


def test_eval_predictions_map_to_original_size():
    model = make_model(score_threshold=0.0).eval()
    batch = make_batch()
    with torch.no_grad():
        torch.manual_seed(0)
        resized = model(batch)
        torch.manual_seed(0)
        original = model(dict(batch, orig_sizes=[(256, 192), (48, 32)]))
    for a, b, (h, w), (oh, ow) in zip(resized, original, batch["image_sizes"].tolist(), [(256, 192), (48, 32)]):
        torch.testing.assert_close(b["boxes"], a["boxes"] * torch.tensor([ow / w, oh / h] * 2))
        assert b["masks"].shape[-2:] == (oh, ow)
        torch.testing.assert_close(b["scores"], a["scores"])


def test_overfits_one_batch():
    model = make_model().train()
    batch = make_batch((3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(25):
        loss = sum(model(batch).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_heads_compute_fp32_with_bf16_parameters():
    """bf16-stored heads (what DeepSpeed's bf16 mode does) compute in fp32 and match an fp32
    model holding the same bf16-rounded weights."""
    reference = make_model().train()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())
    low = copy.deepcopy(reference).bfloat16()
    low.backbone.float()  # backbone dtype is the backbone's business; this isolates the heads
    batch = make_batch((2, 1))
    dtypes = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: dtypes.add(o.dtype) if isinstance(o, torch.Tensor) else None)
             for name, m in low.named_modules() if name.startswith(("neck.", "rpn.", "roi_heads."))]
    # Both under bf16 autocast, as the backbone may run; the heads must switch it off themselves.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)  # the RoI samplers draw random numbers
        expected = reference(batch)
        torch.manual_seed(1)
        got = low(batch)
    for h in hooks:
        h.remove()
    assert dtypes == {torch.float32}
    for key in LOSS_KEYS:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    sum(got.values()).backward()
    assert low.roi_heads.box_head.fc6.weight.grad.dtype == torch.bfloat16


def test_float32_compute_restores_patched_linear():
    import torch.nn.functional as F

    original = F.linear
    sentinel = lambda *a, **k: None  # noqa: E731 -- stands in for DeepSpeed's zero3_linear_wrap
    F.linear = sentinel
    try:
        with float32_compute("cpu"):
            layer = torch.nn.Linear(3, 2).bfloat16()
            assert layer(torch.ones(1, 3)).dtype == torch.float32
        assert F.linear is sentinel
    finally:
        F.linear = original


def test_head_initialisation_matches_reference_recipe():
    model = make_model(fpn_channels=256, num_classes=80)
    assert model.rpn.head.conv[0][0].weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.roi_heads.box_predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert model.roi_heads.box_predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    fc6 = model.roi_heads.box_head.fc6.weight
    assert fc6.abs().max().item() <= (6 / sum(fc6.shape)) ** 0.5 + 1e-6  # Xavier-uniform bound
    assert all(b.detach().abs().max().item() == 0.0 for n, b in model.named_parameters()
               if n.endswith(".bias") and not n.startswith("backbone."))


def test_degenerate_box_is_reported():
    model = make_model().train()
    batch = make_batch((2, 1))
    batch["targets"][1]["boxes"][0, 2] = batch["targets"][1]["boxes"][0, 0]
    with pytest.raises(ValueError, match="batch image 1: 1 box.*zero width or height"):
        model(batch)
    batch = make_batch((2, 1))
    batch["targets"][0]["labels"][0] = 0
    with pytest.raises(ValueError, match="labels must lie in 1..5"):
        model(batch)


@pytest.mark.parametrize("bad, message", [
    (dict(anchor_sizes=(32, 64)), "one size per pyramid level"),
    (dict(roi_positive_fraction=1.5), "roi_positive_fraction"),
    (dict(num_classes=0), "num_classes"),
])
def test_config_errors_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        DetectionConfig(**bad)
