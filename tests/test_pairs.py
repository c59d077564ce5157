"""One-to-one greedy merging (``method=pairs`` / ``pairs_lsh``, issue #26) against naive per-image
loops written from the rule in encoders/merging/pairs.py, plus r=0, the fallback, padding, batch
independence and static widths in a patched model. Compile / host-read / op-budget checks live
with the other methods' (test_compile.py, test_op_diet.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mergeseek.encoders import apply_merging, token_counts
from mergeseek.encoders.merging import merge_wavg, pairs, simhash_planes
from mergeseek.encoders.merging.pairs import pairs_lsh_merging, pairs_merging
from mergeseek.errors import InputError
from tests.test_energy import assert_batch_is_its_images


def _cos(u, v):
    return float(u @ v) / float(u.norm() * v.norm())


def naive_greedy(edges, n, r, protected):
    """``edges``: (score, i, j) in list order; r times the best edge with both ends unused (first
    in list order on ties); none left: the two earliest unused unprotected tokens."""
    used = set(range(protected))
    pairs_out, fallback = [], 0
    for _ in range(r):
        best, pick = -math.inf, None
        for s, i, j in edges:
            if i in used or j in used:
                continue
            if s > best:
                best, pick = s, (i, j)
        if pick is None:
            pick = tuple(sorted(set(range(n)) - used)[:2])
            fallback += 1
        used.update(pick)
        pairs_out.append(pick)
    return pairs_out, fallback


def naive_exact_edges(metric, protected, k):
    n = metric.shape[0]
    edges = []
    for i in range(protected, n):
        others = sorted(((_cos(metric[i], metric[j]), j) for j in range(protected, n) if j != i), key=lambda t: -t[0])
        edges += [(s, i, j) for s, j in others[:k]]
    return edges


def naive_window_edges(metric, planes, bits, tables, window, protected):
    n = metric.shape[0]
    free = list(range(protected, n))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    proj = unit.float() @ planes.float()
    edges = []
    for t in range(tables):
        col = t * (bits + 1)
        code = {i: sum(1 << b for b in range(bits) if proj[i, col + b] > 0) for i in free}
        by_dir = sorted(free, key=lambda i: float(proj[i, col + bits]))
        rank = {i: q for q, i in enumerate(by_dir)}
        order = sorted(free, key=lambda i: (code[i], rank[i]))
        span = max(1, min(window // 2, len(free) - 1))
        for s in range(len(order)):
            for d in range(1, span + 1):
                if s + d >= len(order):
                    continue
                i, j = order[s], order[s + d]
                c = float(unit[i] @ unit[j])
                edges.append((c if code[i] == code[j] else c - 4.0, i, j))
    return edges


def naive_merge(x, size, pairs_list):
    """Each pair: the size-weighted average in its earlier token's slot; the rest in position order."""
    n = x.shape[0]
    gone = {max(p) for p in pairs_list}
    into = {max(p): min(p) for p in pairs_list}
    rows, sizes = [], []
    for i in range(n):
        if i in gone:
            continue
        members = [i] + [a for a, b in into.items() if b == i]
        s = sum(size[m] for m in members)
        rows.append(sum(x[m] * size[m] for m in members) / s)
        sizes.append(s)
    return torch.stack(rows), torch.stack(sizes)


def _check(result, metric, x, size, r, naive_edges, protected, atol):
    got_x, got_s = merge_wavg(result, x, size)
    batch, n = metric.shape[:2]
    assert got_x.shape == (batch, n - r, x.shape[-1]) and result.width == n - r
    for b in range(batch):
        chosen, fallback = naive_greedy(naive_edges(metric[b]), n, r, protected)
        assert int(result.fallback[b]) == fallback
        want_x, want_s = naive_merge(x[b], size[b], chosen)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=atol)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=0)
    # the general slot closures give the fused layout
    torch.testing.assert_close(merge_wavg(result.merge, x, size)[0], got_x, rtol=0, atol=atol)
    return got_x


@pytest.mark.parametrize("n,r,protected,seed", [(17, 4, 1, 0), (50, 12, 1, 1), (31, 15, 1, 2), (24, 5, 0, 3),
                                                (40, 7, 3, 4), (40, 19, 0, 5)])
def test_pairs_agree_with_a_naive_loop(n, r, protected, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n, 1), generator=g).double()
    result = pairs_merging(metric, r, protected=protected, size=size, padded=False)
    k = pairs.PAIR_CANDIDATES
    _check(result, metric, x, size, r, lambda m: naive_exact_edges(m, protected, k), protected, 1e-12)


def test_the_fallback_pairs_the_earliest_unused_tokens_when_no_candidate_is_left(monkeypatch):
    """One candidate per token and r = half the tokens: the candidates run out and the fallback
    (counted per image) pairs the two earliest unused tokens; still exactly r merges."""
    monkeypatch.setattr(pairs, "PAIR_CANDIDATES", 1)
    g = torch.Generator().manual_seed(7)
    n, r = 33, 16
    metric = torch.randn(4, n, 6, generator=g, dtype=torch.float64)
    x = torch.randn(4, n, 3, generator=g, dtype=torch.float64)
    size = torch.ones(4, n, 1, dtype=torch.float64)
    result = pairs_merging(metric, r, size=size, padded=False)
    _check(result, metric, x, size, r, lambda m: naive_exact_edges(m, 1, 1), 1, 1e-12)
    assert int(result.fallback.sum()) > 0


def window_inputs(n, seed, bits=3, tables=2):
    """Two images of n random keys (8 wide) and tokens (5 wide), sizes 1-3, and SimHash planes."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    return metric, x, size, simhash_planes(8, bits, tables, seed=seed, dtype=torch.float64)


@pytest.mark.parametrize("n,r,window,seed", [(33, 8, 16, 0), (64, 16, 8, 1), (21, 10, 4, 2), (9, 4, 40, 3)])
def test_hashed_pairs_agree_with_a_naive_window_loop(n, r, window, seed):
    bits, tables = 3, 2
    metric, x, size, planes = window_inputs(n, seed, bits, tables)
    result = pairs_lsh_merging(metric, r, planes=planes, lsh_bits=bits, lsh_tables=tables, lsh_window=window,
                               size=size, padded=False)
    _check(result, metric, x, size, r,
           lambda m: naive_window_edges(m, planes, bits, tables, window, 1), 1, 1e-12)


def test_r_zero_too_large_and_padding():
    metric = torch.randn(2, 9, 4)
    assert pairs_merging(metric, 0).identity and pairs_lsh_merging(metric, 0).identity
    assert pairs_merging(metric, 50).width == 9 - 4  # clamped to half of the unprotected tokens
    assert pairs_lsh_merging(metric, 50).width == 9 - 4
    size = torch.ones(2, 9, 1)
    size[1, -2:] = 0
    for fn in (pairs_merging, pairs_lsh_merging):
        with pytest.raises(InputError, match="padding"):
            fn(metric, 2, size=size)


@pytest.fixture(scope="module")
def tiny():
    from mergeseek.eval.reference import build_model, get_config

    torch.manual_seed(0)
    return build_model(get_config("reference-tiny")).eval()


@pytest.mark.parametrize("spec", ["method=pairs,r=0", "method=pairs_lsh,r=0", "method=pairs,r=0,merge=mlerp",
                                  "method=ward,r=0", "method=ward_lsh,r=0", "method=ward,r=0,merge=mlerp",
                                  "method=ward_imp,r=0", "method=ward_imp_lsh,r=0"])
def test_r_zero_is_the_unpatched_model(tiny, spec):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny(x)
        got = apply_merging(copy.deepcopy(tiny), spec)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["method=pairs,r=3", "method=pairs_lsh,r=3", "method=pairs,r=3,merge=mlerp",
                                  "method=pairs,r=8", "method=ward,r=3", "method=ward_lsh,r=3", "method=ward,r=8",
                                  "method=ward_imp,r=3", "method=ward_imp_lsh,r=8"])
def test_a_batch_of_four_equals_four_single_images(tiny, spec):
    model = apply_merging(copy.deepcopy(tiny), spec)
    assert_batch_is_its_images(model, tiny, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    want = {"3": [14, 11], "8": [9, 5]}[spec.split("r=")[1].split(",")[0]]  # 17 tokens; r at most half of the free ones
    assert token_counts(model) == want  # static widths


@pytest.mark.slow
def test_sweep_with_pairs_on_the_trained_reference(tmp_path, one_torch_thread):
    """300 real test images, ``--sweep r=16,method=bipartite|pairs|pairs_lsh``: equal token counts
    (equal FLOPs), each config's top-1 equal to the reference's own evaluation of the same merged
    model, and the trade-off chart drawn."""
    import json

    from mergeseek.eval import EvalConfig, evaluate
    from mergeseek.eval.reference import reference_available
    from tests.test_sweep_charts import DATA_ROOT, assert_top1_is_the_reference_s_own

    if not reference_available() or not (DATA_ROOT / "cifar10" / "test_jpeg.npz").is_file():
        pytest.skip(f"needs eval/reference/reference-cifar10.pt and CIFAR-10 under {DATA_ROOT}")
    cfg = EvalConfig(models=("reference-cifar10",), pretrained=None, datasets=("cifar10",), data_root=str(DATA_ROOT),
                     merges=(), sweep="r=16,method=bipartite|pairs|pairs_lsh", limit=300, batch_size=150, warmup=0,
                     iters=1, cpu_time=True)
    out = evaluate(cfg, tmp_path / "out")
    (model,) = json.loads((tmp_path / "out" / "report.json").read_text())["models"]
    names = ["none", "method=bipartite,r=16", "method=pairs,r=16", "method=pairs_lsh,r=16"]
    assert model["tokens"]["method=pairs,r=16"] == model["tokens"]["method=bipartite,r=16"]
    assert model["tokens"]["method=pairs_lsh,r=16"] == model["tokens"]["method=bipartite,r=16"]
    results = {r["config"]: r for r in model["datasets"][0]["results"]}
    assert_top1_is_the_reference_s_own(results, names, 300)
    assert "tradeoff_reference-cifar10_cifar10.png" in {p.name for p in out.paths}


# ---------------------------------------------------------------------------- pairs_mix (fourth round)
def _boundary(n, protected):
    """The smallest r that pairs for n tokens (encoders.merging.mixed.PAIRS_FROM of the free ones)."""
    from mergeseek.encoders.merging import mixed

    return math.ceil(mixed.PAIRS_FROM * (n - protected) - 1e-9)


@pytest.mark.parametrize("n,protected,seed", [(41, 1, 0), (61, 1, 1), (50, 0, 2), (90, 2, 3), (121, 1, 4)])
def test_pairs_mix_is_pairs_from_the_threshold_and_tome_below_it(n, protected, seed):
    """At the threshold's r (and above) the naive pairs loop; one merge fewer, ToMe's naive loop."""
    from mergeseek.encoders.merging.mixed import pairs_mix_merging, uses_pairs
    from tests.test_merging import naive_bipartite

    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    r = _boundary(n, protected)
    assert uses_pairs(r, n, protected) and not uses_pairs(r - 1, n, protected)
    if n == 121:  # the reference's block 4 at r=6: 6 of 120 free tokens is exactly 5%, so it pairs
        assert r == 6
    for rr in (r, r + 3):
        result = pairs_mix_merging(metric, rr, protected=protected, size=size, padded=False)
        _check(result, metric, x, size, rr, lambda m: naive_exact_edges(m, protected, pairs.PAIR_CANDIDATES),
               protected, 1e-12)
    result = pairs_mix_merging(metric, r - 1, protected=protected, size=size, padded=False)
    got_x, got_s = merge_wavg(result, x, size)
    for b in range(2):
        want_x, want_s, _ = naive_bipartite(metric[b], x[b], size[b], r - 1, protected)
        torch.testing.assert_close(got_x[b], want_x, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_s[b], want_s, rtol=0, atol=0)


def test_hashed_pairs_mix_is_pairs_lsh_from_the_threshold_and_lsh_below_it():
    from mergeseek.encoders.merging import lsh_soft_matching
    from mergeseek.encoders.merging.mixed import pairs_mix_lsh_merging

    n, bits, tables, window = 61, 3, 2, 8
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(3, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, n, 1), generator=g).double()
    planes = simhash_planes(8, bits, tables, seed=1, dtype=torch.float64)
    opts = dict(planes=planes, lsh_bits=bits, lsh_tables=tables, lsh_window=window, size=size, padded=False)
    r = _boundary(n, 1)
    result = pairs_mix_lsh_merging(metric, r, **opts)
    _check(result, metric, x, size, r, lambda m: naive_window_edges(m, planes, bits, tables, window, 1), 1, 1e-12)
    got = merge_wavg(pairs_mix_lsh_merging(metric, r - 1, **opts), x, size)
    want = merge_wavg(lsh_soft_matching(metric, r - 1, **opts), x, size)  # lsh has its own naive test (test_lsh.py)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny65():
    """The tiny reference at patch 4: 65 tokens, 2 blocks (room for a block below the threshold)."""
    import dataclasses

    from mergeseek.eval.reference import build_model, get_config

    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("reference-tiny"), patch_size=4)).eval()


# r=[1,4] on 65 tokens: block 0 removes 1 of 64 free tokens (under the threshold: ToMe), block 1 4 of 63 (pairs)
MIX_SPECS = ["method=pairs_mix,r=[1,4]", "method=pairs_mix_lsh,r=[1,4]", "method=pairs_mix,r=8"]


@pytest.mark.parametrize("spec", ["method=pairs_mix,r=0", "method=pairs_mix_lsh,r=0"])
def test_pairs_mix_r_zero_is_the_unpatched_model(tiny65, spec):
    test_r_zero_is_the_unpatched_model(tiny65, spec)


@pytest.mark.parametrize("spec", MIX_SPECS)
def test_pairs_mix_batch_of_four_equals_four_single_images(tiny65, spec):
    model = apply_merging(copy.deepcopy(tiny65), spec)
    assert_batch_is_its_images(model, tiny65, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert token_counts(model) == ([64, 60] if "[1,4]" in spec else [57, 49])  # static widths


def test_pairs_mix_blocks_follow_the_threshold_in_a_patched_model(tiny65, monkeypatch):
    """r=[1,4]: block 0 asks ToMe, block 1 pairs; r=[4,1] the other way round."""
    from mergeseek.encoders.merging import mixed

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls = []
    for name in ("pairs_merging", "bipartite_soft_matching"):
        real = getattr(mixed, name)
        monkeypatch.setattr(mixed, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with torch.no_grad():
        apply_merging(copy.deepcopy(tiny65), "method=pairs_mix,r=[1,4]")(x)
        apply_merging(copy.deepcopy(tiny65), "method=pairs_mix,r=[4,1]")(x)
    assert calls == ["bipartite_soft_matching", "pairs_merging", "pairs_merging", "bipartite_soft_matching"]
