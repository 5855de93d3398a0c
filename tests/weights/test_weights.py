"""Weight loading: every source layout, conversions, reports, exactness and failure safety.

Synthetic files are written by the tests in each real layout from a tiny preset's own branch
shapes (patch-14 kernels and 5x5 position grids, so the bicubic conversions run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from piip6b.models import create_backbone
from piip6b.testing import PRETRAIN_GRID, REPO, branch_shapes, expected_branch, expected_pos_embed, pretrained_vit
from piip6b.weights import (
    WeightsFormatError,
    WeightsLoadError,
    load_pretrained,
    load_pretrained_branches,
    open_source,
    save_state_dict,
)



def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"model modified by a failed load: {changed[:5]}"


def _assert_branch(model: nn.Module, prefix: str, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[prefix + name], value, rtol=0, atol=0, msg=f"{prefix + name}")


# ------------------------------------------------------------------------------- layouts
def _to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"embeddings.class_embedding": torch.zeros(1, 1, sd["pos_embed"].shape[-1])}
    for k, v in sd.items():
        if k == "pos_embed":
            out["embeddings.position_embedding"] = v
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embedding." + k.rsplit(".", 1)[1]] = v
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
            rest = m.group(2).replace(".gamma", "") if m.group(2) in ("ls1.gamma", "ls2.gamma") else m.group(2)
            out[f"encoder.layers.{m.group(1)}.{rest}"] = v
    return out


@pytest.fixture(scope="module")
def h6b_shapes():
    model = create_backbone("piip_h6b_tiny")
    return branch_shapes(model, "branch1."), branch_shapes(model, "branch2.")


def test_internvit_release_into_branch1(tmp_path, h6b_shapes, capsys):
    b1, _ = h6b_shapes
    sd = pretrained_vit(b1, cls_slot=True)
    torch.save({"module": {**sd, "cls_token": torch.zeros(1, 1, 64)}}, tmp_path / "intern_vit_6b_224px.pth")
    model = create_backbone("piip_h6b_tiny")
    before = _snapshot(model)
    report = load_pretrained(model, tmp_path / "intern_vit_6b_224px.pth", target="branch1")
    assert report.format == "internvit_release"
    _assert_branch(model, "branch1.", expected_branch(sd, b1))
    assert {n for n, _, _ in report.resized} == {"branch1.pos_embed", "branch1.patch_embed.proj.weight"}
    assert ("branch1.pos_embed", (1, 26, 64), (1, 17, 64)) in report.resized
    assert [k for k, _ in report.ignored] == ["cls_token"] and not report.missing and not report.unexpected
    # nothing outside the target moved
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items() if not k.startswith("branch1."))
    printed = capsys.readouterr().out
    assert "resized    2" in printed and "(1, 26, 64) -> (1, 17, 64)" in printed and "cls_token" in printed


@pytest.mark.parametrize("sharded", [False, True])
def test_internvit_hf_layout(tmp_path, h6b_shapes, sharded):
    b1, _ = h6b_shapes
    sd = pretrained_vit(b1, cls_slot=True, seed=1)
    hf = _to_hf(sd)
    if sharded:
        names = sorted(hf)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for fname, keys in shards.items():
            save_file({k: hf[k].contiguous() for k in keys}, tmp_path / fname)
            weight_map.update({k: fname for k in keys})
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        path = tmp_path  # the model folder
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in hf.items()}, path)
    model = create_backbone("piip_h6b_tiny")
    report = load_pretrained(model, path, target="branch1", log=None)
    assert report.format == "internvit_hf"
    assert [k for k, _ in report.ignored] == ["embeddings.class_embedding"]
    _assert_branch(model, "branch1.", expected_branch(sd, b1))


def test_mae_into_branch2_fills_layer_scale(tmp_path, h6b_shapes):
    _, b2 = h6b_shapes
    sd = {k: v for k, v in pretrained_vit(b2, cls_slot=True, seed=2).items() if ".ls" not in k}
    extra = {"cls_token": torch.zeros(1, 1, 32), "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}
    torch.save({"model": {**sd, **extra}}, tmp_path / "mae_pretrain_vit_huge.pth")
    model = create_backbone("piip_h6b_tiny")
    report = load_pretrained(model, tmp_path / "mae_pretrain_vit_huge.pth", target="branch2", log=None)
    assert report.format == "mae"
    assert len(report.filled) == 2 * 3  # ls1/ls2 of 3 blocks
    assert {k for k, _ in report.ignored} == set(extra)
    _assert_branch(model, "branch2.", expected_branch(sd, b2))


def test_deit3_and_deit_into_tsb(tmp_path):
    model = create_backbone("piip_tsb_tiny")
    expected = {}
    sources = {}
    for i, branch in enumerate(("branch1", "branch2", "branch3")):
        shapes = branch_shapes(model, branch + ".")
        dim = shapes["pos_embed"][-1]
        if branch == "branch3":  # DeiT-T: no layer scale, pos_embed with a cls slot (dropped on load)
            sd = {k: v for k, v in pretrained_vit(shapes, cls_slot=True, kernel=16, seed=10 + i).items() if "gamma" not in k}
            file = {**sd, "cls_token": torch.zeros(1, 1, dim), "head.weight": torch.zeros(10, dim), "head.bias": torch.zeros(10)}
        else:  # DeiT III: gamma_1/gamma_2 (the model's names too), pos_embed without a cls slot
            sd = pretrained_vit(shapes, cls_slot=False, kernel=16, seed=10 + i)
            file = {**sd, "cls_token": torch.zeros(1, 1, dim), "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
        path = tmp_path / f"{branch}.pth"
        torch.save({"model": file}, path)
        sources[branch] = path
        expected[branch] = expected_branch(sd, shapes)
    reports = load_pretrained_branches(model, sources, log=None)
    assert [r.format for r in reports] == ["deit3", "deit3", "deit"]
    for branch, exp in expected.items():
        _assert_branch(model, branch + ".", exp)
    assert all(not r.missing and not r.unexpected for r in reports)
    # The reference's DeiT-T branch has a layer scale the DeiT-T weights lack: 1.0, their identity.
    assert [len(r.filled) for r in reports] == [0, 0, 2 * 2]
    assert all(name.endswith(("gamma_1", "gamma_2")) for name, _ in reports[2].filled)


def test_branches_must_cover_everything_but_new_parts(tmp_path, h6b_shapes):
    b1, b2 = h6b_shapes
    torch.save({"module": pretrained_vit(b1, cls_slot=True)}, tmp_path / "6b.pth")
    mae = {k: v for k, v in pretrained_vit(b2, cls_slot=True, seed=3).items() if ".ls" not in k}
    torch.save({"model": mae}, tmp_path / "mae.pth")
    model = create_backbone("piip_h6b_tiny")
    before = _snapshot(model)
    with pytest.raises(WeightsLoadError, match=r"branch2\.blocks\.0\.norm1\.weight") as err:
        load_pretrained_branches(model, {"branch1": tmp_path / "6b.pth"}, log=None)
    assert "random init" in str(err.value)
    _assert_untouched(model, before)
    load_pretrained_branches(model, {"branch1": tmp_path / "6b.pth", "branch2": tmp_path / "mae.pth"}, log=None)
    state = model.state_dict()
    unchanged = {k for k in before if torch.equal(before[k], state[k])}
    # unchanged: only new-by-construction parts, and ViT-H layer scales whose init (1.0) equals the fill
    fills = {k for k in unchanged if re.fullmatch(r"branch2\.blocks\.\d\.ls[12]\.gamma", k)}
    assert all(torch.equal(state[k], torch.ones_like(state[k])) for k in fills)
    assert unchanged - fills and all(re.match(r"(interactions\.|merge_branch\d\.|fpn\d\.|w\d$)", k) for k in unchanged - fills)


# ------------------------------------------------------------------- released + own checkpoints
def _random_like(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _heads() -> dict[str, torch.Tensor]:
    return {"neck.lateral_convs.0.conv.weight": torch.zeros(4, 64, 1, 1), "rpn_head.rpn_conv.weight": torch.zeros(4, 4, 3, 3),
            "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 8)}


@pytest.mark.parametrize("kind", ["mmdet", "deepspeed"])
def test_released_piip_checkpoint(tmp_path, kind):
    ref = create_backbone("piip_h6b_tiny")
    weights = _random_like(ref, 5)
    detector = {**{"backbone." + k: v for k, v in weights.items()}, **_heads()}
    if kind == "mmdet":
        blob = {"meta": {"mmdet_version": "2.25.3", "CLASSES": ("person", "car"), "epoch": 12}, "state_dict": detector}
    else:
        blob = {"module": detector, "buffer_names": [], "ds_version": "0.8.0", "lr_scheduler": None,
                "param_shapes": [{k: v.shape for k, v in detector.items()}]}
    torch.save(blob, tmp_path / "release.pth")
    model = create_backbone("piip_h6b_tiny")
    report = load_pretrained(model, tmp_path / "release.pth", log=None)
    assert report.format == "piip_release" and len(report.loaded) == len(weights)
    assert {k for k, _ in report.ignored} == set(_heads())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())

    # the same file into a detector-shaped model: backbone.* lands on backbone.*, heads are ours
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_backbone("piip_h6b_tiny")
            self.head = nn.Linear(4, 2)

    det = Detector()
    report = load_pretrained(det, tmp_path / "release.pth", log=None)
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert all(torch.equal(det.state_dict()["backbone." + k], v) for k, v in weights.items())


def test_own_safetensors_round_trip(tmp_path):
    src = create_backbone("piip_h6b_tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "export.safetensors"
    digest = save_state_dict(path, src.state_dict(), {"piip6b.preset": "piip_h6b_tiny"})
    plain = load_file(path)  # readable by the reference library
    assert set(plain) == set(src.state_dict()) and all(torch.equal(plain[k], v) for k, v in src.state_dict().items())
    with open_source(path) as source:
        assert source.metadata["piip6b.tensors_sha256"] == digest
    model = create_backbone("piip_h6b_tiny")
    report = load_pretrained(model, path, log=None)
    assert report.format == "piip6b" and not report.missing and not report.ignored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


def test_convert_command_writes_reference_layout(tmp_path, h6b_shapes):
    b1, _ = h6b_shapes
    sd = pretrained_vit(b1, cls_slot=True, seed=7)
    torch.save({"module": {**sd, "cls_token": torch.zeros(1, 1, 64)}}, tmp_path / "intern_vit_6b_224px.pth")
    out = tmp_path / "b1.safetensors"
    cmd = [sys.executable, "-m", "piip6b.cli", "convert", str(tmp_path / "intern_vit_6b_224px.pth"),
           "--preset", "piip_h6b_tiny", "--target", "branch1", "--out", str(out), "--dtype", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resized    2" in proc.stdout
    plain = load_file(out)
    assert set(plain) == {"branch1." + k for k in b1} and all(v.dtype == torch.bfloat16 for v in plain.values())
    with open_source(out) as source:
        meta = source.metadata
    assert meta["piip6b.source_format"] == "internvit_release" and meta["piip6b.target"] == "branch1"
    assert len(meta["piip6b.source_sha256"]) == 64
    conversions = json.loads(meta["piip6b.conversions"])
    assert ["branch1.pos_embed", [1, 26, 64], [1, 17, 64], "bicubic"] in conversions["resized"]
    # loading the converted file (defaults to the branch it was written for) = converting on the fly, in bf16
    model = create_backbone("piip_h6b_tiny")
    load_pretrained(model, out, log=None)
    expected = expected_branch(sd, b1)
    for k, v in expected.items():
        assert torch.equal(model.state_dict()["branch1." + k], v.to(torch.bfloat16).float()), k
    # without --target a single ViT into a 2-branch preset is refused with the choices
    bad = subprocess.run(cmd[:7] + ["--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "--target" in (bad.stderr + bad.stdout) and "branch2" in (bad.stderr + bad.stdout)


# ------------------------------------------------------------------------------- failures
class NotAWeight:  # a custom class: unpickling it would need arbitrary code
    def __init__(self) -> None:
        self.x = 1


def test_failures_are_clear_and_leave_model_untouched(tmp_path, h6b_shapes):
    model = create_backbone("piip_h6b_tiny")
    before = _snapshot(model)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 10)
    with pytest.raises(WeightsFormatError, match="truncated or corrupt"):
        load_pretrained(model, corrupt, log=None)

    good = tmp_path / "good.safetensors"
    save_state_dict(good, model.state_dict())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsFormatError, match="truncated or corrupt"):
        load_pretrained(model, truncated, log=None)

    torch.save({"state_dict": {"w1": torch.ones(())}, "cfg": NotAWeight()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsFormatError, match="run Python code") as err:
        load_pretrained(model, tmp_path / "pickled.pth", log=None)
    assert "NotAWeight" in str(err.value) and "weights_only=False" in str(err.value)

    other = create_backbone("piip_tsb_tiny")
    save_state_dict(tmp_path / "tsb.safetensors", other.state_dict())
    with pytest.raises(WeightsLoadError) as err:
        load_pretrained(model, tmp_path / "tsb.safetensors", log=None)
    msg = str(err.value)
    # DeiT III layer scales have no place in the InternViT branches; pos tables differ in cls slot.
    assert "unexpected in the file" in msg and "branch1.blocks.0.gamma_1" in msg and "shapes no rule converts" in msg
    assert "(1, 16, 64) -> branch1.pos_embed (1, 17, 64)" in msg  # both shapes named

    _assert_untouched(model, before)


@pytest.mark.parametrize("protocol", [4, 5])
def test_later_pickle_protocol_is_named_not_called_corrupt(tmp_path, protocol, recwarn):
    # torch.save(..., pickle_protocol=5) writes opcodes torch's safe unpickler refuses (FRAME, 149).
    model = create_backbone("piip_h6b_tiny")
    before = _snapshot(model)
    path = tmp_path / f"protocol{protocol}.pth"
    torch.save(model.state_dict(), path, pickle_protocol=protocol)
    with pytest.raises(WeightsFormatError) as err:
        load_pretrained(model, path, log=None)
    message = str(err.value)
    assert f"pickled with protocol {protocol}" in message and "reads only protocol 2" in message
    assert "corrupt" not in message and "Unsupported operand" not in message
    assert "\n" not in message  # it ends up as a failed command's one line
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    _assert_untouched(model, before)
    # The default protocol of the same weights loads.
    torch.save(model.state_dict(), tmp_path / "protocol2.pth")
    load_pretrained(model, tmp_path / "protocol2.pth", log=None)


def test_allow_patterns_are_explicit(tmp_path, h6b_shapes):
    b1, _ = h6b_shapes
    sd = pretrained_vit(b1, cls_slot=True)
    sd["blocks.0.extra_adapter.weight"] = torch.zeros(3)
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "odd.pth")
    model = create_backbone("piip_h6b_tiny")
    before = _snapshot(model)
    with pytest.raises(WeightsLoadError) as err:
        load_pretrained(model, tmp_path / "odd.pth", target="branch1", log=None)
    assert "blocks.0.extra_adapter.weight" in str(err.value) and "branch1.blocks.1.mlp.fc2.bias" in str(err.value)
    _assert_untouched(model, before)
    report = load_pretrained(model, tmp_path / "odd.pth", target="branch1", log=None,
                             allow_missing=[r"branch1\.blocks\.1\.mlp\.fc2\.bias"], allow_unexpected=[r".*extra_adapter.*"])
    assert report.missing == ["branch1.blocks.1.mlp.fc2.bias"] and report.unexpected == ["blocks.0.extra_adapter.weight"]
    assert torch.equal(model.state_dict()["branch1.blocks.1.mlp.fc2.bias"], before["branch1.blocks.1.mlp.fc2.bias"])


def _legacy_names(state: dict[str, torch.Tensor], deit_t_branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A state dict as this project wrote it before its names were the reference's for every
    preset: DeiT III gammas as ls1/ls2.gamma, DeiT-T branches without layer scale, interaction
    sides named by absolute branch index."""
    old = {}
    for name, value in state.items():
        if name.split(".")[0] in deit_t_branches and re.search(r"\.gamma_[12]$", name):
            continue
        name = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", name)
        unit = re.search(r"interaction_units_(\d)(\d)\.", name)
        if unit:
            i, j = unit.groups()
            name = name.replace(".branch2to1_", f".branch{j}to{i}_").replace(".branch1to2_", f".branch{i}to{j}_")
        old[name] = value
    return old


def test_legacy_piip6b_names_are_renamed_and_reported(tmp_path, capsys):
    torch.manual_seed(3)
    source = create_backbone("piip_tsbl_vit_t_tiny")  # written then as `piip_tsbl` (ViT-T branch 4)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.rand_like(p))
    state = source.state_dict()
    old = _legacy_names(state, ("branch4",))
    assert any(".branch4to3_injector." in k for k in old) and "branch1.blocks.0.ls1.gamma" in old
    save_state_dict(tmp_path / "old.safetensors", old)

    model = create_backbone("piip_tsbl_vit_t_tiny")
    report = load_pretrained(model, tmp_path / "old.safetensors")
    loaded = model.state_dict()
    for name, value in state.items():
        if name.startswith("branch4.") and name.endswith(("gamma_1", "gamma_2")):
            assert torch.equal(loaded[name], torch.ones_like(value)), name
        else:
            assert torch.equal(loaded[name], value), name
    renamed = {new: old for old, new, _ in report.renamed}
    assert renamed["interactions.0.interaction_units_34.branch2to1_injector.ca_gamma"] == (
        "interactions.0.interaction_units_34.branch4to3_injector.ca_gamma")
    assert renamed["interactions.1.interaction_units_23.branch1to2_proj.weight"] == (
        "interactions.1.interaction_units_23.branch2to3_proj.weight")
    assert renamed["branch1.blocks.0.gamma_1"] == "branch1.blocks.0.ls1.gamma"
    assert not any(k.startswith("interactions.0.interaction_units_12.") for k in renamed)  # unchanged names
    assert sorted(n for n, _ in report.filled) == sorted(n for n in state if n.startswith("branch4.") and "gamma_" in n)
    printed = capsys.readouterr().out
    assert f"renamed    {len(report.renamed)}" in printed and "branch1/branch2 whatever the branch indices" in printed


def test_legacy_names_never_shadow_current_ones(tmp_path):
    """An InternViT branch's ls1.gamma is a current name: it is loaded as is, not renamed."""
    model = create_backbone("piip_h6b_tiny")
    save_state_dict(tmp_path / "h6b.safetensors", model.state_dict())
    report = load_pretrained(create_backbone("piip_h6b_tiny"), tmp_path / "h6b.safetensors", log=None)
    assert report.renamed == [] and report.filled == []
