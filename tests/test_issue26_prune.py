"""The seventh round's screening variants (bench/issue26_prune.py) do what their names say: the
base variant is ``pairs``, the pruning variants keep the right values and drop the right tokens,
and the agglomerative variant agrees with a naive per-image clustering loop."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from mergeseek.bench.issue26_prune import p7_merging, register, variant
from mergeseek.encoders import apply_merging
from mergeseek.encoders.merging import merge_wavg


@pytest.fixture(scope="module")
def tiny():
    import dataclasses

    from mergeseek.eval.reference import build_model, get_config

    register()
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("reference-tiny"), depth=4)).eval()


def unit(batch, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, n, dim, generator=g), dim=-1)


def class_row(batch, n, seed):
    """A class-token attention row [B, H=2, 1, N] with distinct values."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 2, 1, n, generator=g).softmax(dim=-1)


def groups(result, n):
    """The partition a result makes, per image: frozensets of input positions per output slot."""
    onehot = torch.eye(n).expand(result.num_merged.shape[0] if torch.is_tensor(result.num_merged) else 1, n, n)
    out = result.merge(onehot.contiguous(), mode="sum")  # [B, width, N]
    return [{frozenset(torch.nonzero(row).flatten().tolist()) for row in img} for img in out]


def test_base_is_pairs(tiny):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = apply_merging(copy.deepcopy(tiny), "method=pairs,r=4")(x)
        with variant("base"):
            got = apply_merging(copy.deepcopy(tiny), "method=p7,r=4")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def naive_agglomerate(u, r, keep_first, linkage):
    """One image: r joins of the two most similar clusters; average (mean over member pairs) or
    complete (min over member pairs) linkage on the token cosines."""
    sim = u @ u.T
    clusters = [[i] for i in range(keep_first, u.shape[0])]
    for _ in range(r):
        best, pick = None, None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            vals = torch.stack([sim[i, j] for i in clusters[a] for j in clusters[b]])
            s = float(vals.min() if linkage == "complete" else vals.mean())
            if best is None or s > best:
                best, pick = s, (a, b)
        a, b = pick
        clusters[a] = clusters[a] + clusters.pop(b)
    return {frozenset(c) for c in clusters} | {frozenset([i]) for i in range(keep_first)}


@pytest.mark.parametrize("value,linkage", [(0, "average"), (-1, "complete")])
def test_agglomerative_matches_a_naive_loop(value, linkage):
    u = unit(3, 13, 6, seed=4)
    with variant(f"agglo={value}"):
        result = p7_merging(u, 5, class_token=True)
    assert result.width == 13 - 5
    want = [naive_agglomerate(u[b], 5, 1, linkage) for b in range(3)]
    assert groups(result, 13) == want


def test_prune_drops_the_least_attended_and_keeps_values():
    u, attn = unit(2, 11, 5, seed=5), class_row(2, 11, seed=6)
    x = torch.randn(2, 11, 7, generator=torch.Generator().manual_seed(7))
    with variant("prune=0"):
        result = p7_merging(u, 3, class_token=True, attn=attn)
    merged, size = merge_wavg(result, x, None)
    score = attn[:, :, 0].mean(dim=1)
    for b in range(2):
        gone = set(score[b, 1:].argsort()[:3].add(1).tolist())
        kept = [i for i in range(11) if i not in gone]
        torch.testing.assert_close(merged[b], x[b, kept])  # values of the kept tokens, untouched
        assert float(size[b].sum()) == 11.0  # the pruned tokens' sizes went to kept tokens
        part = groups(result, 11)[b]
        for i in gone:  # each joined its most similar kept token
            host = max(kept[1:], key=lambda k: float(u[b, i] @ u[b, k]))
            assert any({i, host} <= g for g in part)


def test_early_keeps_the_earlier_value_in_early_blocks_only():
    u = unit(2, 11, 5, seed=8)
    x = torch.randn(2, 11, 7, generator=torch.Generator().manual_seed(9))
    with variant("base"):
        pairs = p7_merging(u, 3, class_token=True)
    with variant("early=1"):
        first = p7_merging(u, 3, class_token=True)  # sizes None: the first block
        # 8 tokens after 11 with r=3: the block after the first (the index is read off the count)
        later = p7_merging(u[:, :8], 3, class_token=True, size=torch.ones(2, 8, 1))
    with variant("base"):
        pairs_later = p7_merging(u[:, :8], 3, class_token=True, size=torch.ones(2, 8, 1))
    assert groups(first, 11) == groups(pairs, 11)
    merged, _ = merge_wavg(first, x, None)
    for b, part in enumerate(groups(first, 11)):
        rows = sorted(part, key=min)
        torch.testing.assert_close(merged[b], x[b, [min(g) for g in rows]])
    ones = torch.ones(2, 8, 1)
    torch.testing.assert_close(merge_wavg(later, x[:, :8], ones)[0], merge_wavg(pairs_later, x[:, :8], ones)[0])
    assert not torch.allclose(merge_wavg(first, x, None)[0], merge_wavg(pairs, x, None)[0])


def test_medoid_keeps_the_more_attended_member():
    u, attn = unit(2, 11, 5, seed=10), class_row(2, 11, seed=11)
    x = torch.randn(2, 11, 7, generator=torch.Generator().manual_seed(12))
    with variant("base"):
        pairs = p7_merging(u, 4, class_token=True, attn=attn)
    with variant("medoid=0"):
        result = p7_merging(u, 4, class_token=True, attn=attn)
    score = attn[:, :, 0].mean(dim=1)
    merged, _ = merge_wavg(result, x, None)
    assert groups(result, 11) == groups(pairs, 11)
    for b, part in enumerate(groups(result, 11)):
        values = {tuple(v.tolist()) for v in merged[b]}
        for g in part:
            winner = max(g, key=lambda i: float(score[b, i]))
            assert tuple(x[b, winner].tolist()) in values


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        with variant("beta=2"):
            pass


def test_the_screening_command_line(monkeypatch):
    """bench/issue26_schedule.screening_main (every later round's command line): ``score`` runs the
    configs tagged with the variant while the variant is active; ``table`` pairs with ``--ref``."""
    from mergeseek.bench import issue26_prune, issue26_schedule

    calls = []
    monkeypatch.setattr(issue26_schedule, "score", lambda model, half, cfgs, out: calls.append(
        ("score", model, half, cfgs, out, dict(issue26_prune._variant))))
    monkeypatch.setattr(issue26_schedule, "table", lambda model, half, ref, out: calls.append(("table", half, ref)))
    issue26_schedule.screening_main(issue26_prune.__doc__, variant, "help", "method=p7,r=16", register,
                                    ["score", "--variant", "early=2", "method=p7,r=16", "--half", "B"])
    issue26_schedule.screening_main(issue26_prune.__doc__, variant, "help", "method=p7,r=16", register,
                                    ["table", "--ref", "method=bipartite,r=16|base"])
    assert calls == [("score", "reference-cifar10", "B", ["method=p7,r=16|early=2"], "runs/i26f",
                      {"kind": "early", "value": 2.0}),
                     ("table", "A", "method=bipartite,r=16|base")]
    assert issue26_prune._variant["kind"] == "base"  # left as it was


def test_the_screening_cache_is_built_from_the_test_pack_and_read_back_by_halves(tmp_path, monkeypatch):
    """``issue26_schedule cache``: each slice of the (class-interleaved) test pack preprocessed as the
    model takes it, labels beside it; ``load_half`` reads the slices back as halves A and B; slices
    already written are kept."""
    import numpy as np

    from mergeseek.bench import issue26_schedule
    from mergeseek.eval import reference

    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 10
    model = reference.build_model(reference.get_config("reference-tiny")).eval()  # no weights needed here
    monkeypatch.setattr(reference, "load_reference", lambda name: (model, None))
    monkeypatch.setattr(reference, "load_cifar10_npz", lambda path, split: reference.Cifar10Split(images, labels))
    monkeypatch.setattr(issue26_schedule, "SLICES", ((0, 20), (20, 40)))
    monkeypatch.setattr(issue26_schedule, "CACHE", str(tmp_path))
    written = issue26_schedule.build_cache("reference-tiny", "unused", str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["reference-tiny_0_20.pt", "reference-tiny_20_40.pt"]
    want = reference.preprocess_uint8(images, reference.preprocess_info_of(model))
    x, y = issue26_schedule.load_half("reference-tiny", "A")
    pick = issue26_schedule.half_index(40, "A")
    assert torch.equal(x, want[pick]) and y.tolist() == labels[pick].tolist()
    assert issue26_schedule.build_cache("reference-tiny", "unused", str(tmp_path)) == []  # kept
