"""Patched open_clip / timm ViTs: parity at r=0, schedule, invariants, batch consistency,
autocast and torch.compile."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from mergeseek.encoders import MergeConfig, apply_merging, merge_stats, remove_merging, token_counts
from mergeseek.encoders.patch.common import run_blocks
from mergeseek.errors import UnsupportedModelError


def _open_clip_visual(name: str):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).visual.eval()


def _timm(name: str, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


@pytest.fixture(scope="module")
def b32():
    return _open_clip_visual("ViT-B-32")


PARITY_MODELS = {
    "open_clip ViT-B-32": lambda: _open_clip_visual("ViT-B-32"),
    "open_clip ViT-B-16": lambda: _open_clip_visual("ViT-B-16"),
    "timm ViT-B/32": lambda: _timm("vit_base_patch32_224"),
    "timm ViT-B/16": lambda: _timm("vit_base_patch16_224"),
    "timm MAE-style avg pool": lambda: _timm("vit_base_patch16_224", global_pool="avg", fc_norm=True, class_token=False),
}


@pytest.mark.parametrize("name", list(PARITY_MODELS))
def test_r0_equals_unpatched(name, photo_batch):
    model = PARITY_MODELS[name]()
    x = photo_batch[:2]
    with torch.inference_mode():
        ref = model(x)
        apply_merging(model, "r=0")
        out = model(x)
    assert type(model).__name__.startswith("Merging")
    assert (out - ref).abs().max().item() <= 1e-5


def _custom_open_clip(**kw):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(image_size=64, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=32)
    args.update(kw)
    return VisionTransformer(**args).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(block_type="custom", ls_init_value=0.5, qk_norm=True),
        dict(ls_init_value=0.5, pool_type="avg"),
        dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4),
        dict(final_ln_after_pool=True),
    ],
    ids=["custom-block+layerscale+qknorm", "layerscale+avgpool", "attn-pool", "final-ln-after-pool"],
)
def test_open_clip_variants_parity_and_merge(kw):
    model = _custom_open_clip(**kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        apply_merging(model, "r=0")
        assert (model(x) - ref).abs().max().item() <= 1e-5
        apply_merging(model, "r=6")
        out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert token_counts(model) == [59, 53, 47]


@pytest.mark.parametrize("spec", ["r=8", "r=8,schedule=decreasing", "r=[20,10,5,0,0,0,0,0,0,0,0,0]", "r=8,method=lsh"])
def test_token_counts_follow_schedule(b32, photo_batch, spec):
    cfg = MergeConfig.parse(spec)
    apply_merging(b32, cfg)
    with torch.inference_mode():
        b32(photo_batch[:1])
    expected, n = [], 50
    for r in cfg.schedule_for(12, 50):
        n -= r
        expected.append(n)
    # lsh too: tokens without a bucket-mate take fallback edges, so the widths are static
    assert token_counts(b32) == expected
    stats = merge_stats(b32)
    assert [50 - sum(stats["merged_min"][: i + 1]) for i in range(12)] == expected
    assert len(stats["fallback_max"]) == 12 and stats["shortfall"] == 0
    remove_merging(b32)


@pytest.mark.parametrize("spec", ["r=8", "r=8,method=lsh", "r=12,method=lsh,lsh_bits=8,lsh_tables=1", "r=8,prop_attn=off"])
def test_sizes_sum_and_class_token_first(b32, photo_batch, spec):
    apply_merging(b32, spec)
    with torch.inference_mode():
        tokens = b32._embeds(photo_batch)
        marked = tokens.clone()
        x, state, _ = run_blocks(b32.transformer.resblocks, marked, b32._merge_cfg, b32._merge_plan())
    assert state.size.sum(dim=(1, 2)).tolist() == [50.0] * 4
    assert state.size[:, 0, 0].tolist() == [1.0] * 4  # class token: index 0, never merged
    remove_merging(b32)


@pytest.mark.parametrize("spec", ["r=8", "r=8,method=lsh", "r=16,method=lsh,lsh_bits=8,lsh_tables=1", "r=8,prop_attn=off,method=lsh,lsh_bits=8"])
def test_batch_of_four_equals_four_batches_of_one(b32, photo_batch, spec):
    apply_merging(b32, spec)
    with torch.inference_mode():
        together = b32(photo_batch)
        alone = torch.cat([b32(photo_batch[i : i + 1]) for i in range(4)])
    assert (together - alone).abs().max().item() <= 1e-4
    remove_merging(b32)


def test_remove_restores_classes_and_output(b32, photo_batch):
    with torch.inference_mode():
        ref = b32(photo_batch[:1])
        apply_merging(b32, "r=8,method=lsh")
        assert "_merge_planes" in dict(b32.named_buffers())
        remove_merging(b32)
        out = b32(photo_batch[:1])
    assert type(b32).__name__ == "VisionTransformer"
    assert type(b32.transformer.resblocks[0]).__name__ == "ResidualAttentionBlock"
    assert "_merge_planes" not in dict(b32.named_buffers())
    torch.testing.assert_close(out, ref)


def test_clip_model_and_state_dict_untouched():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    keys = set(model.state_dict())
    apply_merging(model, "r=4,method=lsh")
    assert set(model.state_dict()) == keys  # hyperplanes are not saved with the weights
    with torch.inference_mode():
        feats = model.encode_image(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 512) and len(token_counts(model)) == 12


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="supports open_clip VisionTransformer"):
        apply_merging(torch.nn.Linear(2, 2), "r=2")
    # attention-pool (MAP) heads merge (tests/test_siglip.py), with a class token too: r=0 is exact
    tnt = _timm("vit_tiny_patch16_224", img_size=32, depth=1, global_pool="map")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        stock = tnt(x)
        apply_merging(tnt, "r=0")
        assert torch.equal(tnt(x), stock)
    remove_merging(tnt)
    tnt.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(4, 192))  # keys tied to positions
    with pytest.raises(UnsupportedModelError, match="own position embedding"):
        apply_merging(tnt, "r=2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["r=6", "r=6,method=lsh"])
def test_autocast_runs(dtype, spec):
    model = _timm("vit_tiny_patch16_224", img_size=64)
    apply_merging(model, spec)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out.float()).all() and token_counts(model)[-1] < 17


def test_torch_compile_runs():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile needs a C compiler on CPU and none is installed")
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=2)
    apply_merging(model, "r=3")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(copy.deepcopy(model))
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- prefix tokens (class, registers, distillation)
PREFIX_MODELS = {
    "timm ViT-S/16 + 4 registers": lambda: _timm("vit_small_patch16_224", reg_tokens=4, img_size=64, depth=3),
    "timm DINOv2-reg4-like (ViT-S/14)": lambda: _timm("vit_small_patch14_reg4_dinov2", img_size=70, depth=3),
    "timm DeiT distilled": lambda: _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=3),
}


@pytest.mark.parametrize("name", list(PREFIX_MODELS))
def test_prefix_token_models_are_exact_at_r0(name):
    model = PREFIX_MODELS[name]()
    side = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x)
        apply_merging(model, "r=0")
        out = model(x)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", list(PREFIX_MODELS))
@pytest.mark.parametrize("spec", ["r=4", "r=4,method=lsh", "r=4,method=importance", "r=4,method=zerotprune"])
def test_prefix_tokens_keep_their_positions_and_size_one_in_every_block(name, spec):
    model = PREFIX_MODELS[name]()
    prefix = int(model.num_prefix_tokens)
    apply_merging(model, spec)
    side = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    seen = []
    for block in model.blocks:
        forward = block.merged_forward

        def recording(x, state, r, plan, _forward=forward):
            out = _forward(x, state, r, plan)
            seen.append((x.shape[1], out[1], out[2]))
            return out

        block.merged_forward = recording
    with torch.inference_mode():
        out = model(x)
        features = model.forward_features(x)
        # the model's own head (DeiT: class and distillation tokens) on the merged features
        assert torch.equal(out, model.forward_head(features))
    for n_in, state, result in seen:
        assert state.size[:, :prefix].eq(1).all()  # prefix tokens: never merged, never merged into
        members = result.merge(torch.eye(n_in, dtype=torch.float64).expand(2, n_in, n_in))
        for p in range(prefix):  # slot p holds exactly input token p
            assert torch.equal(members[:, p], torch.eye(n_in, dtype=torch.float64)[p].expand(2, n_in))
    assert token_counts(model)[-1] == model.patch_embed.num_patches + prefix - 12


def test_distilled_model_is_refused_nothing_and_uses_both_heads():
    model = PREFIX_MODELS["timm DeiT distilled"]()
    apply_merging(model, "r=4")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        feats = model.forward_features(x)
        want = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
        assert torch.equal(model(x), want)


def test_a_new_method_is_one_function_and_one_registry_entry(b32, photo_batch):
    """Register a method: MergeConfig accepts it, the patch runs it with what its spec asks for."""
    from mergeseek.encoders.merging import REGISTRY, MatcherSpec, bipartite_soft_matching, register
    from mergeseek.errors import ConfigError

    seen = []

    def every_other_block(metric, r, class_token=True, *, attn=None, stride=1, **kw):
        seen.append((metric.shape[1], r, None if attn is None else tuple(attn.shape), stride))
        return bipartite_soft_matching(metric, r, class_token, **kw)

    register(MatcherSpec("toy", every_other_block, needs="cls_attn", options=lambda cfg: {"stride": 2}))
    try:
        cfg = MergeConfig.parse("r=4,method=toy")
        assert str(cfg) == "method=toy,r=4" and MergeConfig.parse(str(cfg)) == cfg
        apply_merging(b32, cfg)
        with torch.inference_mode():
            b32(photo_batch[:2])
        steps = cfg.schedule_for(12, 50)
        assert token_counts(b32) == [50 - sum(steps[: i + 1]) for i in range(12)] and steps[0] == 4
        assert seen[0] == (50, 4, (2, 12, 1, 50), 2)  # its options, and the class-token attention it needs
        with pytest.raises(ConfigError, match="keep= applies to importance and zerotprune"):
            MergeConfig.parse("keep=0.5,method=toy")  # bipartite-bounded by default
    finally:
        REGISTRY.pop("toy")
        remove_merging(b32)
    with pytest.raises(ConfigError, match="method='toy' is not valid"):
        MergeConfig.parse("r=4,method=toy")
