"""The PIIP model family: shapes, errors, identity at init, key layout and fidelity numbers."""

from __future__ import annotations


import pytest
import torch

from piip6b.models import create_backbone, get_spec, list_presets
from piip6b.models.counting import count_flops, count_params
from piip6b.models.interaction import InteractionBlock

from tests.fixtures import reference_key_rows

TINY = [name for name in list_presets() if name.endswith("_tiny")]
FULL = [name for name in list_presets() if not name.endswith("_tiny")]


def test_every_full_preset_has_a_tiny_twin():
    assert sorted(f"{name}_tiny" for name in FULL) == sorted(TINY)
    assert {"internvit6b_baseline", "piip_h6b", "piip_h6b_speedup", "piip_lh6b", "piip_tsb", "piip_sbl", "piip_tsbl"} == set(FULL)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    backbone = create_backbone(name)
    size = backbone.img_sizes[-1]
    images = torch.randn(2, 3, size, size + backbone.size_divisor)  # non-square on purpose
    features = backbone(images)
    assert len(features) == 4
    for stride, fmap in zip((4, 8, 16, 32), features):
        assert fmap.dtype == torch.float32
        assert fmap.shape == (2, backbone.out_channels, size // stride, (size + backbone.size_divisor) // stride)
    sum(f.square().mean() for f in features).backward()
    without_grad = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert without_grad == []


@pytest.mark.parametrize("name", ["piip_h6b_tiny", "piip_tsb_tiny", "internvit6b_baseline_tiny"])
def test_input_not_a_multiple_raises_naming_the_multiple(name):
    backbone = create_backbone(name)
    d = backbone.size_divisor
    with pytest.raises(ValueError, match=f"multiple of {d}"):
        backbone(torch.randn(1, 3, d * 2 + 16, d * 2))


def test_size_divisors_follow_branch_ratios():
    assert get_spec("piip_h6b").size_divisor == 32
    assert get_spec("piip_tsb").size_divisor == 224  # the reference pads TSB to 224
    assert get_spec("internvit6b_baseline").size_divisor == 32


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError) as info:
        create_backbone("piip_h6bb")
    message = str(info.value)
    assert "piip_h6b" in message and "internvit6b_baseline" in message and "Did you mean" in message


def test_img_sizes_override_and_wrong_count():
    assert get_spec("piip_h6b", img_sizes=[768, 1024]).img_sizes == (768, 1024)
    with pytest.raises(ValueError, match="one size per branch"):
        get_spec("piip_h6b", img_sizes=[512])


@pytest.mark.parametrize("name", ["piip_h6b_tiny", "piip_h6b_speedup_tiny", "piip_tsbl_tiny"])
def test_interaction_units_are_identity_at_init(name):
    torch.manual_seed(0)
    backbone = create_backbone(name).train()  # drop path active: gates at 0 must still give identity
    spec = backbone.spec
    grids = [(s // 16, s // 16) for s in spec.img_sizes]
    xs = [torch.randn(2, h * w, b.embed_dim) for (h, w), b in zip(grids, spec.branches)]
    from piip6b.models.deform_attn import grid_reference_points

    refs = [grid_reference_points(g) for g in grids]
    for block in backbone.interactions:
        assert isinstance(block, InteractionBlock)
        outs = block(xs, grids, refs)
        for before, after in zip(xs, outs):
            assert torch.equal(before, after)
    gates = [p for n, p in backbone.named_parameters() if n.endswith(("ca_gamma", "cffn_gamma"))]
    assert gates and all(torch.count_nonzero(g) == 0 for g in gates)


@pytest.mark.parametrize(
    "name, total",
    [
        ("piip_h6b", 7_293_644_290),
        ("piip_h6b_speedup", 7_172_845_570),
        ("internvit6b_baseline", 6_026_070_400),
    ],
)
def test_state_dict_matches_reference_exactly(name, total):
    with torch.device("meta"):
        backbone = create_backbone(name)
    ours = [(k, tuple(v.shape), v.numel()) for k, v in backbone.state_dict().items()]
    assert ours == reference_key_rows(name)
    assert sum(p.numel() for p in backbone.parameters()) == total


@pytest.mark.parametrize("name, readme_millions", [("piip_h6b", 6872), ("piip_h6b_speedup", 6752), ("internvit6b_baseline", 5919)])
def test_readme_parameter_convention(name, readme_millions):
    count = count_params(name)
    assert abs(count.readme_total / 1e6 - readme_millions) < 0.5
    assert count.total == sum(count.by_part.values())


@pytest.mark.parametrize("name, readme_gflops", [("internvit6b_baseline", 29_323), ("piip_h6b", 11_080), ("piip_h6b_speedup", 10_692)])
def test_readme_flops_convention_within_one_percent(name, readme_gflops):
    count = count_flops(name, 1024)
    assert abs(count.gflops_readme - readme_gflops) / readme_gflops < 0.01
    assert count.gflops_full > count.gflops_readme  # merge stacks and ConvT pyramid are extra


def test_h6b_flops_ratio_to_baseline():
    ratio = count_flops("piip_h6b", 1024).gflops_readme / count_flops("internvit6b_baseline", 1024).gflops_readme
    assert abs(ratio - 0.378) < 0.005  # README: 37.8 %


@pytest.mark.parametrize("name", FULL)
def test_full_presets_build_on_meta(name):
    with torch.device("meta"):
        backbone = create_backbone(name)
    assert all(p.is_meta for p in backbone.parameters())


def test_lr_layer_ids_are_fractional_and_cover_branches():
    backbone = create_backbone("piip_h6b_tiny")  # 6B depth 4, ViT-H depth 3 -> skip stride 4/3
    assert backbone.num_layers == 4
    assert backbone.lr_layer_id("branch1.pos_embed") == 0
    assert backbone.lr_layer_id("branch2.patch_embed.proj.weight") == 0
    assert backbone.lr_layer_id("branch1.blocks.3.attn.qkv.weight") == 4
    assert backbone.lr_layer_id("branch2.blocks.0.mlp.fc1.weight") == pytest.approx(4 / 3)  # not floored to 1
    assert backbone.lr_layer_id("branch2.blocks.1.mlp.fc1.weight") == pytest.approx(2 * 4 / 3)
    assert backbone.lr_layer_id("branch2.blocks.2.norm1.weight") == pytest.approx(4)  # last block = branch 1's last
    for name in ("interactions.0.interaction_units_12.branch2to1_injector.ca_gamma", "merge_branch1.0.weight", "fpn1.0.weight", "w1"):
        assert backbone.lr_layer_id(name) == 5
    baseline = create_backbone("internvit6b_baseline_tiny")
    assert baseline.lr_layer_id("blocks.1.ls1.gamma") == 2
    assert baseline.lr_layer_id("pos_embed") == 0
    assert baseline.lr_layer_id("up1.0.weight") == baseline.num_layers + 1


def test_grad_checkpointing_gives_equal_gradients():
    torch.manual_seed(0)
    plain = create_backbone("piip_h6b_tiny", drop_path_rate=0.0, interaction_drop_path_rate=0.0)
    checkpointed = create_backbone("piip_h6b_tiny", drop_path_rate=0.0, interaction_drop_path_rate=0.0)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(every=1, interactions=True)
    # Non-zero gates so the interactions contribute to the gradients.
    with torch.no_grad():
        for model in (plain, checkpointed):
            for name, p in model.named_parameters():
                if name.endswith(("ca_gamma", "cffn_gamma")):
                    p.fill_(0.5)
    images = torch.randn(2, 3, 128, 128)
    for model in (plain, checkpointed):
        sum(f.square().mean() for f in model(images)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_init_is_owned_by_each_module():
    torch.manual_seed(0)
    backbone = create_backbone("piip_h6b_tiny")
    unit = backbone.interactions[0].interaction_units_12
    attn = unit.branch2to1_injector.attn
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    offsets = attn.sampling_offsets.bias.view(attn.heads, attn.levels, attn.points, 2)
    # Deformable-DETR: point p of each head lies (p + 1) grid steps along that head's direction.
    assert torch.allclose(offsets[:, 0, 3].abs().amax(-1), torch.full((attn.heads,), 4.0))
    qkv = backbone.branch1.blocks[0].attn.qkv.weight
    assert 0.015 < qkv.std().item() < 0.025 and qkv.abs().max() <= 0.04 + 1e-6  # truncated normal, std 0.02
    assert torch.allclose(backbone.branch1.blocks[0].ls1.gamma, torch.full_like(backbone.branch1.blocks[0].ls1.gamma, 0.1))
