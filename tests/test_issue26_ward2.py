"""The tenth round's ward variants (bench/issue26_ward2.py): the base variant is ``method=ward``
exactly; every variant's edge scores and merges agree with a naive per-image loop; a batch equals
its images one by one; the variant context restores what it patches."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mergeseek.bench import issue26_ward2
from mergeseek.bench.issue26_ward2 import edge_scores, register, variant, w10_merging
from mergeseek.encoders import apply_merging

VARIANTS = ["bip", "k=4", "k=32", "ln", "two", "rounds=3", "imp=0.5", "imp=2", "kc=4", "kc=16"]


@pytest.fixture(scope="module")
def tiny():
    from mergeseek.eval.reference import build_model, get_config

    register()
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("reference-tiny"), depth=4)).eval()


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def inputs(batch=3, n=17, heads=2, seed=3):
    """Random keys, tokens, sizes (some tokens already merged) and class-token attention rows."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, n, 6, generator=g)
    tokens = torch.randn(batch, n, 5, generator=g) * torch.rand(batch, n, 1, generator=g).add(0.5)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    cls_attn = torch.randn(batch, heads, 1, n, generator=g).mul(2).softmax(dim=-1)
    return keys, tokens, size, cls_attn


def naive_cost(name, tokens, size, cls_attn, b, i, j):
    """One image, one edge (i, j): minus Ward's cost, written from the module doc."""
    kind, _, value = name.partition("=")
    x = tokens[b].tolist()
    si, sj = float(size[b, i]), float(size[b, j])
    if kind == "ln":
        def norm(row):
            mean = sum(row) / len(row)
            var = sum((v - mean) ** 2 for v in row) / len(row)
            return [(v - mean) / (var + 1e-5) ** 0.5 for v in row]
        x = [norm(row) for row in x]
    if kind == "imp":
        n, heads = tokens.shape[1], cls_attn.shape[1]
        c = [sum(float(cls_attn[b, h, 0, t]) for h in range(heads)) / heads for t in range(n)]
        si, sj = si * (1 + float(value) * n * c[i]), sj * (1 + float(value) * n * c[j])
    return -(si * sj / (si + sj)) * sum((p - q) ** 2 for p, q in zip(x[i], x[j]))


def naive_greedy(score, free, r, candidates=None, rank=None):
    """One image: edges between the ``free`` tokens (each token's ``candidates`` best partners by
    ``rank``, default ``score``; or all), best first by ``score``; take r whose ends are both
    unused. Returns the pairs (i < j) in order taken."""
    edges = set()
    rank = rank or score
    for i in free:
        partners = sorted((j for j in free if j != i), key=lambda j: -rank(i, j))
        for j in partners[: candidates or len(partners)]:
            edges.add((min(i, j), max(i, j)))
    used, pairs = set(), []
    for i, j in sorted(edges, key=lambda e: (-score(*e), e)):
        if len(pairs) == r:
            break
        if i not in used and j not in used:
            used |= {i, j}
            pairs.append((i, j))
    return pairs


def naive_bip(score, n, r, keep_first=1):
    """One image, ToMe's split: A = even positions (the protected ones left out), B = odd; each A
    token's best B partner, the r best A tokens merged into theirs. Returns the merged groups."""
    a = list(range(2 * keep_first, n, 2))
    best = {i: max(range(1, n, 2), key=lambda j: score(i, j)) for i in a}
    chosen = sorted(a, key=lambda i: -score(i, best[i]))[:r]
    groups = {}
    for i in chosen:
        groups.setdefault(best[i], {best[i]}).add(i)
    return {frozenset(g) for g in groups.values()}


def merged_groups(result, n):
    onehot = torch.eye(n).expand(result.num_merged.shape[0], n, n).contiguous()
    out = result.merge(onehot, mode="sum")
    return [{frozenset(torch.nonzero(row).flatten().tolist()) for row in img if int(row.sum()) >= 2} for img in out]


@pytest.mark.parametrize("name", ["base"] + VARIANTS)
def test_scores_agree_with_a_naive_loop(name):
    keys, tokens, size, cls_attn = inputs()
    kind, _, value = name.partition("=")
    got = edge_scores(kind, float(value or 0), tokens, size, cls_attn)
    n = tokens.shape[1]
    off = ~torch.eye(n, dtype=torch.bool)
    for b in range(3):
        want = torch.tensor([[naive_cost(name, tokens, size, cls_attn, b, i, j) if i != j else 0.0
                              for j in range(n)] for i in range(n)])
        torch.testing.assert_close(got[b][off], want[off], rtol=1e-4, atol=1e-4)


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


@pytest.mark.parametrize("name", ["base", "k=4", "k=32", "ln", "imp=0.5", "imp=2", "bip", "kc=4", "kc=16"])
def test_merges_agree_with_a_naive_loop(name):
    keys, tokens, size, cls_attn = inputs()
    n, r = 17, 6
    with variant(name):
        result = w10_merging(keys, r, class_token=True, size=size, attn=cls_attn, tokens=tokens)
    kind, _, value = name.partition("=")
    for b in range(3):
        def score(i, j, b=b):
            return naive_cost(name, tokens, size, cls_attn, b, i, j)
        if kind == "bip":
            want = naive_bip(score, n, r)
        elif kind == "kc":  # candidates: the key cosine's best; edges: Ward's cost
            pairs = naive_greedy(score, range(1, n), r, int(value), rank=lambda i, j, b=b: cos(keys[b, i], keys[b, j]))
            want = {frozenset(p) for p in pairs}
        else:
            pairs = naive_greedy(score, range(1, n), r, int(value) if kind == "k" else 16)
            want = {frozenset(p) for p in pairs}
        assert merged_groups(result, n)[b] == want


@pytest.mark.parametrize("name", ["k=2", "kc=4"])
def test_fewer_candidates_change_the_pairs(name):
    """k=2 and kc=4 must not reduce to taking every edge (else their tests would not test the limit)."""
    keys, tokens, size, cls_attn = inputs()
    with variant(name):
        few = merged_groups(w10_merging(keys, 8, class_token=True, size=size, tokens=tokens), 17)
    with variant("base"):
        all_ = merged_groups(w10_merging(keys, 8, class_token=True, size=size, tokens=tokens), 17)
    assert few != all_


def test_round_sizes():
    assert issue26_ward2.round_sizes(16, 2) == [8, 8] and issue26_ward2.round_sizes(7, 2) == [3, 4]
    assert issue26_ward2.round_sizes(20, 3) == [6, 7, 7] and issue26_ward2.round_sizes(2, 4) == [1, 1]
    assert issue26_ward2.round_sizes(0, 2) == []


@pytest.mark.parametrize("name,parts", [("two", (3, 4)), ("rounds=2", (3, 4)), ("rounds=3", (2, 2, 3)),
                                        ("rounds=1", (7,))])
def test_rounds_agree_with_a_naive_loop(name, parts):
    """The patched merge step: r // 2 greedy pairs, the size-weighted means, r - r // 2 more pairs
    scored on the merged rows and sizes (``two``; ``rounds=R``: R such rounds); the output rows in
    position order (a pair in the slot of its earlier token)."""
    from mergeseek.encoders.config import MergeConfig
    from mergeseek.encoders.patch import common

    register()
    keys, tokens, size, cls_attn = inputs()
    r = 7
    plan = common.make_plan(MergeConfig.parse(f"method=w10,r={r}"), protected=1)
    with variant(name):
        x, state, result = common.merge_tokens(tokens, common.TokenState(size), keys, cls_attn, r, plan)
    assert x.shape[1] == 17 - r and result.num_merged.tolist() == [r] * 3
    for b in range(3):
        rows = [(tokens[b, t].double(), float(size[b, t])) for t in range(17)]
        for take in parts:
            def score(i, j):
                (xi, si), (xj, sj) = rows[i], rows[j]
                return -(si * sj / (si + sj)) * float(((xi - xj) ** 2).sum())
            for i, j in naive_greedy(score, range(1, len(rows)), take):
                (xi, si), (xj, sj) = rows[i], rows[j]
                rows[i] = ((si * xi + sj * xj) / (si + sj), si + sj)
                rows[j] = None
            rows = [row for row in rows if row is not None]
        torch.testing.assert_close(x[b].double(), torch.stack([row[0] for row in rows]), rtol=1e-5, atol=1e-5)
        assert state.size[b, :, 0].tolist() == [row[1] for row in rows]
    one, _, _ = common.merge_tokens(tokens, common.TokenState(size), keys, cls_attn, r, plan)
    assert torch.allclose(x, one) == (len(parts) == 1)  # a later round took a merged token again


def test_base_is_ward_exactly(tiny):
    x = images()
    with torch.no_grad():
        want = apply_merging(copy.deepcopy(tiny), "method=ward,r=4")(x)
        with variant("base"):
            got = apply_merging(copy.deepcopy(tiny), "method=w10,r=4")(x)
        with variant("k=16"):
            k16 = apply_merging(copy.deepcopy(tiny), "method=w10,r=4")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(k16, want, rtol=0, atol=0)


def test_base_matcher_is_ward_on_random_inputs():
    from mergeseek.encoders.merging.ward import ward_merging

    keys, tokens, size, _ = inputs(n=41)
    with variant("base"):
        got = w10_merging(keys, 12, class_token=True, size=size, tokens=tokens)
    want = ward_merging(keys, 12, class_token=True, size=size, tokens=tokens)
    assert torch.equal(got.merge(tokens), want.merge(tokens))


@pytest.mark.parametrize("name", VARIANTS)
def test_a_batch_is_its_images(tiny, name):
    x = images()
    with torch.no_grad(), variant(name):
        model = apply_merging(copy.deepcopy(tiny), "method=w10,r=4")
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        assert model._merge_last.summary()["tokens"] == [13, 9, 5, 3]  # same token counts as ward
        with variant("base"):
            base = model(x)
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    if name.split("=")[0] not in ("k", "kc", "two", "rounds"):  # base's pairs here (tested on their own)
        assert not torch.allclose(batch, base, atol=1e-4)  # the variant changed what merged


def test_the_variant_context_restores_what_it_patches():
    from mergeseek.encoders.patch import common

    before = common.merge_tokens
    for name in VARIANTS + ["base"]:
        with variant(name):
            assert (common.merge_tokens is before) == (name.split("=")[0] not in ("two", "rounds"))
        assert common.merge_tokens is before
        assert issue26_ward2._variant == {"kind": "base", "value": 0.0}
    for name in ("two", "rounds=4", "imp=2"):
        with pytest.raises(RuntimeError):
            with variant(name):
                raise RuntimeError("inside")
        assert common.merge_tokens is before
        assert issue26_ward2._variant == {"kind": "base", "value": 0.0}


@pytest.mark.parametrize("name", ["cosine=2", "k", "k=0", "kc", "rounds", "rounds=0", "wardp=2"])
def test_unknown_or_incomplete_variant_is_refused(name):
    with pytest.raises(ValueError, match="variant"):
        with variant(name):
            pass
    assert issue26_ward2._variant == {"kind": "base", "value": 0.0}


def test_missing_inputs_are_refused():
    keys, tokens, size, _ = inputs()
    with pytest.raises(ValueError, match="tokens"):
        w10_merging(keys, 2, class_token=True)
    with variant("imp=1"), pytest.raises(ValueError, match="needs"):
        w10_merging(keys, 2, class_token=True, tokens=tokens)


def test_the_command_line_takes_the_model(monkeypatch):
    from mergeseek.bench import issue26_schedule

    calls = []
    monkeypatch.setattr(issue26_schedule, "score", lambda model, half, cfgs, out: calls.append(
        ("score", model, half, cfgs, dict(issue26_ward2._variant))))
    monkeypatch.setattr(issue26_schedule, "table", lambda model, half, ref, out: calls.append(("table", model, ref)))
    main = issue26_schedule.screening_main
    main(issue26_ward2.__doc__, variant, "help", "method=w10,r=16", register,
         ["score", "--model", "reference-cifar10-56", "--variant", "k=32", "method=w10,r=20"])
    main(issue26_ward2.__doc__, variant, "help", "method=w10,r=16", register, ["table", "--ref", "method=ward,r=20"])
    assert calls == [("score", "reference-cifar10-56", "A", ["method=w10,r=20|k=32"], {"kind": "k", "value": 32.0}),
                     ("table", "reference-cifar10", "method=ward,r=20")]
