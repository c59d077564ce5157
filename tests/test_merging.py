"""The matchers against an independent naive loop implementation, and merge invariants."""

from __future__ import annotations

import math

import pytest
import torch

from mergeseek.encoders.merging import bipartite_soft_matching, lsh_soft_matching, merge_wavg


def naive_bipartite(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int = 1):
    """ToMe written out with Python loops over one image: returns (x, size, merged pairs).

    The first ``protected`` tokens (class, distillation, register tokens) are never merged nor
    merged into and come first, in place: [prefix, unmerged A, B] (ToMe's order for 1 and 2).
    """
    n = metric.shape[0]
    unit = [metric[i] / metric[i].norm() for i in range(n)]
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    edges = []
    for ai, p in enumerate(a_pos):
        if p < protected:
            continue
        best, best_j = -math.inf, None
        for bj, q in enumerate(b_pos):
            if q < protected:
                continue
            s = float(unit[p] @ unit[q])
            if s > best:  # strict: the first maximum wins
                best, best_j = s, bj
        edges.append((best, ai, best_j))
    edges.sort(key=lambda e: (-e[0], e[1]))
    chosen = edges[: min(r, (n - protected) // 2)]
    merged_src = {ai: bj for _, ai, bj in chosen}
    out_x = [x[p] for p in range(protected)]
    out_s = [size[p] for p in range(protected)]
    for ai, p in enumerate(a_pos):
        if ai not in merged_src and p >= protected:
            out_x.append(x[p])
            out_s.append(size[p])
    for bj, q in enumerate(b_pos):
        if q < protected:
            continue
        sx, ss = x[q] * size[q], size[q].clone()
        for ai, tgt in merged_src.items():
            if tgt == bj:
                sx = sx + x[a_pos[ai]] * size[a_pos[ai]]
                ss = ss + size[a_pos[ai]]
        out_x.append(sx / ss)
        out_s.append(ss)
    pairs = sorted((a_pos[ai], b_pos[bj]) for ai, bj in merged_src.items())
    return torch.stack(out_x), torch.stack(out_s), pairs


def merged_pairs(merge, n: int):
    """Recover (A position, B position) pairs from a merge function by merging position one-hots."""
    eye = torch.eye(n, dtype=torch.float64)[None]
    m = merge(eye)[0]  # [width, n]: which inputs each output slot holds
    pairs = []
    for row in m:
        members = torch.nonzero(row).flatten().tolist()
        a = [p for p in members if p % 2 == 0]
        b = [p for p in members if p % 2 == 1]
        pairs += [(pa, b[0]) for pa in a if b]
    return sorted(pairs)


@pytest.mark.parametrize("n,r,seed", [(17, 4, 0), (50, 8, 1), (197, 16, 2), (30, 14, 3)])
def test_bipartite_agrees_with_naive_loop(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 8, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    merge, _ = bipartite_soft_matching(metric, r, size=size)
    got_x, got_s = merge_wavg(merge, x, size)
    for b in range(2):
        want_x, want_s, _ = naive_bipartite(metric[b], x[b], size[b], r)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=1e-10)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=0)
    b0_merge, _ = bipartite_soft_matching(metric[:1], r, size=size[:1])
    assert merged_pairs(b0_merge, n) == naive_bipartite(metric[0], x[0], size[0], r)[2]


@pytest.mark.parametrize("protected", [0, 2, 5])
@pytest.mark.parametrize("method", ["bipartite", "lsh"])
def test_prefix_tokens_stay_first_in_place_like_the_naive_loop(protected, method):
    """Class + distillation (2) or class + 4 registers (5): the prefix keeps slots 0..P-1."""
    g = torch.Generator().manual_seed(protected)
    n, r = 41, 12
    metric = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 8, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    if method == "bipartite":
        result = bipartite_soft_matching(metric, r, size=size, protected=protected)
    else:  # one bucket, exhaustive window: the exact bipartite edges
        metric = metric * 1e-3 + torch.randn(16, generator=g, dtype=torch.float64)
        result = lsh_soft_matching(metric, r, size=size, protected=protected, lsh_bits=2, lsh_tables=1, lsh_window=n)
    got_x, got_s = merge_wavg(result, x, size)
    assert result.width == n - r
    for b in range(2):
        want_x, want_s, _ = naive_bipartite(metric[b], x[b], size[b], r, protected=protected)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=1e-10)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=0)
        torch.testing.assert_close(got_x[b, :protected], x[b, :protected], rtol=0, atol=1e-12)


def test_ties_are_broken_like_the_naive_loop():
    # Every A token has the same best score: the earlier A token must win the tie.
    n, r = 21, 3
    metric = torch.zeros(1, n, 4, dtype=torch.float64)
    metric[..., 0] = 1.0
    x = torch.arange(n, dtype=torch.float64).view(1, n, 1)
    merge, _ = bipartite_soft_matching(metric, r)
    got_x, _ = merge_wavg(merge, x)
    want_x, _, pairs = naive_bipartite(metric[0], x[0], torch.ones(n, 1, dtype=torch.float64), r)
    assert merged_pairs(merge, n) == pairs
    torch.testing.assert_close(got_x[0], want_x)


@pytest.mark.parametrize("matcher", [bipartite_soft_matching, lsh_soft_matching])
def test_sizes_sum_and_class_token_kept(matcher):
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 65, 32, generator=g)
    x = torch.randn(3, 65, 8, generator=g)
    merge, unmerge = matcher(metric, 12)
    y, size = merge_wavg(merge, x)
    assert size.sum(dim=(1, 2)).tolist() == [65.0] * 3
    torch.testing.assert_close(y[:, 0], x[:, 0])  # class token untouched, at index 0
    assert size[:, 0, 0].tolist() == [1.0] * 3
    # unmerge puts every token back where it came from (merged ones get their group's mean)
    back = unmerge(y)
    assert back.shape == x.shape
    torch.testing.assert_close(back[:, 0], x[:, 0])


def test_r_zero_and_too_large_r():
    metric = torch.randn(2, 9, 4)
    merge, _ = bipartite_soft_matching(metric, 0)
    x = torch.randn(2, 9, 3)
    assert merge(x) is x
    merge, _ = bipartite_soft_matching(metric, 100)  # clamped to (9 - 1) // 2 = 4
    assert merge_wavg(merge, x)[0].shape[1] == 5


def test_padding_is_never_matched_and_stays_invisible():
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 21, 8, generator=g)
    x = torch.randn(2, 21, 4, generator=g)
    size = torch.ones(2, 21, 1)
    size[1, 15:] = 0  # image 1 has 6 padding slots
    merge, _ = bipartite_soft_matching(metric, 4, size=size)
    y, s = merge_wavg(merge, x, size)
    assert s[0].sum() == 21 and s[1].sum() == 15
    # padding never received a real token, and image 1 equals image 1 merged alone
    alone, _ = bipartite_soft_matching(metric[1:, :15], 4)
    y1, s1 = merge_wavg(alone, x[1:, :15])
    torch.testing.assert_close(y[1, : y1.shape[1]], y1[0])
    torch.testing.assert_close(s[1, : s1.shape[1]], s1[0])
    assert (s[1, y1.shape[1] :] == 0).all()


def test_top_r_set_equals_first_r_of_a_stable_sort_with_ties_and_no_partner():
    from mergeseek.encoders.merging import assign_top_r

    g = torch.Generator().manual_seed(7)
    best = (torch.randn(3, 41, generator=g) * 2).round()  # many exact ties, also at the r-th score
    best[0, :30] = float("-inf")  # image 0: fewer scored edges than r
    partner = torch.zeros(3, 41, dtype=torch.long)
    merge = assign_top_r(best, partner, 15, 81)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :15]
    want = torch.zeros_like(best, dtype=torch.bool).scatter_(1, order, True) & (best > float("-inf"))
    eye = torch.eye(81, dtype=torch.float64)[None].expand(3, -1, -1)
    members = merge(eye)  # [3, width, 81]: which inputs each output slot holds
    for b in range(3):
        a_pos = torch.arange(0, 81, 2)
        shared = members[b][:, 1::2].sum(dim=1) > 0  # slots that hold a B token
        merged = [(members[b][s_, a_pos] > 0).nonzero().flatten() for s_ in range(members.shape[1]) if shared[s_]]
        got = torch.zeros(41, dtype=torch.bool)
        for idx in merged:
            got[idx] = True
        assert torch.equal(got, want[b]), b
    assert merge.num_merged.tolist() == want.sum(dim=1).tolist()
