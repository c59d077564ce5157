"""The seed papers' methods: importance-guided merging (2306.04897), Zero-TPrune (2305.17328), and
the SLAB-style ViT baseline (2405.11582), each against an independent loop or a known answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mergeseek.encoders import MergeConfig, apply_merging, remove_merging, token_counts
from mergeseek.encoders.merging import MATCHERS, importance_merging, merge_wavg, weighted_pagerank, zerotprune_merging
from mergeseek.encoders.merging.importance import keep_top
from mergeseek.encoders.patch.common import run_blocks
from mergeseek.errors import UnsupportedModelError, WeightsUnavailableError

METHODS = ("importance", "zerotprune")


# ----------------------------------------------------------------------------- naive references
def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _first_max(values):
    best, arg = -math.inf, None
    for i, v in values:
        if v > best:  # strict: the first maximum wins
            best, arg = v, i
    return best, arg


def _assemble(x, size, weight, kept, dest):
    """Kept tokens in order, each the weighted mean of itself and the tokens sent to it."""
    out_x, out_s = [], []
    for j in kept:
        members = [j] + [i for i, d in dest.items() if d == j]
        w = torch.stack([weight[i] for i in members])
        out_x.append((w * torch.stack([x[i] for i in members])).sum(0) / w.sum())
        out_s.append(torch.stack([size[i] for i in members]).sum(0))
    return torch.stack(out_x), torch.stack(out_s)


def naive_importance(metric, x, size, cls_row, r):
    """Eq. 4 of 2306.04897 written out for one image (class token at 0)."""
    n = metric.shape[0]
    imp = cls_row.tolist()
    ranked = sorted(range(1, n), key=lambda i: (-imp[i], i))
    kept = [0] + sorted(ranked[: n - 1 - r])
    dest = {}
    for i in range(1, n):
        if i not in kept:
            dest[i] = _first_max((j, float(_unit(metric[i]) @ _unit(metric[j]))) for j in kept if j != 0)[1]
    top = max(imp)
    weight = [size[i] * max(imp[i] / top, 1e-4) for i in range(n)]
    return _assemble(x, size, weight, kept, dest)


def naive_zerotprune(metric, x, size, attn, r, iters, prune=False):
    """Zero-TPrune for one image: PageRank per head, importance partition, top-r similar A tokens."""
    heads, n, _ = attn.shape
    scores = []
    for h in range(heads):
        s = [1.0 / n] * n
        for _ in range(iters):
            s = [sum(s[i] * float(attn[h, i, j]) for i in range(n)) for j in range(n)]
        scores.append(s)
    imp = [sum(scores[h][j] for h in range(heads)) / heads for j in range(n)]
    free = sorted(range(1, n), key=lambda i: (imp[i], i))
    n_src = max(len(free) // 2, min(r, len(free) - 1))
    src, tgt = free[:n_src], free[n_src:]
    edges = []
    for a in src:
        best, b = _first_max((j, float(_unit(metric[a]) @ _unit(metric[j]))) for j in sorted(tgt))
        edges.append((best, a, b))
    edges.sort(key=lambda e: (-e[0], e[1]))
    dest = {a: b for _, a, b in edges[:r]}
    kept = [i for i in range(n) if i not in dest]
    if prune:
        dest = {}
    return _assemble(x, size, [size[i] for i in range(n)], kept, dest)


def _random_case(batch=3, n=13, c=8, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    x = torch.randn(batch, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    attn = torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64).mul(2).softmax(-1)
    return metric, x, size, attn


# ----------------------------------------------------------------------------- matchers
@pytest.mark.parametrize("r", [1, 4, 9])
def test_importance_matches_naive_loop(r):
    metric, x, size, attn = _random_case()
    merge = importance_merging(metric, r, size=size, attn=attn[:, :, :1])
    out_x, out_s = merge_wavg(merge, x, size)
    for b in range(3):
        ref_x, ref_s = naive_importance(metric[b], x[b], size[b], attn[b, :, 0].mean(0), r)
        torch.testing.assert_close(out_x[b], ref_x)
        torch.testing.assert_close(out_s[b], ref_s)
    assert out_s.sum(dim=(1, 2)).tolist() == size.sum(dim=(1, 2)).tolist()


@pytest.mark.parametrize("r,iters,prune", [(3, 5, False), (8, 2, False), (3, 5, True)])
def test_zerotprune_matches_naive_loop(r, iters, prune):
    metric, x, size, attn = _random_case(seed=1)
    merge, _ = zerotprune_merging(metric, r, size=size, attn=attn, iters=iters, prune=prune)
    out_x, out_s = merge_wavg(merge, x, size)
    assert out_x.shape[1] == 13 - r
    for b in range(3):
        ref_x, ref_s = naive_zerotprune(metric[b], x[b], size[b], attn[b], r, iters, prune)
        torch.testing.assert_close(out_x[b], ref_x)
        torch.testing.assert_close(out_s[b], ref_s)


def test_token_receiving_all_class_attention_ranks_first():
    n = 10
    attn = torch.zeros(1, 3, 1, n)
    attn[..., 6] = 1.0
    metric = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))
    assert keep_top(attn[:, :, 0].mean(1), n - 2, 1, None)[0].nonzero().flatten().tolist() == [0, 6]
    merge = importance_merging(metric, n - 2, attn=attn)
    members = merge(torch.eye(n)[None])[0]  # [width, n]: which inputs each slot holds
    assert merge.width == 2
    assert members[0].nonzero().flatten().tolist() == [0]  # the class token alone, first
    assert members[1].sum().item() == n - 1 and members[1, 6] == 1  # everything else went to token 6


def test_class_token_never_merged_or_merged_into():
    metric, x, size, attn = _random_case(batch=2, n=9)
    metric[:, 0] = metric[:, 1]  # the class token is the most similar token to token 1
    for method in METHODS:
        a = attn[:, :, :1] if method == "importance" else attn
        merge, _ = MATCHERS[method](metric, 5, attn=a)
        members = merge(torch.eye(9, dtype=torch.float64).expand(2, 9, 9))
        assert members[:, 0].nonzero()[:, 1].tolist() == [0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_padding_is_never_kept_and_padded_image_computes_what_it_computes_alone(method):
    metric, x, size, attn = _random_case(batch=2, n=12, seed=3)
    size[1, 9:] = 0  # image 1 has 9 real tokens and 3 padding slots
    attn[1, :, :, 9:] = 0
    attn[1, :, :9, :9] /= attn[1, :, :9, :9].sum(-1, keepdim=True)  # real rows attend only to real tokens
    a = attn[:, :, :1] if method == "importance" else attn
    merge = MATCHERS[method](metric, 3, size=size, attn=a)
    out_x, out_s = merge_wavg(merge, x, size)
    alone_a = attn[1:, :, :9, :9][:, :, :1] if method == "importance" else attn[1:, :, :9, :9]
    m1 = MATCHERS[method](metric[1:, :9], 3, size=size[1:, :9], attn=alone_a)
    ref_x, ref_s = merge_wavg(m1, x[1:, :9], size[1:, :9])
    assert merge.padded and merge.width == 9 and merge.num_merged.tolist() == [3, 3]
    torch.testing.assert_close(out_x[1, :6], ref_x[0])
    torch.testing.assert_close(out_s[1, :6], ref_s[0])
    assert out_s[1, 6:].abs().sum() == 0  # the rest is size-0 padding
    assert out_s.sum(dim=(1, 2)).tolist() == size.sum(dim=(1, 2)).tolist()


def test_weighted_pagerank_converges_to_known_stationary_vectors():
    # Graph 1 (rows: where each node sends its weight): stationary pi = (4/9, 3/9, 2/9).
    g1 = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    # Graph 2: a two-state chain p(0->1)=0.3, p(1->0)=0.1 on nodes 0, 1 (node 2 attends to 1 and
    # receives nothing): pi = (0.1, 0.3, 0) / 0.4.
    g2 = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.9, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    attn = torch.stack([g1, g2])[None]  # [1, 2 heads, 3, 3]
    pi1 = torch.tensor([4 / 9, 3 / 9, 2 / 9], dtype=torch.float64)
    pi2 = torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64)
    torch.testing.assert_close(weighted_pagerank(attn[:, :1], iters=200)[0].double(), pi1, atol=1e-6, rtol=0)
    torch.testing.assert_close(weighted_pagerank(attn[:, 1:], iters=200)[0].double(), pi2, atol=1e-6, rtol=0)
    torch.testing.assert_close(weighted_pagerank(attn, iters=200)[0].double(), (pi1 + pi2) / 2, atol=1e-6, rtol=0)
    one_step = weighted_pagerank(attn[:, :1], iters=1)[0].double()
    torch.testing.assert_close(one_step, torch.full((3,), 1 / 3, dtype=torch.float64) @ g1)


def test_pagerank_hub_ranks_first_and_padding_scores_zero():
    n = 8
    attn = torch.full((1, 2, n, n), 0.02)
    attn[..., 5] = 1 - 0.02 * (n - 1)  # every token sends most of its attention to token 5
    assert weighted_pagerank(attn, iters=3)[0].argmax().item() == 5
    real = torch.ones(1, n, dtype=torch.bool)
    real[0, 6:] = False
    attn[..., 6:] = 0
    attn = attn / attn.sum(-1, keepdim=True)
    s = weighted_pagerank(attn, iters=3, real=real)[0]
    assert s[6:].abs().sum() == 0 and abs(s.sum().item() - 1) < 1e-6


# ----------------------------------------------------------------------------- through the patch
def _timm(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, **kw).eval()


@pytest.fixture(scope="module")
def b32():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()


@pytest.fixture(scope="module")
def tiny():
    return _timm()


@pytest.fixture(scope="module")
def small_photos(photo_batch):
    return F.interpolate(photo_batch, size=(64, 64), mode="bilinear", antialias=True)


@pytest.mark.parametrize("spec,on_b32", [("method=importance,r=0", True), ("method=zerotprune,keep=1.0,iters=3", True),
                                         ("method=zerotprune,r=0", False), ("method=importance,keep=1.0", False)])
def test_no_reduction_equals_unpatched(spec, on_b32, b32, tiny, photo_batch, small_photos):
    model, x = (b32, photo_batch[:1]) if on_b32 else (tiny, small_photos[:2])
    with torch.inference_mode():
        ref = model(x)
        apply_merging(model, spec)
        out = model(x)
    remove_merging(model)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec,on_b32", [("method=importance,r=8", True), ("method=zerotprune,keep=0.6,layers=[0,6]", True),
                                         ("method=zerotprune,r=3,iters=3", False),
                                         ("method=importance,keep=0.5,layers=[1,4,7]", False)])
def test_batch_of_four_equals_four_batches_of_one(spec, on_b32, b32, tiny, photo_batch, small_photos):
    model, x = (b32, photo_batch) if on_b32 else (tiny, small_photos)
    apply_merging(model, spec)
    with torch.inference_mode():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    remove_merging(model)
    assert (together - alone).abs().max().item() <= 1e-4


@pytest.mark.parametrize("spec", ["method=importance,r=6", "method=zerotprune,keep=0.5,layers=[0,4]"])
def test_sizes_sum_class_token_first_and_schedule(spec, b32, photo_batch):
    cfg = MergeConfig.parse(spec)
    apply_merging(b32, cfg)
    with torch.inference_mode():
        x, state, stats = run_blocks(b32.transformer.resblocks, b32._embeds(photo_batch[:2]), b32._merge_cfg,
                                     b32._merge_plan())
    remove_merging(b32)
    assert state.size.sum(dim=(1, 2)).tolist() == [50.0, 50.0]
    assert state.size[:, 0, 0].tolist() == [1.0, 1.0]
    n, expected = 50, []
    for r in cfg.schedule_for(12, 50):
        n -= r
        expected.append(n)
    assert stats.tokens == expected and expected[-1] < 50


def test_open_clip_and_timm_models_through_apply_merging(b32, tiny, photo_batch, small_photos):
    apply_merging(b32, "method=zerotprune,r=4,iters=2")
    apply_merging(tiny, "method=importance,r=3")
    with torch.inference_mode():
        feats = b32(photo_batch[:1])
        logits = tiny(small_photos[:2])
    counts, tiny_counts = token_counts(b32), token_counts(tiny)
    remove_merging(b32)
    remove_merging(tiny)
    assert feats.shape == (1, 512) and counts[-1] == 50 - 48
    assert logits.shape == (2, 1000) and tiny_counts == [14, 11, 8, 5, 2, 2, 2, 2, 2, 2, 2, 2]


def test_no_class_token_model():
    mae = _timm(global_pool="avg", fc_norm=True, class_token=False)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(UnsupportedModelError, match="no class token"):
        with torch.inference_mode():
            apply_merging(mae, "method=importance,r=2")(x)
    apply_merging(mae, "method=zerotprune,r=2")
    with torch.inference_mode():
        together = mae(x)
        alone = torch.cat([mae(x[i : i + 1]) for i in range(2)])
    assert (together - alone).abs().max().item() <= 1e-4
    assert token_counts(mae) == [14, 12, 10, 8, 6, 4, 2, 1, 1, 1, 1, 1]  # one unprotected token always stays


@pytest.mark.parametrize("method", METHODS)
def test_autocast_keeps_running(method, tiny):
    apply_merging(tiny, f"method={method},r=3")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(torch.randn(2, 3, 64, 64))
    counts = token_counts(tiny)
    remove_merging(tiny)
    assert torch.isfinite(out.float()).all() and counts[-1] == 2


# ----------------------------------------------------------------------------- SLAB-style ViT
def _slab(**kw):
    from mergeseek.encoders.slab import RepBN, create_slab_vit

    torch.manual_seed(0)
    model = create_slab_vit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kw).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, RepBN):
            m.bn.running_mean.copy_(torch.randn(32, generator=g))
            m.bn.running_var.copy_(torch.rand(32, generator=g) + 0.5)
            m.eta.data.copy_(torch.randn(32, generator=g) * 0.1)
    return model


def test_slab_fused_norms_equal_unfused():
    import copy

    from mergeseek.encoders.slab import fuse_norms

    model = _slab()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        fused = fuse_norms(copy.deepcopy(model))
        out = fused(x)
    assert isinstance(fused.blocks[0].norm1, torch.nn.Identity)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_slab_linear_attention_matches_formula():
    attn = _slab().blocks[0].attn
    x = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x).reshape(1, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[:, 0]  # [H, N, D] each
        ref = torch.zeros(17, 2, 16)
        for h in range(2):
            for i in range(17):
                w = torch.stack([F.relu(q[h, i]) @ F.relu(k[h, j]) for j in range(17)])
                ref[i, h] = (w[:, None] * v[h]).sum(0) / (w.sum() + attn.eps)
            local = attn.dwc(v[h, 1:].T.reshape(16, 4, 4)[None])[0].reshape(16, 16).T  # patches only
            ref[1:, h] += local
        ref = attn.proj(ref.reshape(17, 32))[None]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_slab_progressive_norm_and_timm_registry():
    import timm

    from mergeseek.encoders.slab import RepBN, set_progress

    norm = RepBN(8).train()
    x = torch.randn(4, 5, 8)
    set_progress(norm, 1.0)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), norm.ln.weight, norm.ln.bias, norm.ln.eps))
    model = timm.create_model("slab_vit_tiny_patch16_224", img_size=32, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(WeightsUnavailableError):
        timm.create_model("slab_vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(UnsupportedModelError):
        apply_merging(model, "r=2")


@pytest.mark.slow  # the baselines bench over several models
def test_baselines_bench_matches_token_budgets():
    from bench.baselines import BaselineConfig, run_baselines

    cfg = BaselineConfig(arch="tiny", img_size=64, depth=2, batch_size=2, warmup=0, iters=1, cpu_time=True,
                         merges=("r=3", "r=3,method=importance", "r=3,method=zerotprune"))
    report = run_baselines(cfg)
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {"vit", "vit method=bipartite,r=3", "vit method=importance,r=3", "vit method=zerotprune,r=3",
                         "tnt", "slab", "slab-fused"}
    assert rows["vit"].ratio == 1.0 and rows["vit"].tokens_out == 17
    assert {rows[n].tokens_out for n in rows if n.startswith("vit ")} == {17 - 6}
    assert all(r.images_per_s > 0 and r.gflops > 0 and r.cpu_ms > 0 for r in report.rows)
    assert rows["vit method=zerotprune,r=3"].gflops < rows["vit"].gflops
    assert "| tnt |" in report.markdown()
