"""The PIIP model family: shapes, errors, identity at init, key layout and fidelity numbers."""

from __future__ import annotations


import pytest
import torch

from piip6b.models import create_backbone, get_spec, list_presets
from piip6b.models.counting import count_flops, count_params
from piip6b.models.interaction import InteractionBlock

from tests.fixtures import reference_facts, reference_key_rows

TINY = [name for name in list_presets() if name.endswith("_tiny")]
FULL = [name for name in list_presets() if not name.endswith("_tiny")]
FACTS = reference_facts()


def _facts(name: str) -> dict:
    # The ADE20K H6B preset's own sizes are the 512/512 config's.
    return FACTS["piip_h6b_ade20k@512/512" if name == "piip_h6b_ade20k" else name]


def test_every_full_preset_has_a_tiny_twin():
    assert sorted(f"{name}_tiny" for name in FULL) == sorted(TINY)
    assert {"internvit6b_baseline", "internvit6b_baseline_ade20k", "piip_h6b", "piip_h6b_speedup", "piip_h6b_ade20k",
            "piip_lh6b", "piip_tsb", "piip_sbl", "piip_tsbl", "piip_tsbl_vit_t"} == set(FULL)


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


@pytest.mark.parametrize("name", FULL)
def test_state_dict_matches_reference_exactly(name):
    """Keys, shapes and order of the reference's state dict, and its as-built parameter total."""
    with torch.device("meta"):
        backbone = create_backbone(name)
    ours = [(k, tuple(v.shape), v.numel()) for k, v in backbone.state_dict().items()]
    assert ours == reference_key_rows(name)
    assert sum(p.numel() for p in backbone.parameters()) == _facts(name)["total_params"]


@pytest.mark.parametrize("size", [192, 256, 384, 512])
def test_ade20k_h6b_sizes_match_reference_totals(size):
    """The four ADE20K H6B configs: position tables at each branch's input grid."""
    with torch.device("meta"):
        backbone = create_backbone("piip_h6b_ade20k", img_sizes=[size, 512])
    facts = FACTS[f"piip_h6b_ade20k@{size}/512"]
    assert sum(p.numel() for p in backbone.parameters()) == facts["total_params"]
    assert [list(backbone.branch(k).pos_embed.shape) for k in range(2)] == [b["pos_embed"] for b in facts["branches"]]


def _block_facts(block, spec) -> dict:
    from piip6b.models.layers import RMSNorm
    from piip6b.models.vit import Block, LayerScaleBlock

    return {
        "block": {Block: "internvit", LayerScaleBlock: "deit3"}[type(block)],
        "norm": "rms" if isinstance(block.norm1, RMSNorm) else "layer",
        "mlp_act": {"none": "gelu", "tanh": "gelu_tanh"}[block.mlp.act.approximate],
        "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, torch.nn.Identity),
        "window": block.attn.window_size,
        "drop_path": block.drop_path.drop_prob,
    }


@pytest.mark.parametrize("name", FULL)
def test_preset_is_built_as_its_reference_config(name):
    """Block class, norm, MLP activation, layer scale, windows, drop path, position table, sizes and
    groups per branch; interaction projections, norms and sizes; pyramid norm (tests/fixtures)."""
    facts = _facts(name)
    with torch.device("meta"):
        backbone = create_backbone(name)
    spec = backbone.spec
    assert len(spec.branches) == len(facts["branches"])
    for k, (branch, ref) in enumerate(zip(spec.branches, facts["branches"])):
        blocks = backbone.blocks if len(spec.branches) == 1 else backbone.branch(k).blocks
        pos = backbone.pos_embed if len(spec.branches) == 1 else backbone.branch(k).pos_embed
        assert (branch.embed_dim, branch.depth, spec.img_sizes[k]) == (ref["embed_dim"], ref["depth"], ref["img_size"])
        assert branch.layer_scale == ref["layer_scale"]
        assert list(pos.shape) == ref["pos_embed"]
        got = [_block_facts(block, branch) for block in blocks]
        for key in ("block", "norm", "mlp_act", "qkv_bias", "qk_norm"):
            assert {f[key] for f in got} == {ref[key]}, (k, key)
        assert [f["window"] for f in got] == ref["window"]
        assert [f["drop_path"] for f in got] == pytest.approx(ref["drop_path"], abs=1e-6)
        if len(spec.branches) > 1:
            assert [list(g) for g in spec.groups[k]] == ref["interaction_indexes"]
    pyramid = backbone.up1[1] if len(spec.branches) == 1 else backbone.fpn1[1]
    assert {"LayerNorm2d": "LayerNorm(channels_first)"}.get(type(pyramid).__name__, type(pyramid).__name__) == facts["pyramid_norm"]
    if len(spec.branches) > 1:
        ref = facts["interaction"]
        unit = backbone.interactions[0].interaction_units_12
        injector = unit.branch2to1_injector
        assert len(backbone.interactions) == ref["count"]
        assert hasattr(unit, "branch2to1_proj") == ref["proj"]
        assert ("layer" if isinstance(injector.query_norm, torch.nn.LayerNorm) else "none") == ref["norm"]
        assert (injector.attn.heads, injector.attn.points) == (ref["heads"], ref["points"])
        assert (spec.interaction.value_ratio, spec.interaction.ffn_ratio) == (ref["value_ratio"], ref["ffn_ratio"])
        assert injector.drop_path.drop_prob == ref["drop_path"]


def test_tsbl_as_released_and_as_described():
    """Released TSBL: branch 4 is a ViT-S (the reference builds it from branch 3's settings);
    the paper's TSBL: a ViT-T. Both see the largest image."""
    released, paper = get_spec("piip_tsbl"), get_spec("piip_tsbl_vit_t")
    assert released.branches[3].embed_dim == released.branches[2].embed_dim == 384
    assert paper.branches[3].embed_dim == 192
    assert released.img_sizes == paper.img_sizes == (448, 1120, 1568, 1792)
    assert FACTS["piip_tsbl"]["total_params"] - FACTS["piip_tsbl_vit_t"]["total_params"] == 22_149_888


@pytest.mark.parametrize("name, readme_millions", [("piip_h6b", 6872), ("piip_h6b_speedup", 6752), ("internvit6b_baseline", 5919)])
def test_readme_parameter_convention(name, readme_millions):
    count = count_params(name)
    assert abs(count.readme_total / 1e6 - readme_millions) < 0.5
    assert count.total == sum(count.by_part.values())


@pytest.mark.parametrize(
    "name, img_sizes, readme_gflops",
    [
        ("internvit6b_baseline", None, 29_323),
        ("piip_h6b", None, 11_080),
        ("piip_h6b_speedup", None, 10_692),
        # Grids not divisible by the window (42 and 98 for window 28): qkv counted without the padding.
        ("piip_sbl", [672, 896, 1568], 1_464),
        ("piip_tsbl_vit_t", [448, 1120, 1568, 1792], 1_535),
    ],
)
def test_readme_flops_convention_within_one_percent(name, img_sizes, readme_gflops):
    count = count_flops(name, img_sizes=img_sizes)
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
    tsb = create_backbone("piip_tsb_tiny")
    for block in tsb.branch3.blocks:  # DeiT-T: the reference's vit_models gives it gammas, init_scale=1
        assert torch.equal(block.gamma_1, torch.ones_like(block.gamma_1)) and torch.equal(block.gamma_2, block.gamma_1)
    baseline = create_backbone("internvit6b_baseline_tiny")
    norm = baseline.up1[1]
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_baseline_up1_normalises_channels_first():
    """The baseline's stride-4 level: LayerNorm over the channels at each position (not GroupNorm)."""
    baseline = create_backbone("internvit6b_baseline_tiny")
    norm = baseline.up1[1]
    x = torch.randn(2, norm.weight.numel(), 5, 3)
    per_position = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), per_position)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_mlp_activation_follows_the_preset():
    torch.manual_seed(0)
    x = torch.randn(4, 64) * 3
    exact, tanh = (create_backbone(p).blocks[0].mlp.act for p in ("internvit6b_baseline_tiny", "internvit6b_baseline_ade20k_tiny"))
    torch.testing.assert_close(exact(x), torch.nn.functional.gelu(x))
    torch.testing.assert_close(tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert (exact(x) - tanh(x)).abs().max() > 1e-4


def test_position_table_at_input_grid_is_added_as_stored():
    """ADE20K presets: the table is stored at the input grid and added without resizing there."""
    backbone = create_backbone("piip_h6b_ade20k_tiny")
    branch = backbone.branch(0)
    grid = backbone.img_sizes[0] // 16
    assert branch.pos_embed.shape[1] == 1 + grid * grid
    added = branch.grid_pos_embed((grid, grid), torch.float32)
    torch.testing.assert_close(added, branch.pos_embed[:, 1:])
    assert branch.grid_pos_embed((grid + 2, grid), torch.float32).shape[1] == (grid + 2) * grid  # other inputs: resized
