"""Hashed (LSH) partner search: agreement with exact matching, shortfall, determinism, padding."""

from __future__ import annotations

import math

import pytest
import torch

from mergeseek.encoders.merging import bipartite_soft_matching, lsh_soft_matching, merge_wavg
from tests.test_merging import merged_pairs


def _pairs(matcher, metric, r, **opts):
    result = matcher(metric.double(), r, **opts)
    return merged_pairs(result.merge, metric.shape[1]), result


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
        _, merge = _pairs(lsh_soft_matching, metric, 64, lsh_bits=bits, lsh_tables=2, lsh_window=129, fallback=False)
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
    opts = dict(lsh_bits=6, lsh_tables=2, lsh_window=8, fallback=False)
    merge = lsh_soft_matching(metric, 24, **opts)
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


def naive_lsh_partners(metric, planes, bits, tables, window, protected=1, real=None):
    """The windowed hashed search of one image written out with Python loops and bisect.

    Per table: sort the eligible A and B tokens by (code, quantised ordering position, index);
    cut sorted A into chunks of ``window``; score each chunk against the ``window`` sorted B
    tokens centred (bisect) on the chunk's middle key, kept inside the sorted B list; only
    same-code pairs count. Each A token keeps its best partner over all tables (first maximum).
    """
    import bisect

    n = metric.shape[0]
    unit = [metric[p] / metric[p].norm() for p in range(n)]
    num_b = n // 2
    window = max(1, min(window, num_b))
    pos_bits = 13 - bits if bits <= 11 else 20

    def eligible(p):
        return p >= protected and (real is None or bool(real[p]))

    best = {p: (-math.inf, None) for p in range(0, n, 2)}
    for t in range(tables):
        cols = planes[:, t * (bits + 1) : (t + 1) * (bits + 1)].float()

        def key(p):
            proj = unit[p].float() @ cols
            code = sum(1 << i for i in range(bits) if proj[i] > 0)
            u = min(max(float(proj[bits]), -4.0), 4.0)  # equal steps on [-4, 4]
            pos = int(torch.round(torch.tensor((u + 4.0) * (((1 << pos_bits) - 1) / 8.0))))
            return (code, pos, p)

        a_sorted = sorted(key(p) for p in range(0, n, 2) if eligible(p))
        b_sorted = sorted(key(q) for q in range(1, n, 2) if eligible(q))
        b_keys = [k[:2] for k in b_sorted]
        for c in range(0, len(a_sorted), window):
            chunk = a_sorted[c : c + window]
            mid_at = c + window // 2
            mid = a_sorted[mid_at][:2] if mid_at < len(a_sorted) else (math.inf, 0)
            start = bisect.bisect_left(b_keys, mid) - window // 2
            start = max(0, min(start, max(0, len(b_sorted) - window)))
            for code_a, _, p in chunk:
                for code_b, _, q in b_sorted[start : start + window]:
                    if code_a != code_b:
                        continue
                    s = float(unit[p] @ unit[q])
                    if s > best[p][0]:
                        best[p] = (s, q)
    return best


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the fused kernel
@pytest.mark.parametrize(
    "n,bits,tables,window,padding",
    # (21, 2, 1, 16, 0): a window narrower than the kernel's 16 lanes, where many A tokens have
    # only negative same-code scores, so an unused lane (score 0) must never win.
    [(65, 3, 3, 8, 0), (97, 2, 2, 6, 0), (81, 3, 4, 8, 11), (65, 14, 2, 8, 5), (21, 2, 1, 16, 0)],
)
def test_lsh_partners_agree_with_naive_loops(n, bits, tables, window, padding, dtype):
    from mergeseek.encoders.merging import lsh_partners, simhash_planes

    g = torch.Generator().manual_seed(n + window)
    metric = torch.randn(2, n, 16, generator=g, dtype=torch.float64).to(dtype)
    if bits > 11:  # wide (int64) keys: cluster the tokens so that 14-bit buckets still hold pairs
        centers = torch.randn(4, 16, generator=g, dtype=torch.float64)
        metric = (centers[torch.randint(0, 4, (2, n), generator=g)] + 0.01 * metric).to(dtype)
    size = torch.ones(2, n, 1, dtype=dtype)
    if padding:
        size[1, n - padding :] = 0  # the second image ends in padding (size 0), as after a shortfall
    planes = simhash_planes(16, bits, tables, seed=5)
    best, partner, _ = lsh_partners(
        metric, size=size, lsh_bits=bits, lsh_tables=tables, lsh_window=window, planes=planes
    )
    found_any = 0
    for b in range(2):
        want = naive_lsh_partners(metric[b], planes, bits, tables, window, real=size[b, :, 0] > 0)
        for p, (score, q) in want.items():
            got = float(best[b, p // 2])
            if q is None:
                assert got == -math.inf, (b, p)
            else:
                found_any += 1
                assert got == pytest.approx(score, abs=1e-12 if dtype == torch.float64 else 1e-5), (b, p)
                assert int(partner[b, p // 2]) * 2 + 1 == q, (b, p)
    assert found_any > n // 2  # most A tokens found a partner: the comparison is not vacuous


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_ties_go_to_the_first_b_token(dtype):
    """Repeated tokens score exactly alike: every search must keep the first (lowest index) one."""
    from mergeseek.encoders.merging import lsh_partners, simhash_planes

    g = torch.Generator().manual_seed(3)
    centers = torch.randn(5, 16, generator=g, dtype=torch.float64)
    metric = centers[torch.randint(0, 5, (2, 97), generator=g)].to(dtype)  # exact repeats only
    planes = simhash_planes(16, 2, 2, seed=1)
    best, partner, _ = lsh_partners(metric, lsh_bits=2, lsh_tables=2, lsh_window=24, planes=planes)
    ties = 0
    for b in range(2):
        want = naive_lsh_partners(metric[b], planes, 2, 2, 24)
        for p, (score, q) in want.items():
            if q is None:
                assert best[b, p // 2] == -math.inf
                continue
            assert int(partner[b, p // 2]) * 2 + 1 == q, (b, p)
            ties += sum(bool(torch.equal(metric[b, q], metric[b, o])) for o in range(q + 2, 97, 2))
    assert ties > 0  # chosen partners had identical later twins: the ties were real


def test_torch_sort_path_equals_the_numpy_radix_path(monkeypatch):
    """Off the CPU the int16 keys are sorted by torch.argsort: on CPU it must give the same partners."""
    from mergeseek.encoders.merging import lsh, lsh_partners

    g = torch.Generator().manual_seed(6)
    metric = torch.randn(3, 577, 64, generator=g)
    size = torch.ones(3, 577, 1)
    size[2, 500:] = 0
    want = lsh_partners(metric, size=size, backend="torch")
    monkeypatch.setattr(lsh, "_argsort_rows", lambda keys: torch.argsort(keys, dim=-1, stable=True))
    got = lsh_partners(metric, size=size, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_cuda_search_equals_cpu_tensor_code():
    """The GPU runs the tensor code: same partners as on CPU, batch > 1, with padding."""
    from mergeseek.encoders.merging import lsh_partners

    g = torch.Generator().manual_seed(8)
    metric = torch.randn(4, 1025, 64, generator=g, dtype=torch.float64)
    size = torch.ones(4, 1025, 1, dtype=torch.float64)
    size[1, 900:] = 0
    want_b, want_p, _ = lsh_partners(metric, size=size, backend="torch")
    got_b, got_p, _ = lsh_partners(metric.cuda(), size=size.cuda())
    torch.testing.assert_close(got_b.cpu(), want_b, rtol=0, atol=1e-12)
    assert torch.equal(got_p.cpu(), want_p)
    merge = lsh_soft_matching(metric.cuda().float(), 256)
    assert merge.width == 1025 - 256  # r merged: fallback edges make up a shortfall


def test_shortfall_is_made_up_by_fallback_edges_with_a_static_width():
    """Many bits: few bucket-mates. Every image still merges r (width N - r, no device read); the
    bucket edges are all kept and the fallback edges come from the fixed B subset."""
    from mergeseek.encoders.merging.lsh import FALLBACK_B, fallback_partners

    g = torch.Generator().manual_seed(11)
    metric = torch.randn(3, 129, 32, generator=g, dtype=torch.float64)
    x = torch.randn(3, 129, 8, generator=g, dtype=torch.float64)
    opts = dict(lsh_bits=10, lsh_tables=1, lsh_window=16)
    short = lsh_soft_matching(metric, 48, fallback=False, **opts)
    full = lsh_soft_matching(metric, 48, **opts)
    assert full.width == 129 - 48 and full.num_merged.tolist() == [48] * 3
    assert (short.num_merged < 48).all()
    assert full.fallback.tolist() == (48 - short.num_merged).tolist()
    bucket_pairs = [merged_pairs(lambda t, b=b: short.merge(t.expand(3, -1, -1))[b : b + 1], 129) for b in range(3)]
    full_pairs = [merged_pairs(lambda t, b=b: full.merge(t.expand(3, -1, -1))[b : b + 1], 129) for b in range(3)]
    _, fb_partner = fallback_partners(metric, 1)
    subset = set(torch.linspace(0, 63, min(FALLBACK_B, 64)).round().long().mul(2).add(1).tolist())
    for b in range(3):
        assert set(bucket_pairs[b]) <= set(full_pairs[b])
        assert all(q in subset for _, q in set(full_pairs[b]) - set(bucket_pairs[b]))
    y, s = merge_wavg(full, x)
    assert s.sum(dim=(1, 2)).tolist() == [129.0] * 3
    for b in range(3):  # a batch computes what each image computes alone
        ya, sa = merge_wavg(lsh_soft_matching(metric[b : b + 1], 48, **opts), x[b : b + 1])
        torch.testing.assert_close(y[b], ya[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(s[b], sa[0], rtol=0, atol=0)
