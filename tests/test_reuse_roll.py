"""Rolling caches (``roll=k``, encoders/reuse/, docs/REUSE.md) against a naive per-token statement
of the rule, written here from the docs with the timm modules themselves, token by token:

- after a reference, the dependants of a shot form groups of ``k``; every dependant of a group is
  compared with the caches of its base: the reference for the first group, else the caches the
  previous group's last frame left;
- those caches are, per token and gate, the values of the frame that last recomputed that token
  (its block input and q/k/v row, its post-attention row and MLP row, its hash code), and the
  attention and out-projection of the last frame whose attention was recomputed;
- a token's q/k/v row is recomputed when (block 0) its patch's estimated angle to the cached code
  is >= threshold, (later blocks) its block input's relative L2 change to the cached input is
  >= threshold; attention and the out-projection of every token when any q/k/v row of the frame
  was; the MLP row when the post-attention row moved by >= threshold; the class token at a gate
  whenever any other token of the frame is;
- the result does not depend on how the frames are batched.

A tiny timm ViT (64 px, 16 patches, random weights) keeps the file fast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from mergeseek.encoders.reuse import ReuseConfig, ReuseStream
from mergeseek.errors import ConfigError

SIDE, PATCH = 64, 16


@pytest.fixture(scope="module")
def tiny_vit(one_torch_thread):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, num_classes=0).eval()


def drifting_frames(n: int, seed: int = 0) -> torch.Tensor:
    """A scene whose frames drift: every frame adds small noise everywhere and moves two patches a
    little more, so some tokens cross the threshold and others stay under it for several frames."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, SIDE, SIDE, generator=g)
    frames, cur = [], base.clone()
    for t in range(n):
        cur = cur + 0.03 * torch.randn(cur.shape, generator=g)
        p = (3 * t) % 16
        r, c = divmod(p, 4)
        cur[..., r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] += 0.6 * torch.randn(1, 3, PATCH, PATCH, generator=g)
        frames.append(cur.clone())
    return torch.cat(frames)


# ---------------------------------------------------------------------------- the naive statement
def _rel(new, old, threshold=None) -> bool:
    return float((new - old).norm() / old.norm().clamp_min(1e-6)) >= (THRESHOLD if threshold is None else threshold)


THRESHOLD, BITS = 0.1, 64


def _attention(b, qkv):
    n, heads = qkv.shape[0], b.attn.num_heads
    q, k, v = qkv.reshape(n, 3, heads, -1).permute(1, 2, 0, 3).unbind(0)
    out = scaled_dot_product_attention(b.attn.q_norm(q), b.attn.k_norm(k), v, scale=b.attn.scale)
    return out.transpose(0, 1).reshape(n, -1)


def _full(model, planes, px):
    """A reference: every value computed, its caches."""
    patches = model.patch_embed(px)
    x = model.norm_pre(model._pos_embed(patches))[0]
    blocks = []
    for b in model.blocks:
        qkv = b.attn.qkv(b.norm1(x))
        a = _attention(b, qkv)
        p = b.ls1(b.attn.proj(a))
        y = x + p
        m = b.ls2(b.mlp(b.norm2(y)))
        blocks.append({"x": x, "qkv": qkv, "a": a, "p": p, "y": y, "m": m})
        x = y + m
    codes = (patches[0] @ planes > 0).numpy()
    return {"codes": codes, "blocks": blocks, "out": model.forward_head(model.norm(x[None]))[0]}, 0


def _dependant(model, planes, px, base, query: float = 0.0):
    """A frame against the caches ``base``, token by token: (output, the caches it leaves, rows
    of q/k/v recomputed). ``query`` > 0: the query gate (tests/test_reuse_query.py): attention and
    the out-projection only for the tokens whose q/k/v row was recomputed or whose block input
    moved by ``query``, the others keep their cached rows."""
    patches = model.patch_embed(px)
    codes = (patches[0] @ planes > 0).numpy()
    x = model.norm_pre(model._pos_embed(patches))[0]
    n = x.shape[0]
    changed = [bool((codes[t] != base["codes"][t]).sum() * math.pi / BITS >= THRESHOLD) for t in range(n - 1)]
    new_codes = np.stack([codes[t] if changed[t] else base["codes"][t] for t in range(n - 1)])
    blocks, touched, qkv_rows = [], False, 0
    for bi, b in enumerate(model.blocks):
        c = base["blocks"][bi]
        act = [False] + changed if bi == 0 else [_rel(x[t], c["x"][t]) for t in range(n)]
        act[0] = act[0] or any(act[1:])
        qkv = torch.stack([b.attn.qkv(b.norm1(x[t])) if act[t] else c["qkv"][t] for t in range(n)])
        xs = torch.stack([x[t] if act[t] else c["x"][t] for t in range(n)])
        if query > 0:
            qact = [act[t] or (query < THRESHOLD and _rel(x[t], c["x"][t], query)) for t in range(n)]
            qact[0] = qact[0] or any(qact[1:])
            full = _attention(b, qkv)  # only the rows of qact are kept
            a = torch.stack([full[t] if qact[t] else c["a"][t] for t in range(n)])
            p = torch.stack([b.ls1(b.attn.proj(a[t])) if qact[t] else c["p"][t] for t in range(n)])
            touched = touched or any(qact)
        elif any(act):
            a = _attention(b, qkv)
            p = torch.stack([b.ls1(b.attn.proj(a[t])) for t in range(n)])
        else:
            a, p = c["a"], c["p"]
        y = x + p
        act2 = [_rel(y[t], c["y"][t]) for t in range(n)]
        act2[0] = act2[0] or any(act2[1:])
        m = torch.stack([b.ls2(b.mlp(b.norm2(y[t]))) if act2[t] else c["m"][t] for t in range(n)])
        ys = torch.stack([y[t] if act2[t] else c["y"][t] for t in range(n)])
        blocks.append({"x": xs, "qkv": qkv, "a": a, "p": p, "y": ys, "m": m})
        touched = touched or any(act) or any(act2)
        qkv_rows += sum(act)
        x = y + m
    out = model.forward_head(model.norm(x[None]))[0] if touched else base["out"]
    return out, {"codes": new_codes, "blocks": blocks, "out": out}, qkv_rows


def naive_rolling(model, planes, frames, k: int, refresh: int, query: float = 0.0):
    """Outputs [T, D] of one video's frames under rolling caches (``k`` >= the frames: every
    dependant against its reference, as ``roll=0``), and the q/k/v rows recomputed by the
    dependants (the reference frames compute every row)."""
    outs, base = [], None
    newest, since, dep_rows = None, 0, 0
    with torch.inference_mode():
        for t in range(len(frames)):
            px = frames[t : t + 1]
            if base is None or since + 1 >= refresh:
                base, since = _full(model, planes, px)
                newest = base
                outs.append(base["out"])
                continue
            if since > 0 and since % k == 0:  # a new group: its base is what the last frame left
                base = newest
            since += 1
            out, newest, rows = _dependant(model, planes, px, base, query)
            dep_rows += rows
            outs.append(out)
    return torch.stack(outs), dep_rows


def stream_outputs(stream, frames, batch: int, vid="v"):
    with torch.inference_mode():
        return torch.cat([stream.encode(frames[s : s + batch], [vid] * len(frames[s : s + batch]))
                          for s in range(0, len(frames), batch)])


# ---------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 4, 20])
def test_rolling_caches_equal_the_naive_per_token_rule_however_frames_are_batched(tiny_vit, k, batch):
    frames = drifting_frames(14)
    cfg = ReuseConfig(threshold=THRESHOLD, refresh=12, cut=1.0, roll=k, bits=BITS)
    stream = ReuseStream(tiny_vit, cfg, "none")
    got = stream_outputs(stream, frames, batch)
    want, dep_rows = naive_rolling(tiny_vit, stream.planes, frames, k, refresh=12)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    n = (SIDE // PATCH) ** 2 + 1
    blocks = len(tiny_vit.blocks)
    refs = stream.stats.references
    assert refs == 2  # frame 0 and the refresh at frame 12
    qkv_done = sum(c[0] for c in stream.stats.computed)
    assert qkv_done == refs * n * blocks + dep_rows
    # the gates were partial: neither nothing nor everything of the dependants was recomputed
    assert 0 < dep_rows < (len(frames) - refs) * n * blocks


def test_rolling_differs_from_comparing_with_the_reference_and_reuses_more_on_drift(tiny_vit):
    """The scene drifts away from its reference: compared with it, ever more tokens cross the
    threshold; compared with the last computed values, fewer do."""
    frames = drifting_frames(12)
    done = {}
    for roll in (0, 1):
        stream = ReuseStream(tiny_vit, ReuseConfig(threshold=THRESHOLD, refresh=100, cut=1.0, roll=roll, bits=BITS), "none")
        stream_outputs(stream, frames, 12)
        done[roll] = stream.stats.reuse_rate
    assert done[1] > done[0]


def test_rolling_caches_of_two_videos_in_one_batch_stay_apart(tiny_vit):
    a, b = drifting_frames(8, seed=1), drifting_frames(8, seed=2)
    cfg = ReuseConfig(threshold=THRESHOLD, refresh=100, cut=1.0, roll=2, bits=BITS)
    alone = [stream_outputs(ReuseStream(tiny_vit, cfg, "none"), f, 8) for f in (a, b)]
    mixed = ReuseStream(tiny_vit, cfg, "none")
    inter = torch.stack([a, b], dim=1).reshape(16, *a.shape[1:])  # a0 b0 a1 b1 ...
    with torch.inference_mode():
        out = torch.cat([mixed.encode(inter[s : s + 6], ["a", "b"] * 3 if s < 12 else ["a", "b"] * 2) for s in range(0, 16, 6)])
    assert torch.allclose(out[0::2], alone[0], atol=1e-5) and torch.allclose(out[1::2], alone[1], atol=1e-5)


@pytest.mark.parametrize("query", [0.0, 0.04, THRESHOLD])  # the query gate (tests/test_reuse_query.py) too
def test_rolling_identical_frames_compute_no_row_after_the_reference(tiny_vit, query):
    frames = drifting_frames(1).expand(6, -1, -1, -1).contiguous()
    stream = ReuseStream(tiny_vit, ReuseConfig(threshold=THRESHOLD, refresh=100, roll=2, query=query), "none")
    out = stream_outputs(stream, frames, 4)
    n = (SIDE // PATCH) ** 2 + 1
    assert stream.stats.computed == [[n] * 3] * len(tiny_vit.blocks)
    assert torch.equal(out, out[:1].expand_as(out))


@pytest.mark.parametrize("spec", ["threshold=0,roll=1", "threshold=0.1,refresh=1,roll=3",
                                  "threshold=0,query=0.1", "threshold=0.1,refresh=1,roll=3,query=0.05"])
def test_rolling_without_reuse_equals_per_frame_encoding(tiny_vit, spec):
    frames = drifting_frames(5)
    with torch.inference_mode():
        want = tiny_vit(frames)
    got = stream_outputs(ReuseStream(tiny_vit, spec, "none"), frames, 3)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_batch_of_rolling_dependants_reads_the_device_once_per_gate_per_pass(tiny_vit):
    """roll=k: a pass holds k dependants of a video, so a batch of F of them runs ceil(F / k)
    passes, each reading the device once per gate after block 0's (2 per block minus one)."""
    from test_compile import PyRecorder

    frames = drifting_frames(9)
    blocks = len(tiny_vit.blocks)
    for k, passes in ((1, 8), (3, 3), (8, 1)):
        stream = ReuseStream(tiny_vit, ReuseConfig(threshold=THRESHOLD, refresh=100, cut=1.0, roll=k, bits=BITS), "none")
        with torch.inference_mode():
            stream.encode(frames[:1], ["v"])
            py = PyRecorder()
            with py:
                stream.encode(frames[1:], ["v"] * 8)
        assert py.calls.get("tolist", 0) == passes * (2 * blocks - 1)


@pytest.mark.parametrize("spec,ok", [("roll=0", True), ("roll=4", True), ("roll=-1", False), ("roll=x", False),
                                     ("roll=2000000", False)])
def test_roll_config(spec, ok):
    if ok:
        cfg = ReuseConfig.parse("threshold=0.1," + spec)
        assert ReuseConfig.parse(str(cfg)) == cfg
    else:
        with pytest.raises(ConfigError, match="roll"):
            ReuseConfig.parse("threshold=0.1," + spec)
