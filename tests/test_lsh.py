"""Hashed (LSH) partner search: agreement with exact matching, shortfall, determinism, padding."""

from __future__ import annotations

import torch

from encoders.merging import bipartite_soft_matching, lsh_soft_matching, merge_wavg
from tests.test_merging import merged_pairs


def _pairs(matcher, metric, r, **opts):
    merge, _ = matcher(metric.double(), r, **opts)
    return merged_pairs(merge, metric.shape[1]), merge


def test_few_bits_many_tables_agree_with_bipartite():
    g = torch.Generator().manual_seed(0)
    agree = []
    for _ in range(5):
        metric = torch.randn(1, 129, 64, generator=g)
        exact, _ = _pairs(bipartite_soft_matching, metric, 16)
        found, merge = _pairs(lsh_soft_matching, metric, 16, lsh_bits=1, lsh_tables=12, lsh_window=129)
        assert int(merge.num_merged) == 16
        agree.append(len(set(exact) & set(found)) / len(exact))
    assert sum(agree) / len(agree) >= 0.9, agree


def test_more_bits_find_fewer_partners():
    metric = torch.randn(1, 129, 64, generator=torch.Generator().manual_seed(1))
    counts = {}
    for bits in (1, 8, 16):
        _, merge = _pairs(lsh_soft_matching, metric, 64, lsh_bits=bits, lsh_tables=2, lsh_window=129)
        counts[bits] = int(merge.num_merged)
    assert counts[1] > counts[8] > counts[16]
    assert counts[16] < 64  # fewer than r found: merged fewer, and the count says so


def test_one_bucket_gives_exactly_the_bipartite_result():
    g = torch.Generator().manual_seed(2)
    center = torch.randn(64, generator=g)
    metric = (center + 1e-2 * torch.randn(2, 97, 64, generator=g)).double()  # one bucket in every table
    x = torch.randn(2, 97, 8, generator=g, dtype=torch.float64)
    mb, _ = bipartite_soft_matching(metric, 20)
    ml, _ = lsh_soft_matching(metric, 20, lsh_bits=3, lsh_tables=2, lsh_window=97)
    xb, sb = merge_wavg(mb, x)
    xl, sl = merge_wavg(ml, x)
    torch.testing.assert_close(xl, xb, rtol=0, atol=0)
    torch.testing.assert_close(sl, sb, rtol=0, atol=0)


def test_deterministic_given_seed():
    metric = torch.randn(2, 197, 64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 197, 8)
    runs = [merge_wavg(lsh_soft_matching(metric, 16, seed=s)[0], x)[0] for s in (7, 7, 8)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert runs[0].shape != runs[2].shape or not torch.equal(runs[0], runs[2])


def test_batch_rows_equal_single_rows_even_with_shortfall():
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(4, 65, 32, generator=g)
    x = torch.randn(4, 65, 8, generator=g)
    opts = dict(lsh_bits=6, lsh_tables=2, lsh_window=8)
    merge, _ = lsh_soft_matching(metric, 24, **opts)
    y, s = merge_wavg(merge, x)
    counts = merge.num_merged.tolist()
    assert len(set(counts)) > 1, counts  # images merged different numbers: padding is exercised
    for b in range(4):
        alone, _ = lsh_soft_matching(metric[b : b + 1], 24, **opts)
        ya, sa = merge_wavg(alone, x[b : b + 1])
        width = ya.shape[1]
        torch.testing.assert_close(y[b, :width], ya[0])
        torch.testing.assert_close(s[b, :width], sa[0])
        assert (s[b, width:] == 0).all()  # the rest is padding
