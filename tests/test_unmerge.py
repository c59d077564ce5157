"""unmerge=true: the full token grid back from a merged timm ViT, for every merge method.

The grid is checked against the model itself (r=0: exactly the unmerged model), against a naive
per-image replay of every block's merge (each position followed through the merges in Python,
its slot read off ``merge`` applied to one-hot rows, then compared with the merged model's own
tokens), and for static shapes, batch independence, host reads and graph breaks.
"""

from __future__ import annotations

import pytest
import torch

from mergeseek.encoders import apply_merging
from mergeseek.encoders.merging import MATCHERS
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.encoders.merging.unmerge import token_slots
from mergeseek.encoders.patch import common
from tests.test_compile import _syncs, device_like_lsh  # noqa: F401  (fixture)

SPECS = ["r=8", "r=8,method=lsh", "r=8,method=energy", "r=8,method=energy_lsh", "keep=0.7,method=importance",
         "keep=0.7,method=zerotprune", "r=8,merge=mlerp,metric=heads", "r=[0,12,8],method=bipartite"]
FAST = ("r=8", "r=8,method=lsh", "keep=0.7,method=importance")  # the rest run in make test-slow / CI
SIDE, WIDTH, GRID = 32, 32, 64  # 8 x 8 patches + a class token = 65 tokens, 3 blocks


def _vit(depth: int = 3):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=SIDE, patch_size=4, embed_dim=WIDTH, depth=depth, num_heads=2,
                             num_classes=0).eval()


def _some(specs):
    return [s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s in specs]


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))


def test_r0_grid_is_the_unmerged_model_exactly(pixels):
    model = _vit()
    with torch.no_grad():
        ref = model.forward_features(pixels)
        ref_i = model.forward_intermediates(pixels, indices=[0, 2], norm=True)
        apply_merging(model, "r=0,unmerge=true")
        got = model.forward_features(pixels)
        got_i = model.forward_intermediates(pixels, indices=[0, 2], norm=True)
    assert torch.equal(got, ref)
    assert torch.equal(got_i[0], ref_i[0])
    assert all(torch.equal(a, b) for a, b in zip(got_i[1], ref_i[1]))


def _naive_slots(result: MergeResult, batch: int, b: int, n: int) -> list:
    """Where each of image b's n input tokens went, read off ``merge`` of one-hot rows (None: dropped)."""
    onehot = torch.eye(n, dtype=torch.float64)[None].repeat(batch, 1, 1)
    merged = result.merge(onehot, mode="sum")[b]  # [width, n]: column i is 1 in token i's slot
    out = []
    for i in range(n):
        hits = merged[:, i].nonzero()[:, 0].tolist()
        assert len(hits) <= 1
        out.append(hits[0] if hits else None)
    return out


def unmerged_with_naive_slots(model, spec: str, run, batch: int, monkeypatch) -> tuple:
    """``run()`` on ``model`` patched with ``spec`` + unmerge, every block's merge recorded; returns
    (its output, per image the slot each input position ends in, by a naive replay; None: dropped)."""
    records = []
    real = common.merge_tokens

    def recording(x, state, metric, attn, r, plan):
        out = real(x, state, metric, attn, r, plan)
        records.append((x.shape[1], out[2]))
        return out

    monkeypatch.setattr(common, "merge_tokens", recording)
    apply_merging(model, spec + ",unmerge=true")
    with torch.no_grad():
        out = run()
    monkeypatch.undo()
    maps = []
    for b in range(batch):
        slots = list(range(records[0][0])) if records else []
        for n, result in records:
            if isinstance(result, MergeResult) and not result.identity:
                step = _naive_slots(result, batch, b, n)
                slots = [None if s is None else step[s] for s in slots]
        maps.append(slots)
    return out, maps


@pytest.mark.parametrize("spec", SPECS + ["keep=0.7,method=zerotprune,prune=on"])
def test_every_position_carries_its_merged_token(spec, pixels, monkeypatch):
    model = _vit()
    apply_merging(model, spec)
    with torch.no_grad():
        merged = model.forward_features(pixels)  # the merged tokens, no unmerge
    grid, maps = unmerged_with_naive_slots(model, spec, lambda: model.forward_features(pixels), pixels.shape[0],
                                           monkeypatch)
    n0 = len(maps[0])
    assert grid.shape == (4, n0, WIDTH) and n0 == GRID + 1
    assert merged.shape[1] < n0  # something merged
    for b, slots in enumerate(maps):
        for p, s in enumerate(slots):
            # a dropped position (prune=on) reads the zero vector, normed by the final norm
            want = model.norm(torch.zeros(WIDTH)) if s is None else merged[b, s]
            torch.testing.assert_close(grid[b, p], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["bipartite", "lsh", "energy", "energy_lsh", "importance", "zerotprune"])
@pytest.mark.parametrize("class_token", [True, False])
def test_a_matchers_slot_map_is_what_its_unmerge_gathers(method, class_token):
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(3, 25, 16, generator=g)
    options = {}
    if method in ("lsh", "energy_lsh"):
        from mergeseek.encoders.merging import simhash_planes

        options = dict(planes=simhash_planes(16, 4, 4, 0), lsh_bits=4, lsh_tables=4, lsh_window=16)
    attn = None
    if method in ("importance", "zerotprune"):
        if not class_token:
            pytest.skip("importance methods need a class token")
        attn = torch.rand(3, 2, 25, 25, generator=g).softmax(-1)
        if method == "importance":
            attn = attn[:, :, :1]
    result = MATCHERS[method](metric, 6, class_token, attn=attn, **options)
    own = result.slot()
    assert own.shape == (3, 25) and own.dtype == torch.long
    generic = token_slots(MergeResult(result.merge, result.unmerge, result.width, identity=False), 3)
    assert torch.equal(own, generic)
    x = torch.randn(3, result.width, 4, generator=g)
    torch.testing.assert_close(result.unmerge(x), x.gather(1, own[..., None].expand(-1, -1, 4)), rtol=0, atol=0)


def test_intermediates_are_the_unmerged_grids_of_each_block(pixels):
    model = _vit()
    apply_merging(model, "r=8,unmerge=true")
    with torch.no_grad():
        final, inter = model.forward_intermediates(pixels, indices=[1, 2], output_fmt="NLC")
        full = model.forward_features(pixels)
        nchw = model.forward_intermediates(pixels, indices=[1, 2], intermediates_only=True)
    assert [t.shape for t in inter] == [(4, GRID, WIDTH)] * 2
    assert [t.shape for t in nchw] == [(4, WIDTH, 8, 8)] * 2
    torch.testing.assert_close(nchw[0], inter[0].transpose(1, 2).reshape(4, WIDTH, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(final, full, rtol=0, atol=0)
    # the last block's grid, normed, is the final output without its class token
    torch.testing.assert_close(model.norm(inter[1]), full[:, 1:], rtol=0, atol=1e-6)
    assert not torch.equal(inter[0], inter[1])


def test_intermediates_without_unmerge_are_refused(pixels):
    from mergeseek.errors import UnsupportedModelError

    model = _vit()
    apply_merging(model, "r=8")
    with pytest.raises(UnsupportedModelError, match="unmerge=true"):
        model.forward_intermediates(pixels)


@pytest.mark.parametrize("spec", _some(SPECS))
def test_batch_of_four_equals_four_of_one(spec, pixels):
    model = _vit()
    apply_merging(model, spec + ",unmerge=true")
    with torch.no_grad():
        whole = model.forward_features(pixels)
        single = torch.cat([model.forward_features(pixels[i:i + 1]) for i in range(4)])
    assert whole.shape == (4, GRID + 1, WIDTH)
    torch.testing.assert_close(whole, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_unmerged_forward_reads_nothing_back(spec, pixels, device_like_lsh, one_torch_thread):
    model = _vit()
    apply_merging(model, spec + ",unmerge=true")
    with torch.no_grad():
        assert _syncs(lambda: model.forward_intermediates(pixels[:2], indices=[1, 2])) == ([], [])


@pytest.mark.parametrize("spec", ["r=8", "r=8,method=lsh"] + [
    pytest.param(s, marks=pytest.mark.slow) for s in ("r=8,method=energy", "keep=0.7,method=importance")])
def test_unmerged_forward_traces_into_one_graph(spec, device_like_lsh, one_torch_thread):
    model = _vit(depth=2)
    apply_merging(model, spec + ",unmerge=true")
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.forward_features)(torch.randn(1, 3, SIDE, SIDE))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
