"""The fused greedy pairs kernel (encoders/merging/pairs_kernel.c) and the tensor greedy over the
whole matrix (``pairs.greedy_matrix``) give the pairs of ``pairs``' candidate-list greedy; the
methods built on them (``pairs``, ``ward``) give the same forward with and without the kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from mergeseek.encoders.merging import lsh_native, pairs
from mergeseek.encoders.merging.ward import ward_scores

needs_kernel = pytest.mark.skipif(lsh_native.load_pairs() is None, reason="no C compiler: the tensor path runs")


def _candidate_greedy(sim, r, keep_first, k):
    """The tensor code: the candidate list and r rounds of a masked argmax."""
    n = sim.shape[1]
    return pairs.tensor_greedy_pairs(*pairs.matrix_edges(sim.clone(), keep_first, k), r, n, keep_first)


def _naive(sim, r, keep_first, k):
    """The rule from its definition, one image at a time in Python: each unprotected token's k best
    unprotected partners (ties: lower column), r times the best edge with two unused ends (ties:
    lower row, then the earlier candidate), failed steps paired from the unused tokens in order."""
    batch, n, _ = sim.shape
    src, dst, fb = [], [], []
    for b in range(batch):
        s = sim[b].tolist()
        cands = {}
        for a in range(keep_first, n):
            others = [c for c in range(keep_first, n) if c != a]
            cands[a] = sorted(others, key=lambda c: (-s[a][c], c))[:k]
        used = set(range(keep_first))
        got = []
        for _ in range(r):
            best = None
            for a in range(keep_first, n):
                if a in used:
                    continue
                for c in cands[a]:
                    if c not in used and s[a][c] != float("-inf"):
                        if best is None or s[a][c] > best[0]:
                            best = (s[a][c], a, c)
                        break
            if best is None:
                break
            got.append((max(best[1], best[2]), min(best[1], best[2])))
            used |= {best[1], best[2]}
        failed = r - len(got)
        spare = [t for t in range(keep_first, n) if t not in used]
        got += [(spare[2 * i + 1], spare[2 * i]) for i in range(failed)]
        src.append([p[0] for p in got])
        dst.append([p[1] for p in got])
        fb.append(failed)
    return torch.tensor(src).view(batch, r), torch.tensor(dst).view(batch, r), torch.tensor(fb)


def _cases(seed: int, count: int):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        batch = int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(2, 40, (1,), generator=g))
        keep = int(torch.randint(0, 3, (1,), generator=g))
        if n - keep < 2:
            continue
        x = torch.randn(batch, n, 8, generator=g)
        size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
        if i % 2:
            sim = ward_scores(x, size)
        else:
            unit = x / x.norm(dim=-1, keepdim=True)
            sim = unit @ unit.transpose(-1, -2)
        if i % 5 == 0:  # most edges missing: steps run out of edges and fall back
            sim = sim.masked_fill(torch.rand(sim.shape, generator=g) < 0.8, float("-inf"))
        k = (1, 3, 16, 64)[i % 4]
        yield sim, keep, k


def _equal(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


@needs_kernel
def test_kernel_takes_the_candidate_greedys_pairs():
    checked = 0
    for sim, keep, k in _cases(0, 100):
        before = sim.clone()
        for r in range(0, (sim.shape[1] - keep) // 2 + 1):
            got = pairs.native_greedy(sim, r, keep, k)
            assert got is not None
            assert _equal(got, _candidate_greedy(sim, r, keep, k)), (sim.shape, keep, k, r)
            checked += 1
        assert torch.equal(sim, before)  # the kernel only reads the scores
    assert checked > 300


@needs_kernel
def test_kernel_falls_back_like_the_tensor_code():
    """Every edge missing but a few: steps fail and take the unused tokens in position order."""
    sim = torch.full((2, 12, 12), float("-inf"))
    sim[0, 3, 7] = sim[0, 7, 3] = 1.0
    sim[1, 2, 5] = 0.5
    for r in range(1, 6):
        got = pairs.native_greedy(sim, r, 1, 16)
        assert _equal(got, _candidate_greedy(sim, r, 1, 16))
        assert _equal(got, _naive(sim, r, 1, 16))
    src, dst, fallback = pairs.native_greedy(sim, 3, 1, 16)
    assert fallback.tolist() == [2, 2]
    assert (src[0, 0], dst[0, 0]) == (7, 3) and (src[1, 0], dst[1, 0]) == (5, 2)
    assert (dst[0, 1], src[0, 1], dst[0, 2], src[0, 2]) == (1, 2, 4, 5)  # 1, 2, 4, 5, ...: unused, in order


@needs_kernel
def test_kernel_breaks_ties_by_position_as_documented():
    """Integer scores (many exact ties) against the naive loop: lower column within a row, then
    the lower row."""
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        n = int(torch.randint(4, 20, (1,), generator=g))
        sim = torch.randint(0, 3, (2, n, n), generator=g).float()
        keep, k = trial % 2, (2, 5, 64)[trial % 3]
        for r in range(1, (n - keep) // 2 + 1):
            assert _equal(pairs.native_greedy(sim, r, keep, k), _naive(sim, r, keep, k)), (n, keep, k, r)
            if k >= n - 1:  # every edge a candidate: the tensor greedy over the matrix breaks ties alike
                assert _equal(pairs.greedy_matrix(sim.clone(), r, keep), _naive(sim, r, keep, k))


def test_greedy_over_the_matrix_equals_the_candidate_greedy_up_to_its_bound():
    """2 r - 1 <= k: the best unused partner is always among a token's k best (pairs.greedy_matrix's
    doc); the tensor path used on the CPU without a compiler, r <= MATRIX_GREEDY_UP_TO."""
    for sim, keep, _k in _cases(1, 40):
        for r in range(1, min(pairs.MATRIX_GREEDY_UP_TO, (sim.shape[1] - keep) // 2) + 1):
            k = 2 * r - 1
            assert _equal(pairs.greedy_matrix(sim.clone(), r, keep), _candidate_greedy(sim, r, keep, k))
            assert _equal(pairs.greedy_matrix(sim.clone(), r, keep),
                          _candidate_greedy(sim, r, keep, pairs.PAIR_CANDIDATES))


@needs_kernel
def test_kernel_gives_the_same_pairs_on_any_thread_count():
    sim = ward_scores(torch.randn(9, 50, 16, generator=torch.Generator().manual_seed(4)), None)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pairs.native_greedy(sim, 12, 1, 16)
        torch.set_num_threads(2)
        two = pairs.native_greedy(sim, 12, 1, 16)
    finally:
        torch.set_num_threads(saved)
    assert _equal(one, two)


def test_kernel_is_not_used_off_float32_or_when_disabled(monkeypatch):
    sim = torch.randn(1, 9, 9)
    assert pairs.native_greedy(sim.double(), 2, 1, 16) is None
    assert pairs.native_greedy(sim.bfloat16(), 2, 1, 16) is None
    monkeypatch.setenv("MERGESEEK_PAIRS_NATIVE", "0")
    assert pairs.native_greedy(sim, 2, 1, 16) is None
    assert "MERGESEEK_PAIRS_NATIVE" in lsh_native.pairs_reason()
    # and the method still merges, through the tensor code
    assert _equal(pairs.matrix_pairs(sim.clone(), 2, 1), _candidate_greedy(sim, 2, 1, 16))


def test_broken_compiler_leaves_the_tensor_code_with_a_reason(monkeypatch, tmp_path):
    saved = dict(lsh_native._state)
    lsh_native._state.clear()
    monkeypatch.setenv("MERGESEEK_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    try:
        assert lsh_native.load_pairs() is None and lsh_native.pairs_reason()
        assert not list(tmp_path.glob("*.so"))
        sim = torch.randn(2, 17, 17)
        assert _equal(pairs.matrix_pairs(sim.clone(), 5, 1), _candidate_greedy(sim, 5, 1, 16))
    finally:
        lsh_native._state.clear()
        lsh_native._state.update(saved)


@needs_kernel
@pytest.mark.parametrize("method", ["pairs", "ward"])
@pytest.mark.parametrize("r", [2, 6])
def test_patched_forward_is_the_same_with_and_without_the_kernel(method, r, monkeypatch):
    import timm

    from mergeseek.encoders import apply_merging

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    merged = apply_merging(copy.deepcopy(model), f"method={method},r={r}")
    with torch.inference_mode():
        fused = merged(x)
        monkeypatch.setenv("MERGESEEK_PAIRS_NATIVE", "0")
        tensor = merged(x)
    assert torch.equal(fused, tensor)


def _edge_cases(seed: int, count: int):
    """Random edge lists: repeated edges, both directions, exact ties (integer scores), missing
    edges (-inf) and lists too short for r pairs."""
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        batch = int(torch.randint(1, 4, (1,), generator=g))
        n = int(torch.randint(3, 40, (1,), generator=g))
        keep = int(torch.randint(0, 3, (1,), generator=g))
        if n - keep < 2:
            continue
        edges = int(torch.randint(1, 6 * n, (1,), generator=g))
        first = torch.randint(keep, n, (batch, edges), generator=g)
        second = keep + (first - keep + torch.randint(1, n - keep, (batch, edges), generator=g)) % (n - keep)
        score = torch.randn(batch, edges, generator=g)
        if i % 3 == 0:
            score = score.mul(2).round()
        if i % 4 == 0:
            score = score.masked_fill(torch.rand(score.shape, generator=g) < 0.5, float("-inf"))
        yield score, first, second, n, keep


@needs_kernel
def test_edge_kernel_takes_the_tensor_loops_pairs_ties_included():
    checked = 0
    for score, first, second, n, keep in _edge_cases(7, 200):
        assert torch.all(first != second)
        for r in range(0, (n - keep) // 2 + 1):
            got = pairs.native_edges(score, first, second, r, n, keep)
            assert got is not None
            assert _equal(got, pairs.tensor_greedy_pairs(score, first, second, r, n, keep)), (n, keep, r)
            checked += 1
    assert checked > 1000


@needs_kernel
@pytest.mark.parametrize("method", ["pairs_lsh", "ward_lsh"])
def test_hashed_methods_merge_the_same_with_and_without_the_kernel(method, monkeypatch):
    from mergeseek.encoders.merging.registry import get_spec

    g = torch.Generator().manual_seed(8)
    metric, tokens = torch.randn(3, 65, 16, generator=g), torch.randn(3, 65, 24, generator=g)
    size = torch.randint(1, 5, (3, 65, 1), generator=g).float()
    fn = get_spec(method).fn
    for r in (1, 8, 20, 32):
        fused = fn(metric, r, protected=1, size=size, tokens=tokens)
        monkeypatch.setenv("MERGESEEK_PAIRS_NATIVE", "0")
        tensor = fn(metric, r, protected=1, size=size, tokens=tokens)
        monkeypatch.delenv("MERGESEEK_PAIRS_NATIVE")
        x = torch.randn(3, 65, 6, generator=g)
        assert all(torch.equal(a, b) for a, b in zip(fused.wavg(x, size), tensor.wavg(x, size)))
        assert torch.equal(fused.fallback, tensor.fallback)
