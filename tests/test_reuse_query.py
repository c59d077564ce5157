"""The query gate (``query=T``, encoders/reuse/, docs/REUSE.md) against the naive per-token
statement of tests/test_reuse_roll.py, written from the docs:

- in a dependant, attention is recomputed only for the queries whose q/k/v row was recomputed or
  (``T`` below ``threshold``) whose block input moved by ``T`` (relative L2 against the cached
  input), and the class token whenever any other query of the frame is; every selected query
  attends to every key of its frame (the recomputed and the cached rows);
- the other queries keep their cached attention output and out-projection rows, and so does the
  rolling cache they leave;
- ``query=0`` (the default) is the old rule: every query of a frame with a recomputed q/k/v row;
- the result does not depend on how the frames are batched, with and without rolling caches.

A tiny timm ViT (64 px, 16 patches, random weights) keeps the file fast.
"""

from __future__ import annotations

import pytest
import torch

from mergeseek.encoders.reuse import ReuseConfig, ReuseStream
from mergeseek.errors import ConfigError
from test_reuse_roll import BITS, PATCH, SIDE, THRESHOLD, drifting_frames, naive_rolling, stream_outputs

N = (SIDE // PATCH) ** 2 + 1


@pytest.fixture(scope="module")
def tiny_vit(one_torch_thread):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, num_classes=0).eval()


def rows_of(stream, gate: int) -> int:
    return sum(c[gate] for c in stream.stats.computed)


# ---------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("query", [THRESHOLD, 0.5, 0.04])
@pytest.mark.parametrize("roll,batch", [(1, 1), (3, 4), (3, 20), (0, 5), (0, 20)])
def test_query_gate_equals_the_naive_per_token_rule_however_frames_are_batched(tiny_vit, query, roll, batch):
    frames = drifting_frames(14)
    cfg = ReuseConfig(threshold=THRESHOLD, refresh=12, cut=1.0, roll=roll, bits=BITS, query=query)
    stream = ReuseStream(tiny_vit, cfg, "none")
    got = stream_outputs(stream, frames, batch)
    # roll=0 compares every dependant with its reference: the naive statement with groups longer
    # than the shot
    want, dep_rows = naive_rolling(tiny_vit, stream.planes, frames, roll or 100, refresh=12, query=query)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    blocks = len(tiny_vit.blocks)
    assert rows_of(stream, 0) == 2 * N * blocks + dep_rows  # two references: frame 0 and the refresh
    proj = rows_of(stream, 1) - 2 * N * blocks  # the dependants' out-projection rows
    if query >= THRESHOLD:  # exactly the q/k/v rows
        assert proj == dep_rows
    else:  # the q/k/v rows and more, never every row
        assert dep_rows < proj < (len(frames) - 2) * N * blocks


def test_query_gate_keeps_the_cached_rows_the_old_rule_recomputes(tiny_vit):
    """Against ``query=0`` on the same frames: the same q/k/v rows at block 0 (the hash decides),
    fewer out-projection rows, a different (approximate) result that stays close."""
    frames = drifting_frames(10)
    runs = {}
    for query in (0.0, THRESHOLD):
        stream = ReuseStream(tiny_vit, ReuseConfig(threshold=THRESHOLD, refresh=100, cut=1.0, roll=2, bits=BITS, query=query), "none")
        runs[query] = (stream_outputs(stream, frames, 10), stream.stats)
    (old, s_old), (new, s_new) = runs[0.0], runs[THRESHOLD]
    assert s_old.computed[0][0] == s_new.computed[0][0]
    assert rows_of_stats(s_new, 1) < rows_of_stats(s_old, 1)
    assert not torch.equal(old, new)
    assert torch.nn.functional.cosine_similarity(old, new).min().item() > 0.99


def rows_of_stats(stats, gate: int) -> int:
    return sum(c[gate] for c in stats.computed)


@pytest.mark.parametrize("merge", ["r=2", "r=2,method=lsh"])
def test_query_gate_with_merging_selecting_every_query_equals_the_old_rule(tiny_vit, merge):
    """With merging (replayed merges, the size bias on the keys): a query threshold that every
    moving input passes selects every query of the frames that move, which is ``query=0``; and
    the gate proper (``query=threshold``) recomputes fewer rows and stays close."""
    from mergeseek.encoders import apply_merging, remove_merging

    frames = drifting_frames(8)
    apply_merging(tiny_vit, merge)
    try:
        outs, stats = {}, {}
        for query in (0.0, 1e-9, THRESHOLD):
            cfg = ReuseConfig(threshold=THRESHOLD, refresh=100, cut=1.0, roll=3, bits=BITS, query=query)
            stream = ReuseStream(tiny_vit, cfg, merge)
            outs[query], stats[query] = stream_outputs(stream, frames, 8), stream.stats
    finally:
        remove_merging(tiny_vit)
    assert torch.allclose(outs[1e-9], outs[0.0], atol=1e-5)
    assert rows_of_stats(stats[1e-9], 1) == rows_of_stats(stats[0.0], 1)
    assert rows_of_stats(stats[THRESHOLD], 1) < rows_of_stats(stats[0.0], 1)
    assert torch.nn.functional.cosine_similarity(outs[THRESHOLD], outs[0.0]).min().item() > 0.99


def test_query_gate_reads_the_device_once_more_per_block_only_below_the_threshold(tiny_vit):
    """``query`` >= threshold selects the q/k/v rows, known without a read; a lower one is a gate
    of its own: one read per block more (3 per block minus one, per pass)."""
    from test_compile import PyRecorder

    frames = drifting_frames(9)
    blocks = len(tiny_vit.blocks)
    for query, reads in ((THRESHOLD, 2 * blocks - 1), (0.04, 3 * blocks - 1)):
        stream = ReuseStream(tiny_vit, ReuseConfig(threshold=THRESHOLD, refresh=100, cut=1.0, bits=BITS, query=query), "none")
        with torch.inference_mode():
            stream.encode(frames[:1], ["v"])
            py = PyRecorder()
            with py:
                stream.encode(frames[1:], ["v"] * 8)
        assert py.calls.get("tolist", 0) == reads


@pytest.mark.parametrize("spec,ok", [("query=0", True), ("query=0.15", True), ("query=-0.1", False),
                                     ("query=nan", False), ("query=x", False)])
def test_query_config(spec, ok):
    if ok:
        cfg = ReuseConfig.parse("threshold=0.1," + spec)
        assert ReuseConfig.parse(str(cfg)) == cfg
    else:
        with pytest.raises(ConfigError, match="query"):
            ReuseConfig.parse("threshold=0.1," + spec)


# ---------------------------------------------------------------------------- the merge replay
@pytest.mark.parametrize("merge", ["r=2", "r=3,method=lsh", "r=2,method=pairs"])
def test_a_replayed_merge_gives_the_references_own_merged_tokens(tiny_vit, merge):
    """A dependant merges with its reference's map (each token's slot and weight): applied to the
    reference's own post-attention tokens (x + attention branch, cached) it must give the tokens
    the matcher merged, the cached ``y`` of every merging block."""
    from mergeseek.encoders import apply_merging, remove_merging
    from mergeseek.encoders.reuse.forward import BlockPass

    apply_merging(tiny_vit, merge)
    try:
        stream = ReuseStream(tiny_vit, ReuseConfig(threshold=THRESHOLD, bits=BITS), merge)
        stream_outputs(stream, drifting_frames(1), 1)
    finally:
        remove_merging(tiny_vit)
    blocks = stream.streams["v"].ref.blocks
    merging = [c for c in blocks if c.merge_map is not None]
    assert len(merging) >= 4  # the first blocks merge (17 tokens: later ones may have too few)
    for c in merging:
        n_in, n_out = c.x.shape[1], c.y.shape[1]
        assert n_out < n_in and c.merge_map.shape == (1, n_in, 2)
        got = BlockPass.replay(c.merge_map, c.x + c.p, n_out)
        assert torch.allclose(got, c.y, atol=1e-5), float((got - c.y).abs().max())


@pytest.mark.parametrize("merge", ["r=2", "r=2,method=pairs", "r=2,method=ward", "r=3,method=ward_lsh"])
def test_threshold_zero_is_the_plain_merged_forward_for_every_rule(tiny_vit, merge):
    """With threshold=0 every frame is a reference: the stream's matcher must take the pairs the
    plain merged forward takes. Ward's cost is computed on the block's tokens, and the reuse pass
    merges them with an identity block appended (to record the map): the matcher must score the
    tokens alone."""
    from mergeseek.encoders import apply_merging, remove_merging

    frames = drifting_frames(3)
    apply_merging(tiny_vit, merge)
    try:
        with torch.inference_mode():
            want = tiny_vit(frames)
        got = stream_outputs(ReuseStream(tiny_vit, ReuseConfig(threshold=0.0, bits=BITS), merge), frames, 3)
    finally:
        remove_merging(tiny_vit)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
