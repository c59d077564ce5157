"""Energy-guided merging (``method=energy`` / ``energy_lsh``), the norm-preserving merge
(``merge=mlerp``) and the per-head metric (``metric=heads``) against naive per-image loops written from the rule, plus r=0, batch and the
patched model. The compile / host-read / op-budget checks live with the other methods'
(test_compile.py, test_op_diet.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mergeseek.encoders import apply_merging
from mergeseek.encoders.merging import merge_wavg, simhash_planes
from mergeseek.encoders.merging.energy import energy_lsh_merging, energy_merging
from mergeseek.errors import InputError


def _unit(v):
    return v / v.norm()


def naive_energy(metric, margin=0.5, alpha=1.0):
    n = metric.shape[0]
    u = [_unit(metric[i]) for i in range(n)]
    out = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            c = float(u[i] @ u[j])
            total += c if c >= margin else alpha * (math.exp(c - margin) - 1.0)
        out.append(total / n)
    return out


def naive_buckets(metric, planes, bits, tables):
    n = metric.shape[0]
    proj = (metric / metric.norm(dim=-1, keepdim=True)) @ planes
    codes = []
    for i in range(n):
        codes.append(tuple(sum(1 << k for k in range(bits) if proj[i, t * (bits + 1) + k] > 0) for t in range(tables)))
    energy = [sum(sum(codes[j][t] == codes[i][t] for j in range(n)) for t in range(tables)) / tables / n for i in range(n)]
    return energy, codes


def naive_merge(metric, x, size, r, energy, protected=1, mates=None):
    """The rule for one image: the 2r best-energy unprotected tokens (stable), A/B by rank, each A
    into its most similar B (first maximum; ``mates(a, b)`` limits the search, falling back to all
    B); B tokens average their members by size; output = untouched tokens in position order."""
    n = metric.shape[0]
    u = [_unit(metric[i]) for i in range(n)]
    ranked = sorted(range(protected, n), key=lambda i: (-energy[i], i))[: 2 * r]
    a_set, b_set = ranked[0::2], ranked[1::2]
    into = {}
    for a in a_set:
        pool = [b for b in b_set if mates is None or mates(a, b)] or b_set
        best, best_b = -math.inf, None
        for b in pool:
            s = float(u[a] @ u[b])
            if s > best:
                best, best_b = s, b
        into[a] = best_b
    rows, sizes = [], []
    for i in range(n):
        if i in into:
            continue
        members = [i] + [a for a, b in into.items() if b == i]
        s = sum(size[m] for m in members)
        rows.append(sum(x[m] * size[m] for m in members) / s)
        sizes.append(s)
    return torch.stack(rows), torch.stack(sizes)


@pytest.mark.parametrize("n,r,protected,seed", [(17, 4, 1, 0), (50, 12, 1, 1), (31, 15, 1, 2), (24, 5, 0, 3), (40, 7, 3, 4)])
def test_energy_agrees_with_a_naive_loop(n, r, protected, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n, 1), generator=g).double()
    result = energy_merging(metric, r, protected=protected, size=size, padded=False, margin=0.2, alpha=0.7)
    got_x, got_s = merge_wavg(result, x, size)
    assert got_x.shape == (3, n - r, 5) and result.width == n - r
    for b in range(3):
        want_x, want_s = naive_merge(metric[b], x[b], size[b], r, naive_energy(metric[b], 0.2, 0.7), protected)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=0)
    # the general slot closures give the fused layout
    want = merge_wavg(result.merge, x, size)
    torch.testing.assert_close(want[0], got_x, rtol=0, atol=1e-12)
    assert result.unmerge(got_x).shape == (3, n, 5)


@pytest.mark.parametrize("n,r,seed", [(33, 8, 0), (64, 16, 1), (21, 3, 2)])
def test_hashed_energy_agrees_with_a_naive_bucket_loop(n, r, seed):
    """Bucket-density energy and partners among bucket-mates (any table); an A token without one
    takes its best B token (r <= 16: the fallback covers all B)."""
    bits, tables = 3, 2
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, n, 8, generator=g, dtype=torch.float32)
    x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    planes = simhash_planes(8, bits, tables, seed=seed)
    result = energy_lsh_merging(metric, r, planes=planes, lsh_bits=bits, lsh_tables=tables, padded=False)
    got_x, got_s = merge_wavg(result, x)
    for b in range(2):
        energy, codes = naive_buckets(metric[b], planes, bits, tables)
        ranked = sorted(range(1, n), key=lambda i: (-energy[i], i))[: 2 * r]
        # energies are multiples of 1 / (tables * n): ties are real, and broken by position as the rule says
        assert len(set(energy)) < n
        mates = lambda a, c: any(codes[a][t] == codes[c][t] for t in range(tables))  # noqa: E731
        want_x, want_s = naive_merge(metric[b].double(), x[b], torch.ones(n, 1, dtype=torch.float64), r, energy, 1, mates)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=0)
        assert len(ranked) == 2 * r


def test_mlerp_keeps_the_mean_direction_and_the_members_mean_norm():
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 21, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, 21, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 21, 1), generator=g).double()
    result = energy_merging(metric, 6, size=size, padded=False)
    plain_x, plain_s = merge_wavg(result, x, size)
    got_x, got_s = merge_wavg(result, x, size, mlerp=True)
    torch.testing.assert_close(got_s, plain_s, rtol=0, atol=0)
    one_hot = result.merge(torch.eye(21, dtype=torch.float64).expand(2, 21, 21))  # members of each slot
    for b in range(2):
        for k in range(15):
            members = one_hot[b, k].nonzero().flatten().tolist()
            w = size[b, members, 0]
            want_norm = float((w * x[b, members].norm(dim=-1)).sum() / w.sum())
            assert got_x[b, k].norm().item() == pytest.approx(want_norm, rel=1e-12)
            assert float(_unit(got_x[b, k]) @ _unit(plain_x[b, k])) == pytest.approx(1.0, abs=1e-12)
            if len(members) == 1:  # a token merged with nothing is unchanged
                torch.testing.assert_close(got_x[b, k], x[b, members[0]], rtol=1e-12, atol=1e-12)


def test_r_zero_and_r_too_large_and_padding():
    metric = torch.randn(2, 9, 4)
    assert energy_merging(metric, 0).identity and energy_lsh_merging(metric, 0).identity
    assert energy_merging(metric, 50).width == 9 - 4  # clamped to half of the unprotected tokens
    size = torch.ones(2, 9, 1)
    size[1, -2:] = 0
    with pytest.raises(InputError, match="padding"):
        energy_merging(metric, 2, size=size)


@pytest.fixture(scope="module")
def tiny():
    from mergeseek.eval.reference import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("reference-tiny")).eval()


def test_heads_metric_cosine_is_the_mean_of_the_per_head_cosines():
    from mergeseek.encoders.patch.common import key_metric

    k = torch.randn(2, 3, 7, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    m = key_metric(k, "heads")
    assert m.shape == (2, 7, 12)
    torch.testing.assert_close(key_metric(k, "keys"), k.mean(dim=1))
    assert key_metric(k, None) is None
    for b in range(2):
        for i in range(7):
            for j in range(7):
                want = sum(float(_unit(k[b, h, i]) @ _unit(k[b, h, j])) for h in range(3)) / 3
                assert float(_unit(m[b, i]) @ _unit(m[b, j])) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("spec", ["method=energy,r=0", "method=energy_lsh,r=0", "method=energy,r=0,merge=mlerp",
                                  "r=0,metric=heads"])
def test_r_zero_is_the_unpatched_model(tiny, spec):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny(x)
        got = apply_merging(copy.deepcopy(tiny), spec)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def assert_batch_is_its_images(model, unmerged, x) -> None:
    """The merged ``model`` gives a batch what it gives each image alone, and it did merge (its
    output differs from the ``unmerged`` model's)."""
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
        base = unmerged(x)
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    assert (batch - base).abs().max() > 1e-4


@pytest.mark.parametrize("spec", ["method=energy,r=3", "method=energy_lsh,r=3", "method=energy,r=3,merge=mlerp",
                                  "r=3,merge=mlerp", "r=3,metric=heads", "method=lsh,r=3,metric=heads"])
def test_a_batch_of_four_equals_four_single_images(tiny, spec):
    model = apply_merging(copy.deepcopy(tiny), spec)
    assert_batch_is_its_images(model, tiny, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    from mergeseek.encoders import token_counts

    assert token_counts(model) == [14, 11]  # 17 tokens, 3 per block: static widths
