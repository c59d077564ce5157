"""The eighth round's adaptive merging (bench/issue26_adaptive.py): ``base`` is ``pairs``; with a
threshold an image merges ahead of the schedule only near-duplicate pairs, its freed slots are
size-0 padding, the width stays ``N - r``, and the pairs agree with a naive per-image loop."""

from __future__ import annotations

import copy

import pytest
import torch

from mergeseek.bench.issue26_adaptive import ada_merging, register, variant
from mergeseek.encoders import apply_merging
from mergeseek.encoders.merging import merge_wavg


@pytest.fixture(scope="module")
def tiny():
    import dataclasses

    from mergeseek.eval.reference import build_model, get_config

    register()
    torch.manual_seed(0)
    return build_model(dataclasses.replace(get_config("reference-tiny"), depth=4)).eval()


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_base_is_pairs_and_a_batch_is_its_images(tiny):
    x = images()
    with torch.no_grad():
        want = apply_merging(copy.deepcopy(tiny), "method=pairs,r=4")(x)
        with variant("base"):
            got = apply_merging(copy.deepcopy(tiny), "method=ada,r=4")(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with variant("tau=0.5"):
            model = apply_merging(copy.deepcopy(tiny), "method=ada,r=4")
            batch = model(x)
            alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch, want, atol=1e-4)  # the threshold changed what merged


def naive(u, real, need, keep_first, tau):
    """One image: all pairs of free tokens by cosine, best first; take an edge while both ends are
    unused and (fewer than ``need`` taken, or its cosine >= tau); at most half the free tokens."""
    n = u.shape[0]
    free = [i for i in range(keep_first, n) if real[i]]
    edges = sorted(((float(u[i] @ u[j]), i, j) for a, i in enumerate(free) for j in free[a + 1:]), key=lambda e: -e[0])
    used, pairs = set(), []
    for cos, i, j in edges:
        if len(pairs) >= len(free) // 2 or not (len(pairs) < need or cos >= tau):
            break
        if i in used or j in used:
            continue
        used |= {i, j}
        pairs.append((i, j))
    return sorted(pairs)


@pytest.mark.parametrize("tau", [2.0, 0.6, 0.2])
def test_matcher_agrees_with_a_naive_loop_and_pads(tau):
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(3, 13, 4, generator=g), dim=-1)
    size = torch.ones(3, 13, 1)
    size[1, 10:] = 0  # image 1 carries three padding slots from an earlier block
    r = 3
    with variant(f"tau={tau}"):
        result = ada_merging(u, r, class_token=True, size=size)
    assert result.width == 13 - r and result.padded
    x = torch.randn(3, 13, 5, generator=g)
    merged, out_size = merge_wavg(result, x, size)
    for b in range(3):
        real = (size[b, :, 0] > 0).tolist()
        need = max(0, sum(real) - (13 - r))
        pairs = naive(u[b], real, need, 1, tau)
        onehot = torch.eye(13)[None] * size[b, :, 0][None, None]
        groups = result.merge(onehot.expand(3, 13, 13).contiguous(), mode="sum")[b]
        got = sorted(tuple(torch.nonzero(g).flatten().tolist()) for g in groups if int((g > 0).sum()) == 2)
        assert got == pairs, (b, got, pairs)
        assert float(out_size[b].sum()) == float(size[b].sum())  # every patch still counted once
        kept = sum(real) - len(pairs)
        assert kept <= 13 - r and int((out_size[b, :, 0] > 0).sum()) == kept  # the rest is size-0 padding
