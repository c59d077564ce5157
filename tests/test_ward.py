"""method=ward / ward_lsh (issue #26): pairs chosen by Ward's merge cost on the block's tokens.

Checked against naive per-image loops (the cost of every pair computed from its definition, each
token's cheapest candidates, the greedy one-to-one step) and the tokens reaching the matcher
through the patched blocks; r=0 exact, a batch of 4 equal to 4 x 1 and static widths are
tests/test_pairs.py's, parametrized with these methods too."""

from __future__ import annotations

import copy

import pytest
import torch

from mergeseek.encoders import apply_merging
from mergeseek.encoders.merging import pairs
from mergeseek.encoders.merging.ward import (IMPORTANCE, ward_imp_lsh_merging, ward_imp_merging, ward_lsh_merging,
                                            ward_merging)
from mergeseek.errors import ConfigError, InputError
from tests.test_pairs import _check, naive_window_edges, tiny, window_inputs  # noqa: F401  (tiny: a fixture)


def naive_cost(x, size, i, j):
    """Ward's cost from its definition: the growth of the squared error of the patches when tokens
    i and j (each standing for size[i] / size[j] patches at its value) become their weighted mean."""
    si, sj = float(size[i]), float(size[j])
    mean = (x[i] * si + x[j] * sj) / (si + sj)
    return si * float(((x[i] - mean) ** 2).sum()) + sj * float(((x[j] - mean) ** 2).sum())


def naive_ward_edges(x, size, protected, k):
    n = x.shape[0]
    edges = []
    for i in range(protected, n):
        others = sorted(((-naive_cost(x, size, i, j), j) for j in range(protected, n) if j != i), key=lambda t: -t[0])
        edges += [(s, i, j) for s, j in others[:k]]
    return edges


def naive_ward_window_edges(metric, x, size, planes, bits, tables, window, protected):
    """The hashed windows' edges (test_pairs' loop), re-scored by Ward's cost; cross-bucket edges
    after every same-bucket edge, in their own cost order."""
    edges = naive_window_edges(metric, planes, bits, tables, window, protected)
    costed = [(-naive_cost(x, size, i, j), c < -2.0, i, j) for c, i, j in edges]
    worst = min(s for s, _, _, _ in costed)
    best = max(s for s, _, _, _ in costed)
    return [((worst - 1.0) + s - best if cross else s, i, j) for s, cross, i, j in costed]


@pytest.mark.parametrize("n,r,protected,seed", [(17, 4, 1, 0), (50, 12, 1, 1), (31, 15, 1, 2), (24, 5, 0, 3),
                                                (40, 19, 0, 5)])
def test_ward_agrees_with_a_naive_loop(n, r, protected, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (3, n, 1), generator=g).double()
    result = ward_merging(metric, r, protected=protected, size=size, padded=False, tokens=x)
    by_image = iter(range(3))

    def edges(m):  # _check walks the images in order; the cost needs that image's tokens and sizes
        b = next(by_image)
        return naive_ward_edges(x[b], size[b, :, 0], protected, pairs.PAIR_CANDIDATES)

    _check(result, metric, x, size, r, edges, protected, 1e-12)


def test_without_sizes_every_token_counts_one():
    g = torch.Generator().manual_seed(4)
    metric, x = torch.randn(2, 21, 4, generator=g, dtype=torch.float64), torch.randn(2, 21, 6, generator=g, dtype=torch.float64)
    ones = torch.ones(2, 21, 1, dtype=torch.float64)
    a = ward_merging(metric, 6, size=None, padded=False, tokens=x)
    b = ward_merging(metric, 6, size=ones, padded=False, tokens=x)
    from mergeseek.encoders.merging import merge_wavg

    torch.testing.assert_close(merge_wavg(a, x, ones)[0], merge_wavg(b, x, ones)[0], rtol=0, atol=0)


@pytest.mark.parametrize("gram", [True, False])  # the window costs from the Gram matrix, or window by window
@pytest.mark.parametrize("n,r,window,seed", [(33, 8, 16, 0), (64, 16, 8, 1), (21, 10, 4, 2)])
def test_hashed_ward_agrees_with_a_naive_window_loop(n, r, window, seed, gram, monkeypatch):
    import mergeseek.encoders.merging.ward as ward_mod

    monkeypatch.setattr(ward_mod, "GRAM_UP_TO", 1024 if gram else 0)
    bits, tables = 3, 2
    metric, x, size, planes = window_inputs(n, seed, bits, tables)
    result = ward_lsh_merging(metric, r, planes=planes, lsh_bits=bits, lsh_tables=tables, lsh_window=window,
                              size=size, padded=False, tokens=x)
    by_image = iter(range(2))

    def edges(m):
        b = next(by_image)
        return naive_ward_window_edges(m, x[b], size[b, :, 0], planes, bits, tables, window, 1)

    _check(result, metric, x, size, r, edges, 1, 1e-12)


def test_r_zero_too_large_padding_and_missing_tokens():
    metric, x = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    for fn in (ward_merging, ward_lsh_merging):
        assert fn(metric, 0, tokens=x).identity
        assert fn(metric, 50, tokens=x).width == 9 - 4  # clamped to half of the unprotected tokens
        size = torch.ones(2, 9, 1)
        size[1, -2:] = 0
        with pytest.raises(InputError, match="padding"):
            fn(metric, 2, size=size, tokens=x)
        with pytest.raises(ConfigError, match="tokens"):  # called bare, without the block's tokens
            fn(metric, 2)
        with pytest.raises(ConfigError, match="tokens"):
            fn(metric, 2, tokens=x[:, :5])


def test_the_patched_blocks_hand_the_matcher_the_tokens_they_average(tiny, monkeypatch):
    """The tokens the matcher scores are the rows merge_wavg averages: the residual stream after
    the attention branch, one per token, in the block's current width."""
    from mergeseek.encoders.patch import common

    seen, merged = [], []
    real = common.merge_wavg

    def spy(result, x, size, **kw):
        merged.append(x.detach().clone())
        return real(result, x, size, **kw)

    import mergeseek.encoders.merging.ward as ward_mod

    real_scores = ward_mod.ward_scores

    def scores(tokens, size):
        seen.append(tokens.detach().clone())
        return real_scores(tokens, size)

    monkeypatch.setattr(common, "merge_wavg", spy)
    monkeypatch.setattr(ward_mod, "ward_scores", scores)
    model = apply_merging(copy.deepcopy(tiny), "method=ward,r=3")
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert len(seen) == len(merged) == 2 and [t.shape[1] for t in seen] == [17, 14]
    for a, b in zip(seen, merged):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_two_window_paths_give_the_same_dots_and_pairs(monkeypatch):
    """window_dots' CPU path (table by table, shifted views) and its CUDA path (one gather of every
    window), both run here on the CPU: the same numbers, so the same pairs on either device."""
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(3, 40, 7, generator=g, dtype=torch.float64)
    perm = torch.stack([torch.randperm(40, generator=g) for _ in range(3 * 4)]).view(3, 4, 40).transpose(1, 2)
    naive = torch.zeros(3, 4, 40, 5, dtype=torch.float64)
    for b in range(3):
        for t in range(4):
            for s in range(40):
                for d in range(1, 6):
                    if s + d < 40:
                        naive[b, t, s, d - 1] = rows[b, perm[b, s, t]] @ rows[b, perm[b, s + d, t]]
    cpu = pairs.window_dots(rows, perm, 5)
    monkeypatch.setattr(pairs, "BATCHED_WINDOWS", [True])
    batched = pairs.window_dots(rows, perm, 5)
    past = torch.arange(40)[:, None] + torch.arange(1, 6) >= 40
    torch.testing.assert_close(cpu, naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(batched.masked_fill(past, 0.0), naive, rtol=0, atol=1e-12)  # past the end: masked by callers
    metric, x = torch.randn(2, 33, 8, generator=g), torch.randn(2, 33, 5, generator=g)
    import mergeseek.encoders.merging.ward as ward_mod

    by_gram = ward_lsh_merging(metric, 8, tokens=x).merge(x)  # 32 free tokens: costs from the Gram matrix
    monkeypatch.setattr(ward_mod, "GRAM_UP_TO", 0)  # window by window, as for a large block
    on_gpu_path = ward_lsh_merging(metric, 8, tokens=x).merge(x)
    monkeypatch.setattr(pairs, "BATCHED_WINDOWS", [False])
    torch.testing.assert_close(ward_lsh_merging(metric, 8, tokens=x).merge(x), on_gpu_path, rtol=0, atol=0)
    torch.testing.assert_close(by_gram, on_gpu_path, rtol=0, atol=0)


def naive_importance(size, cls_attn):
    """ward_imp's cost sizes from their definition, one token at a time: s_i (1 + A N c_i), c_i the
    class token's attention to token i averaged over the heads."""
    heads, n = cls_attn.shape[0], cls_attn.shape[-1]
    out = []
    for i in range(n):
        c = sum(float(cls_attn[h, 0, i]) for h in range(heads)) / heads
        out.append(float(size[i]) * (1 + IMPORTANCE * n * c))
    return torch.tensor(out, dtype=torch.float64)


def _attention(batch, heads, n, g):
    return torch.softmax(torch.randn(batch, heads, 1, n, generator=g, dtype=torch.float64) * 2, dim=-1)


@pytest.mark.parametrize("n,r,protected,seed", [(17, 4, 1, 0), (50, 12, 1, 1), (31, 15, 1, 2), (40, 7, 2, 3)])
def test_ward_imp_agrees_with_a_naive_loop(n, r, protected, seed):
    """The cost's sizes are weighted by the class token's attention; the merged rows are averaged
    by the true sizes (the naive merge uses them)."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (3, n, 1), generator=g).double()
    attn = _attention(3, 4, n, g)
    result = ward_imp_merging(metric, r, protected=protected, size=size, padded=False, tokens=x, attn=attn)
    by_image = iter(range(3))

    def edges(m):
        b = next(by_image)
        return naive_ward_edges(x[b], naive_importance(size[b, :, 0], attn[b]), protected, pairs.PAIR_CANDIDATES)

    _check(result, metric, x, size, r, edges, protected, 1e-12)


@pytest.mark.parametrize("n,r,window,seed", [(33, 8, 16, 0), (64, 16, 8, 1)])
def test_hashed_ward_imp_agrees_with_a_naive_window_loop(n, r, window, seed):
    bits, tables = 3, 2
    metric, x, size, planes = window_inputs(n, seed, bits, tables)
    attn = _attention(2, 3, n, torch.Generator().manual_seed(seed + 10)).to(x.dtype)
    result = ward_imp_lsh_merging(metric, r, planes=planes, lsh_bits=bits, lsh_tables=tables, lsh_window=window,
                                  size=size, padded=False, tokens=x, attn=attn)
    by_image = iter(range(2))

    def edges(m):
        b = next(by_image)
        weights = naive_importance(size[b, :, 0], attn[b])
        return naive_ward_window_edges(m, x[b], weights, planes, bits, tables, window, 1)

    _check(result, metric, x, size, r, edges, 1, 1e-12)


def test_ward_imp_is_ward_when_the_class_token_attends_evenly_or_not_at_all():
    """Attention spread evenly multiplies every size by the same 1 + A (the ranking of the costs is
    unchanged); importance 0 is ward itself."""
    g = torch.Generator().manual_seed(6)
    metric, x = torch.randn(2, 33, 8, generator=g), torch.randn(2, 33, 12, generator=g)
    size = torch.randint(1, 4, (2, 33, 1), generator=g).float()
    even = torch.full((2, 3, 1, 33), 1 / 33)
    peaked = _attention(2, 3, 33, g).float()
    want = ward_merging(metric, 10, size=size, tokens=x)
    for got in (ward_imp_merging(metric, 10, size=size, tokens=x, attn=even),
                ward_imp_merging(metric, 10, size=size, tokens=x, attn=peaked, importance=0.0)):
        assert torch.equal(got.wavg(x, size)[0], want.wavg(x, size)[0])
    assert not torch.equal(ward_imp_merging(metric, 10, size=size, tokens=x, attn=peaked).wavg(x, size)[0],
                           want.wavg(x, size)[0])


def test_ward_imp_needs_the_class_tokens_attention_and_a_class_token(tiny):
    metric, x = torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    for fn in (ward_imp_merging, ward_imp_lsh_merging):
        with pytest.raises(ConfigError, match="class token's attention"):
            fn(metric, 2, tokens=x)
        with pytest.raises(ConfigError, match="class token's attention"):
            fn(metric, 2, tokens=x, attn=torch.rand(2, 3, 9, 9))  # the full matrix is not the class row
        assert fn(metric, 0, tokens=x).identity
    from mergeseek.encoders.merging import get_spec

    assert get_spec("ward_imp").needs == "cls_attn" and get_spec("ward_imp").needs_prefix
