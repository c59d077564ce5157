"""Soft merging (bench/issue26_soft.py, issue #26 fifth round: screened, not registered) against a
naive per-image loop written from the rule in its module doc; k=1 is the hard rule; r=0 exact,
batch of 4 == 4 x 1 and static widths in a patched model. The screened figures in
docs/BENCHMARKS.md rest on this code, so it is held to a shipped matcher's tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mergeseek.encoders import apply_merging, token_counts
from mergeseek.encoders.merging import merge_wavg, pairs
from mergeseek.encoders.merging.bipartite import bipartite_soft_matching
from mergeseek.encoders.merging.pairs import pairs_merging
from mergeseek.encoders.merging.registry import REGISTRY, MatcherSpec
from mergeseek.bench.issue26_soft import soft_merging
from mergeseek.encoders.merging.unmerge import token_slots
from tests.test_energy import assert_batch_is_its_images
from tests.test_pairs import naive_exact_edges, naive_greedy


def _cos(u, v):
    return float(u @ v) / float(u.norm() * v.norm())


def naive_bipartite(metric, r, protected):
    """ToMe's rule, one image: A = even positions, B = odd; each unprotected A token's most similar
    unprotected B token (first on ties); the r A tokens with the best such cosine (earlier first on ties)."""
    n = metric.shape[0]
    best = []
    for a in range(0, n, 2):
        if a < protected:
            continue
        cands = [(_cos(metric[a], metric[b]), -b) for b in range(1, n, 2) if b >= protected]
        s, neg_b = max(cands)
        best.append((s, a, -neg_b))
    best.sort(key=lambda t: (-t[0], t[1]))
    return [(a, b) for _, a, b in best[:r]]


def naive_soft(metric, x, size, attn, removed, k, weights, tau, protected):
    """One image: ``removed`` is [(token, partner)]; each removed token goes to its partner and its
    k - 1 most similar kept unprotected tokens (earlier first on ties), weighted by its head-averaged
    attention to them (``attn_unsized``: divided by their sizes), renormalised, or by softmax(cos /
    tau); kept tokens in position order."""
    n = metric.shape[0]
    gone = {i for i, _ in removed}
    kept = [j for j in range(n) if j not in gone]
    num = {j: x[j] * size[j] for j in kept}
    den = {j: size[j].clone() for j in kept}
    for i, partner in removed:
        others = sorted((j for j in kept if j >= protected and j != partner),
                        key=lambda j: (-_cos(metric[i], metric[j]), j))
        recv = [partner] + others[: k - 1]
        if weights.startswith("attn"):
            a = [float(attn[:, i, j].mean()) / (float(size[j]) if weights == "attn_unsized" else 1.0) for j in recv]
            w = [v / sum(a) for v in a]
        else:
            e = [math.exp(_cos(metric[i], metric[j]) / tau) for j in recv]
            w = [v / sum(e) for v in e]
        if k == 1:
            w = [1.0]
        for j, wj in zip(recv, w):
            num[j] = num[j] + wj * size[i] * x[i]
            den[j] = den[j] + wj * size[i]
    return torch.stack([num[j] / den[j] for j in kept]), torch.stack([den[j] for j in kept])


def _inputs(batch, n, seed, heads=3):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(batch, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    attn = torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64).softmax(dim=-1)
    return metric, x, size, attn


@pytest.mark.parametrize("choice", ["pairs", "bipartite"])
@pytest.mark.parametrize("weights", ["attn", "attn_unsized", "cos"])
@pytest.mark.parametrize("n,r,k,protected,seed", [(17, 4, 2, 1, 0), (33, 16, 3, 1, 1), (24, 5, 4, 0, 2),
                                                  (40, 9, 3, 3, 3), (21, 10, 2, 1, 4)])
def test_soft_merging_agrees_with_a_naive_loop(choice, weights, n, r, k, protected, seed):
    metric, x, size, attn = _inputs(3, n, seed)
    result = soft_merging(metric, r, protected=protected, size=size, padded=False, attn=attn, choice=choice, k=k,
                          weights=weights, tau=0.2)
    got_x, got_s = merge_wavg(result, x, size)
    assert got_x.shape == (3, n - r, 5) and result.width == n - r
    for b in range(3):
        if choice == "pairs":
            chosen, _ = naive_greedy(naive_exact_edges(metric[b], protected, pairs.PAIR_CANDIDATES), n, r, protected)
            removed = [(max(p), min(p)) for p in chosen]
        else:
            removed = naive_bipartite(metric[b], r, protected)
        want_x, want_s = naive_soft(metric[b], x[b], size[b], attn[b], removed, k, weights, 0.2, protected)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=1e-12)
    # every removed token's mass sums to 1 over its receivers: sizes still add up to the patches
    torch.testing.assert_close(got_s.sum(dim=(1, 2)), size.sum(dim=(1, 2)), rtol=0, atol=1e-12)
    # merge(x, "sum") is the same linear map: merge_wavg through it gives the fused result
    torch.testing.assert_close(merge_wavg(result.merge, x, size)[0], got_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.merge(x, mode="mean") * result.merge(torch.ones_like(size), mode="sum"),
                               result.merge(x, mode="sum"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,r,protected,seed", [(17, 4, 1, 0), (33, 16, 1, 1), (40, 7, 3, 2), (24, 12, 0, 3)])
def test_one_receiver_is_the_hard_rule(n, r, protected, seed):
    """k=1: the removed token goes to its partner with weight 1: ``pairs`` bit for bit (same layout),
    and ToMe's bipartite up to the order of the output tokens (matched through the slots)."""
    metric, x, size, attn = _inputs(2, n, seed)
    for weights in ("attn", "cos"):
        soft = soft_merging(metric, r, protected=protected, size=size, padded=False, attn=attn, k=1, weights=weights)
        hard = pairs_merging(metric, r, protected=protected, size=size, padded=False)
        for got, want in zip(merge_wavg(soft, x, size), merge_wavg(hard, x, size)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(soft.slot(), hard.slot())
        soft = soft_merging(metric, r, protected=protected, size=size, padded=False, attn=attn, k=1, weights=weights,
                            choice="bipartite")
        tome = bipartite_soft_matching(metric, r, protected=protected, size=size, padded=False)
        got_x, got_s = merge_wavg(soft, x, size)
        want_x, want_s = merge_wavg(tome, x, size)
        s_soft, s_tome = token_slots(soft, 2), token_slots(tome, 2)
        for b in range(2):
            order = torch.empty(n - r, dtype=torch.long)
            order[s_soft[b]] = s_tome[b]  # soft output slot -> ToMe's output slot of the same tokens
            assert len(set(zip(s_soft[b].tolist(), s_tome[b].tolist()))) == n - r  # the same groups
            torch.testing.assert_close(got_x[b], want_x[b, order], rtol=0, atol=1e-12)
            torch.testing.assert_close(got_s[b], want_s[b, order], rtol=0, atol=0)


def test_unmerge_sends_a_removed_token_to_its_largest_weight_receiver():
    """Attention rows that put almost all of a removed token's weight on one kept token: that token is
    where ``unmerge`` / ``slot`` send it (the detector's grid), not necessarily the partner."""
    from mergeseek.bench.issue26_soft import receivers

    metric, x, size, attn = _inputs(1, 17, 5)

    unit = metric / metric.norm(dim=-1, keepdim=True)
    src, dst, _ = pairs.greedy_pairs(*pairs.candidate_edges(unit, 1, pairs.PAIR_CANDIDATES), 4, 17, 1)
    recv, _ = receivers(unit, src, dst, 3, 1)
    peaked = torch.full_like(attn, 1e-6)
    for i in range(4):
        peaked[0, :, int(src[0, i]), int(recv[0, i, 2])] = 1.0  # the third receiver takes the weight
    result = soft_merging(metric, 4, size=size, padded=False, attn=peaked, k=3)
    slot = result.slot()[0]
    for i in range(4):
        assert slot[src[0, i]] == slot[recv[0, i, 2]] != slot[dst[0, i]]
    out = torch.arange(13, dtype=torch.float64).view(1, 13, 1)
    assert torch.equal(result.unmerge(out)[0, :, 0].long(), slot)


def test_r_zero_too_large_and_padding():
    metric = torch.randn(2, 9, 4)
    assert soft_merging(metric, 0).identity
    assert soft_merging(metric, 50, weights="cos").width == 9 - 4  # clamped to half of the unprotected tokens
    size = torch.ones(2, 9, 1)
    size[1, -2:] = 0
    with pytest.raises(Exception, match="padding"):
        soft_merging(metric, 2, size=size, weights="cos")
    with pytest.raises(Exception, match="attention"):
        soft_merging(metric, 2, weights="attn")


@pytest.fixture()
def soft_method(monkeypatch):
    """The screened rule (pairs' choice, 3 receivers, attention weights) under a test name, in the
    registry for this test only (the registry entry is what the patches read)."""
    monkeypatch.setitem(REGISTRY, "soft_test", MatcherSpec("soft_test", soft_merging, needs="attn"))
    return "soft_test"


@pytest.fixture(scope="module")
def tiny():
    from mergeseek.eval.reference import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("reference-tiny")).eval()


def test_r_zero_is_the_unpatched_model(tiny, soft_method):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny(x)
        got = apply_merging(copy.deepcopy(tiny), f"method={soft_method},r=0")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("r,widths", [(3, [14, 11]), (8, [9, 5])])
def test_a_batch_of_four_equals_four_single_images(tiny, soft_method, r, widths):
    model = apply_merging(copy.deepcopy(tiny), f"method={soft_method},r={r}")
    assert_batch_is_its_images(model, tiny, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert token_counts(model) == widths  # 17 tokens: static widths
