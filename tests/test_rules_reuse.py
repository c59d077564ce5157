"""The documented rules of reuse across frames (docs/REUSE.md, encoders/reuse/), one assertion per
rule with its boundary case, each against an independent statement of the rule (a frame-number
formula, a hand-computed angle or relative change, an explicit LRU order) rather than a rerun of
the code. A tiny timm ViT (64 px, 16 patches, random weights) keeps the file fast.

Rules pinned here:
- refresh=R: in a shot of identical frames, frame i is a reference exactly when i % R == 0;
- cut: a frame whose share of changed patches is *above* ``cut`` starts a new shot; a share equal
  to ``cut`` does not;
- a patch counts as changed when its estimated angle (Hamming distance x pi / bits) is >= the
  threshold; a token row of a block when its relative L2 change is >= the threshold, and then the
  frame's prefix (class) tokens are recomputed too;
- per-video caches: at most ``max_videos`` kept, the least recently *used* dropped first;
  ``reset(video)`` drops that video only;
- config: ``refresh`` >= 1 and ``cut`` in (0, 1], refused otherwise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mergeseek.encoders.reuse import ReuseConfig, ReuseStream
from mergeseek.encoders.reuse.forward import BlockPass
from mergeseek.errors import ConfigError

SIDE, PATCH = 64, 16
GRID = SIDE // PATCH  # 4 x 4 = 16 patches


@pytest.fixture(scope="module")
def tiny_vit(one_torch_thread):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, num_classes=0).eval()


def frame(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def with_patches_replaced(base: torch.Tensor, k: int, seed: int = 99) -> torch.Tensor:
    """``base`` with its first ``k`` patches (row-major) replaced by unrelated strong noise."""
    out = base.clone()
    noise = 10.0 * frame(seed)
    for p in range(k):
        r, c = divmod(p, GRID)
        sl = (slice(None), slice(None), slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH))
        out[sl] = noise[sl]
    return out


def roles(stream: ReuseStream, frames, vid="v", one_by_one=True) -> list:
    """Per frame: True when it reused work (a dependant), False when it was a reference."""
    out = []
    with torch.inference_mode():
        if one_by_one:
            for f in frames:
                stream.encode(f, [vid])
                out += stream.last_reused
        else:
            stream.encode(torch.cat(list(frames)), [vid] * len(frames))
            out += stream.last_reused
    return out


# ---------------------------------------------------------------------------- refresh
@pytest.mark.parametrize("refresh", [2, 3, 5])
@pytest.mark.parametrize("one_by_one", [True, False])
def test_refresh_makes_every_refresh_th_frame_a_reference(tiny_vit, refresh, one_by_one):
    n = 2 * refresh + 2
    stream = ReuseStream(tiny_vit, ReuseConfig(threshold=0.05, refresh=refresh), "none")
    got = roles(stream, [frame(0)] * n, one_by_one=one_by_one)
    assert got == [i % refresh != 0 for i in range(n)]
    assert stream.stats.refreshes == (n - 1) // refresh and stream.stats.references == len(range(0, n, refresh))


# ---------------------------------------------------------------------------- cuts
def test_a_share_of_changed_patches_equal_to_cut_is_no_cut_and_one_more_patch_is(tiny_vit):
    base, k = frame(1), 6
    cfg = ReuseConfig(threshold=0.05, refresh=100, cut=k / GRID**2)
    stream = ReuseStream(tiny_vit, cfg, "none")
    assert roles(stream, [base, with_patches_replaced(base, k)]) == [False, True]
    assert stream.stats.cuts == 0
    stream = ReuseStream(tiny_vit, cfg, "none")
    assert roles(stream, [base, with_patches_replaced(base, k + 1)]) == [False, False]
    assert stream.stats.cuts == 1


def test_an_unrelated_frame_is_a_cut_at_the_default_cut(tiny_vit):
    stream = ReuseStream(tiny_vit, "threshold=0.05,refresh=100", "none")
    assert roles(stream, [frame(1), frame(1), frame(2), frame(2)]) == [False, True, False, True]
    assert stream.stats.cuts == 1


# ---------------------------------------------------------------------------- the patch gate
def test_a_patch_is_changed_when_its_estimated_angle_reaches_the_threshold(tiny_vit):
    bits = 64
    stream = ReuseStream(tiny_vit, ReuseConfig(threshold=3 * (math.pi / bits), refresh=16, bits=bits), "none")
    ref = np.zeros((1, 5, bits), dtype=bool)
    codes = ref.copy()
    for p, flips in enumerate([0, 1, 2, 3, 9]):  # Hamming distance per patch
        codes[0, p, :flips] = True
    expected = [flips * math.pi / bits >= 3 * math.pi / bits for flips in [0, 1, 2, 3, 9]]
    assert expected == [False, False, False, True, True]
    assert stream._changed(codes, ref).tolist() == [expected]


# ---------------------------------------------------------------------------- the row gate of the blocks
def test_a_row_is_recomputed_when_its_relative_change_reaches_the_threshold_and_then_the_prefix_too():
    gate = BlockPass.gate
    owner = SimpleNamespace(cfg=ReuseConfig(threshold=0.25), fam=SimpleNamespace(protected=1))
    old = torch.tensor([[[0.0, 4.0], [0.0, 4.0], [0.0, 4.0]],
                        [[0.0, 4.0], [0.0, 4.0], [0.0, 4.0]]])
    new = old.clone()
    new[0, 1, 0] = 1.0  # relative change 1/4: exactly the threshold
    new[0, 2, 0] = 0.5  # 1/8: below
    new[1, 1, 0] = 0.999  # just below: nothing of frame 1 moves, its class row neither
    new[1, 0, 0] = 0.5  # the class row itself moved below the threshold
    assert gate(owner, new, old).tolist() == [[True, True, False], [False, False, False]]
    assert gate(owner, new, old, threshold=0.125).tolist() == [[True, True, True], [True, True, False]]


@pytest.mark.parametrize("attn", [0.0, 0.05])
def test_identical_frames_compute_no_row_of_any_gate_after_the_reference(tiny_vit, attn):
    """attn=0 recomputes the out-projection only of frames whose attention was recomputed: a frame
    identical to its reference computes no row of qkv, out-projection or MLP in any block."""
    stream = ReuseStream(tiny_vit, ReuseConfig(threshold=0.05, refresh=16, attn=attn), "none")
    assert roles(stream, [frame(4)] * 2, one_by_one=False) == [False, True]
    n = GRID**2 + 1  # tokens per frame: patches and the class token
    assert stream.stats.rows == [[2 * n] * 3] * len(tiny_vit.blocks)
    assert stream.stats.computed == [[n] * 3] * len(tiny_vit.blocks)  # the reference's rows only


# ---------------------------------------------------------------------------- per-video caches
def test_caches_keep_the_max_videos_most_recently_used(tiny_vit):
    stream = ReuseStream(tiny_vit, ReuseConfig(threshold=0.05, refresh=100, max_videos=2), "none")
    f = {v: frame(i) for i, v in enumerate("abc")}
    with torch.inference_mode():
        for v in ["a", "b", "a", "c"]:  # "b" is now the least recently used
            stream.encode(f[v], [v])
    assert list(stream.streams) == ["a", "c"]
    assert roles(stream, [f["a"]], vid="a") == [True]  # a kept its reference
    assert roles(stream, [f["b"]], vid="b") == [False]  # b's was dropped


def test_reset_drops_one_video_only(tiny_vit):
    stream = ReuseStream(tiny_vit, "threshold=0.05,refresh=100", "none")
    with torch.inference_mode():
        stream.encode(torch.cat([frame(0), frame(1)]), ["a", "b"])
    stream.reset("a")
    assert roles(stream, [frame(1)], vid="b") == [True]
    assert roles(stream, [frame(0)], vid="a") == [False]
    stream.reset()
    assert roles(stream, [frame(1)], vid="b") == [False]


# ---------------------------------------------------------------------------- the config's bounds
@pytest.mark.parametrize("spec,ok", [("refresh=1", True), ("refresh=0", False), ("cut=1", True), ("cut=0", False),
                                     ("cut=0.0001", True), ("cut=1.0001", False)])
def test_config_bounds(spec, ok):
    assert not ReuseConfig(threshold=0.05, refresh=1).enabled and not ReuseConfig(threshold=0.0, refresh=16).enabled
    assert ReuseConfig(threshold=0.05, refresh=2).enabled
    if ok:
        ReuseConfig.parse("threshold=0.05," + spec)
    else:
        with pytest.raises(ConfigError):
            ReuseConfig.parse("threshold=0.05," + spec)
