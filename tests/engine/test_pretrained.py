"""Pretrained weights reach the backbone through the engine's streaming path (one process, no ZeRO)."""

from __future__ import annotations

import re

import pytest
import torch

from piip6b.cli import main
from piip6b.engine.build import load_pretrained_sharded
from piip6b.models import create_backbone
from piip6b.testing import branch_shapes, expected_branch, pretrained_vit
from piip6b.weights import WeightsLoadError

ONLY_BRANCH1 = [r"branch2\..*"]  # these tests fill branch 1 and leave branch 2 at its init


def test_internvit_release_streams_into_branch1(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("piip_h6b_tiny")
    shapes = branch_shapes(backbone, "branch1.")
    release = pretrained_vit(shapes, cls_slot=True)
    torch.save({"module": release}, tmp_path / "intern_vit_6b_224px.pth")
    untouched = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("branch1.")}
    load_pretrained_sharded(backbone, {"branch1": str(tmp_path / "intern_vit_6b_224px.pth")}, allow_missing=ONLY_BRANCH1)
    state = backbone.state_dict()
    for name, value in expected_branch(release, shapes).items():
        assert torch.equal(state["branch1." + name], value), name
    assert all(torch.equal(state[k], v) for k, v in untouched.items())


def test_a_branch_left_without_weights_is_an_error_and_changes_nothing(tmp_path):
    """One coverage rule (`plan_sources`): together the files cover every pretrained parameter."""
    backbone = create_backbone("piip_h6b_tiny")
    torch.save({"module": pretrained_vit(branch_shapes(backbone, "branch1."), cls_slot=True)}, tmp_path / "6b.pth")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(WeightsLoadError, match=re.escape("branch2.")):
        load_pretrained_sharded(backbone, {"branch1": str(tmp_path / "6b.pth")})
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())


def test_wrong_file_for_the_branch_is_an_error_and_changes_nothing(tmp_path):
    backbone = create_backbone("piip_h6b_tiny")
    # A ViT-H file given for the 6B branch: widths differ, so no rule converts it.
    release = pretrained_vit(branch_shapes(backbone, "branch2."), cls_slot=True)
    torch.save({"model": release}, tmp_path / "mae_pretrain_vit_huge.pth")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(WeightsLoadError):
        load_pretrained_sharded(backbone, {"branch1": str(tmp_path / "mae_pretrain_vit_huge.pth")},
                                allow_missing=ONLY_BRANCH1)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())


def test_unknown_target_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="branch1"):
        load_pretrained_sharded(create_backbone("piip_h6b_tiny"), {"branch7": str(tmp_path / "x.pth")})


def test_converted_file_streams_into_its_branch(tmp_path):
    """The README's workflow: `piip6b convert ... --target branch1`, then model.pretrained.branch1."""
    torch.manual_seed(0)
    backbone = create_backbone("piip_h6b_tiny")
    shapes = branch_shapes(backbone, "branch1.")
    release = pretrained_vit(shapes, cls_slot=True)
    torch.save({"module": release}, tmp_path / "intern_vit_6b_224px.pth")
    converted = tmp_path / "6b.safetensors"
    assert main(["convert", str(tmp_path / "intern_vit_6b_224px.pth"), "--preset", "piip_h6b_tiny",
                 "--target", "branch1", "--out", str(converted)]) == 0
    load_pretrained_sharded(backbone, {"branch1": str(converted)}, allow_missing=ONLY_BRANCH1)
    state = backbone.state_dict()
    for name, value in expected_branch(release, shapes).items():
        assert torch.equal(state["branch1." + name], value), name
