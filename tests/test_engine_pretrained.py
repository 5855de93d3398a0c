"""Pretrained weights reach the backbone through the engine's streaming path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from piip6b.models import create_backbone
from piip6b.train import _load_pretrained
from piip6b.weights import WeightsLoadError

sys.path.insert(0, str(Path(__file__).parent))
from test_weights import _branch_shapes, _expected_branch, _pretrained_vit  # noqa: E402


def test_internvit_release_streams_into_branch1(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("piip_h6b_tiny")
    shapes = _branch_shapes(backbone, "branch1.")
    release = _pretrained_vit(shapes, cls_slot=True)
    torch.save({"module": release}, tmp_path / "intern_vit_6b_224px.pth")
    untouched = {k: v.clone() for k, v in backbone.state_dict().items() if not k.startswith("branch1.")}
    _load_pretrained(backbone, {"branch1": str(tmp_path / "intern_vit_6b_224px.pth")})
    state = backbone.state_dict()
    for name, value in _expected_branch(release, shapes).items():
        assert torch.equal(state["branch1." + name], value), name
    assert all(torch.equal(state[k], v) for k, v in untouched.items())


def test_wrong_file_for_the_branch_is_an_error_and_changes_nothing(tmp_path):
    backbone = create_backbone("piip_h6b_tiny")
    # A ViT-H file given for the 6B branch: widths differ, so no rule converts it.
    release = _pretrained_vit(_branch_shapes(backbone, "branch2."), cls_slot=True)
    torch.save({"model": release}, tmp_path / "mae_pretrain_vit_huge.pth")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(WeightsLoadError):
        _load_pretrained(backbone, {"branch1": str(tmp_path / "mae_pretrain_vit_huge.pth")})
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())


def test_unknown_target_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="branch1"):
        _load_pretrained(create_backbone("piip_h6b_tiny"), {"branch7": str(tmp_path / "x.pth")})


def test_converted_file_streams_into_its_branch(tmp_path):
    """The README's workflow: `piip6b convert ... --target branch1`, then model.pretrained.branch1."""
    from piip6b.cli import main

    torch.manual_seed(0)
    backbone = create_backbone("piip_h6b_tiny")
    shapes = _branch_shapes(backbone, "branch1.")
    release = _pretrained_vit(shapes, cls_slot=True)
    torch.save({"module": release}, tmp_path / "intern_vit_6b_224px.pth")
    converted = tmp_path / "6b.safetensors"
    assert main(["convert", str(tmp_path / "intern_vit_6b_224px.pth"), "--preset", "piip_h6b_tiny",
                 "--target", "branch1", "--out", str(converted)]) == 0
    _load_pretrained(backbone, {"branch1": str(converted)})
    state = backbone.state_dict()
    for name, value in _expected_branch(release, shapes).items():
        assert torch.equal(state["branch1." + name], value), name
