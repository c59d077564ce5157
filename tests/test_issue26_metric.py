"""The ninth round's edge scores (bench/issue26_metric.py): the base variant is ``pairs``; every
variant's score and pairs agree with a naive per-image loop; a batch equals its images one by one;
the variant context restores what it patches."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mergeseek.bench import issue26_metric
from mergeseek.bench.issue26_metric import edge_scores, grid_positions, p9_merging, register, variant
from mergeseek.encoders import apply_merging
from mergeseek.encoders.merging import merge_wavg

VARIANTS = ["attncol", "attnrow", "mix=0.5", "ward", "wardns", "wardk", "wardp=0.5", "spatial=0.1", "spatial=0.3"]


@pytest.fixture(scope="module")
def tiny():
    import dataclasses

    from mergeseek.eval.reference import build_model, get_config

    register()
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("reference-tiny"), depth=4)).eval()


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with queries and keys scaled up: its attention at initialisation is nearly
    uniform, so the attention columns would all have a cosine near 1."""
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * dim] *= 4
    return model


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def inputs(batch=3, n=17, heads=2, seed=3):
    """Random keys, attention probabilities, hidden states, sizes and centroids (a 4 x 4 grid and a
    class token; some tokens already merged)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n, 6, generator=g)
    attn = torch.randn(batch, heads, n, n, generator=g).mul(2).softmax(dim=-1)
    hidden = torch.randn(batch, n, 5, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    pos = grid_positions(batch, n, 1) + 0.05 * torch.rand(batch, n, 2, generator=g)
    return keys, attn, hidden, size, pos


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def naive_score(name, keys, attn, hidden, size, pos, b, i, j):
    """One image, one edge (i, j), written from the module doc."""
    kind, _, value = name.partition("=")
    key = cos(keys[b, i], keys[b, j])
    col = cos(attn[b, :, :, i].flatten(), attn[b, :, :, j].flatten())
    if kind == "attncol":
        return col
    if kind == "attnrow":
        return cos(attn[b, :, i, :].flatten(), attn[b, :, j, :].flatten())
    if kind == "mix":
        return float(value) * key + (1 - float(value)) * col
    if kind.startswith("ward"):  # ward; wardns: sizes 1; wardk: on the raw keys; wardp=G: harmonic size ** G
        si, sj = (1.0, 1.0) if kind == "wardns" else (float(size[b, i]), float(size[b, j]))
        rows = keys if kind == "wardk" else hidden
        return -((si * sj / (si + sj)) ** float(value or 1)) * float(((rows[b, i] - rows[b, j]) ** 2).sum())
    if kind == "spatial":
        return key - float(value) * math.dist(pos[b, i].tolist(), pos[b, j].tolist())
    return key


def naive_pairs(score, n, r, keep_first=1):
    """One image: all edges between free tokens, best first; take r whose ends are both unused."""
    edges = sorted(((score(i, j), i, j) for i in range(keep_first, n) for j in range(i + 1, n)), key=lambda e: -e[0])
    used, pairs = set(), set()
    for _, i, j in edges:
        if len(pairs) == r:
            break
        if i not in used and j not in used:
            used |= {i, j}
            pairs.add(frozenset((i, j)))
    return pairs


def merged_pairs(result, n):
    onehot = torch.eye(n).expand(result.num_merged.shape[0], n, n).contiguous()
    out = result.merge(onehot, mode="sum")
    return [{frozenset(torch.nonzero(row).flatten().tolist()) for row in img if int(row.sum()) == 2} for img in out]


@pytest.mark.parametrize("name", ["base"] + VARIANTS)
def test_scores_and_pairs_agree_with_a_naive_loop(name):
    keys, attn, hidden, size, pos = inputs()
    kind, _, value = name.partition("=")
    unit = torch.nn.functional.normalize(keys, dim=-1)
    rows = keys if kind == "wardk" else hidden  # p9 hands wardk its raw metric as the rows
    got = edge_scores(kind, float(value or 0), unit, attn=attn, hidden=rows, size=size, pos=pos)
    n, r = 17, 6
    for b in range(3):
        want = torch.tensor([[naive_score(name, keys, attn, hidden, size, pos, b, i, j) for j in range(n)]
                             for i in range(n)])
        off = ~torch.eye(n, dtype=torch.bool)
        torch.testing.assert_close(got[b][off], want[off], rtol=1e-4, atol=1e-4)
    with variant(name):  # 16 candidates of 16 free tokens: every edge is a candidate
        result = p9_merging(keys, r, class_token=True, size=size, attn=attn, hidden=hidden, pos=pos)
    want = [naive_pairs(lambda i, j: naive_score(name, keys, attn, hidden, size, pos, b, i, j), n, r) for b in range(3)]
    assert merged_pairs(result, n) == want


def test_base_is_pairs_and_the_variants_change_the_output(tiny):
    x = images()
    with torch.no_grad():
        want = apply_merging(copy.deepcopy(tiny), "method=pairs,r=4")(x)
        with variant("base"):
            got = apply_merging(copy.deepcopy(tiny), "method=p9,r=4")(x)
        with variant("spatial=0"):
            flat = apply_merging(copy.deepcopy(tiny), "method=p9,r=4")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(flat, want, rtol=0, atol=0)  # the score-matrix path at L=0 and the centroid patch


@pytest.mark.parametrize("name", VARIANTS)
def test_a_batch_is_its_images(sharp, name):
    x = images()
    with torch.no_grad(), variant(name):
        model = apply_merging(copy.deepcopy(sharp), "method=p9,r=4")
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        with variant("base"):
            base = model(x)
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch, base, atol=1e-4)  # the score changed what merged


def test_spatial_centroids_follow_the_merges(tiny, monkeypatch):
    """The centroids the matcher sees are the size-weighted means of each token's patches."""
    seen = []
    real = issue26_metric.p9_merging

    def spy(metric, r, class_token=True, **kw):
        seen.append((kw["pos"].clone(), None if kw["size"] is None else kw["size"].clone()))
        return real(metric, r, class_token, **kw)

    monkeypatch.setattr(issue26_metric, "p9_merging", spy)
    register()
    try:
        with torch.no_grad(), variant("spatial=0.3"):
            model = apply_merging(copy.deepcopy(tiny), "method=p9,r=3")
            model(images(2))
    finally:
        monkeypatch.undo()
        register()
    grid = grid_positions(2, 17, 1)
    assert torch.equal(seen[0][0], grid)
    for pos, size in seen[1:]:  # each patch counted once: the size-weighted sum of centroids is the grid's
        torch.testing.assert_close((pos * size)[:, 1:].sum(dim=1), grid[:, 1:].sum(dim=1))
    assert len(seen) == 4 and seen[-1][0].shape[1] == 17 - 9


def test_the_variant_context_restores_what_it_patches():
    from mergeseek.encoders.patch import common

    before = common.merge_tokens
    for name in VARIANTS + ["base"]:
        with variant(name):
            assert (common.merge_tokens is before) == (name.split("=")[0] not in ("ward", "wardns", "wardp", "spatial"))
        assert common.merge_tokens is before
        assert issue26_metric._variant == {"kind": "base", "value": 0.0}
    with pytest.raises(RuntimeError):
        with variant("ward"):
            raise RuntimeError("inside")
    assert common.merge_tokens is before


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        with variant("cosine=2"):
            pass


def test_ward_and_spatial_need_their_inputs():
    keys = torch.randn(1, 17, 4)
    for name in ("ward", "spatial=0.1"):
        with variant(name), pytest.raises(ValueError, match="needs"):
            p9_merging(keys, 2, class_token=True)
