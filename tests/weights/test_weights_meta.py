"""Full-size key mapping, checked without allocating: synthetic meta-device InternViT-6B / MAE
ViT-H / released files against the reference's real key lists (`tests/fixtures/reference/`)."""

from __future__ import annotations

import re

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.weights import TensorInfo, iter_converted, plan_load, target_spec
from piip6b.weights.formats import StateDictSource

from tests.fixtures import reference_key_rows



def _tsv(preset: str) -> dict[str, TensorInfo]:
    return {key: TensorInfo(shape, torch.float32) for key, shape, _ in reference_key_rows(preset)}


def _release_6b(ref: dict[str, TensorInfo], prefix: str) -> dict[str, torch.Tensor]:
    """What intern_vit_6b_224px.pth holds, as meta tensors: patch 14, 16x16 grid + cls slot."""
    sd = {"cls_token": torch.empty(1, 1, 3200, device="meta", dtype=torch.bfloat16)}
    for key, info in ref.items():
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix):]
        shape = {"pos_embed": (1, 257, 3200), "patch_embed.proj.weight": (3200, 3, 14, 14)}.get(rel, info.shape)
        sd[rel] = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    return sd


def _hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k, k)
        k = k.replace("patch_embed.proj.", "embeddings.patch_embedding.")
        k = re.sub(r"^blocks\.(\d+)\.(ls[12])\.gamma$", r"encoder.layers.\1.\2", k)
        out[re.sub(r"^blocks\.", "encoder.layers.", k)] = v
    return out


FULL_PRESETS = ("internvit6b_baseline", "internvit6b_baseline_ade20k", "piip_h6b", "piip_h6b_speedup", "piip_h6b_ade20k",
                "piip_lh6b", "piip_tsb", "piip_sbl", "piip_tsbl", "piip_tsbl_vit_t")


def test_meta_model_matches_reference_keys():
    with torch.device("meta"):
        for preset in FULL_PRESETS:
            ours = {k: v.shape for k, v in target_spec(create_backbone(preset)).items()}
            assert ours == {k: v.shape for k, v in _tsv(preset).items()}, preset


@pytest.mark.parametrize("preset", FULL_PRESETS)
def test_released_detector_of_every_preset_loads_name_for_name(preset):
    """A released checkpoint holds the reference's names under `backbone.`: every tensor lands on the
    same name of our model, with no rename, resize or fill."""
    released = {"backbone." + k: torch.empty(info.shape, device="meta") for k, info in _tsv(preset).items()}
    released["roi_head.bbox_head.fc_cls.weight"] = torch.empty(81, 1024, device="meta")
    with torch.device("meta"):
        ours = target_spec(create_backbone(preset))
    plan = plan_load(StateDictSource(released), ours)
    report = plan.report
    assert report.format == "piip_release" and len(report.loaded) == len(ours)
    assert [(e.source, e.target) for e in plan.entries] == [("backbone." + k, k) for k in ours]
    assert not (report.renamed or report.resized or report.filled or report.missing or report.unexpected)


@pytest.mark.parametrize("layout", ["internvit_release", "internvit_hf"])
def test_internvit6b_release_maps_onto_h6b_branch1(layout):
    ref = _tsv("piip_h6b")
    sd = _release_6b(ref, "branch1.")
    if layout == "internvit_hf":
        sd = _hf_names(sd)
    plan = plan_load(StateDictSource(sd, "intern_vit_6b_224px"), ref, target="branch1")
    assert plan.report.format == layout
    branch1 = [k for k in ref if k.startswith("branch1.")]
    assert len(branch1) == 3 + 48 * 13
    assert [e.target for e in plan.entries] == branch1  # every key, model order, nothing filled
    assert sorted(plan.report.resized) == [
        ("branch1.patch_embed.proj.weight", (3200, 3, 14, 14), (3200, 3, 16, 16)),
        ("branch1.pos_embed", (1, 257, 3200), (1, 197, 3200)),
    ]
    assert len(plan.report.ignored) == 1 and not plan.report.missing and not plan.report.unexpected
    # the streamed conversion yields exactly the reference shapes (meta tensors: nothing allocated)
    for name, tensor in iter_converted(StateDictSource(sd), ref, target="branch1", log=None):
        assert tensor.is_meta and tuple(tensor.shape) == ref[name].shape and tensor.dtype == torch.float32, name


def test_mae_vit_h_maps_onto_h6b_branch2():
    ref = _tsv("piip_h6b")
    sd = {"cls_token": torch.empty(1, 1, 1280, device="meta"), "norm.weight": torch.empty(1280, device="meta"),
          "norm.bias": torch.empty(1280, device="meta")}
    for key, info in ref.items():
        if key.startswith("branch2.") and ".ls" not in key:
            rel = key[len("branch2."):]
            shape = {"pos_embed": (1, 257, 1280), "patch_embed.proj.weight": (1280, 3, 14, 14)}.get(rel, info.shape)
            sd[rel] = torch.empty(shape, device="meta")
    plan = plan_load(StateDictSource(sd, "mae_pretrain_vit_huge"), ref, target="branch2")
    assert plan.report.format == "mae"
    assert len(plan.report.filled) == 2 * 32 and len(plan.report.loaded) == len([k for k in ref if k.startswith("branch2.")]) - 64
    assert {k for k, _ in plan.report.ignored} == {"cls_token", "norm.weight", "norm.bias"}


def test_internvit_baseline_and_released_detector():
    baseline = _tsv("internvit6b_baseline")
    vit_only = {k: v for k, v in baseline.items() if not k.startswith(("up1.", "up2."))}
    plan = plan_load(StateDictSource(_release_6b(vit_only, "")), baseline)
    assert plan.report.format == "internvit_release"
    assert set(plan.report.missing) == {k for k in baseline if k.startswith(("up1.", "up2."))}  # new by construction

    ref = _tsv("piip_h6b")
    released = {"backbone." + k: torch.empty(v.shape, device="meta") for k, v in ref.items()}
    released["neck.fpn_convs.0.conv.weight"] = torch.empty(256, 256, 3, 3, device="meta")
    plan = plan_load(StateDictSource(released), ref)
    assert plan.report.format == "piip_release" and len(plan.report.loaded) == len(ref)
    assert not plan.report.resized and [k for k, _ in plan.report.ignored] == ["neck.fpn_convs.0.conv.weight"]
