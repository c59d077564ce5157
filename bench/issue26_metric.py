"""Issue #26, ninth round: other edge scores for ``pairs``' greedy one-to-one rule, screened on top
of ``pairs`` (the screening method ``p9`` is registered only by this harness).

Each variant keeps ``pairs``' rule and r per block (so the token counts and block FLOPs of
``pairs`` and ``bipartite``): every free token lists its 16 best-scoring free partners, and r
times the best edge whose two tokens are both unused is taken. Only the edge score changes:

- ``base``: the cosine of ToMe's head-averaged keys (``pairs`` exactly);
- ``attncol``: the cosine of the two tokens' attention *columns* (how every query of every head
  attends to the token, heads concatenated: the tokens are interchangeable as keys);
- ``attnrow``: the cosine of their attention *rows* (each token's own attention distribution,
  heads concatenated: interchangeable as queries);
- ``mix=W``: ``W`` * key cosine + (1 - ``W``) * ``attncol`` cosine;
- ``ward``: ``-(s_a s_b / (s_a + s_b)) ||x_a - x_b||^2`` on the block's hidden states (after the
  attention branch, the rows the merge averages) and token sizes: Ward's merge cost, the squared
  error the size-weighted average introduces; unlike the cosine it sees the norms (shipped as
  ``method=ward``); ablations: ``wardns`` (no size factor), ``wardk`` (on the raw head-averaged
  keys), ``wardp=G`` (the harmonic size factor to the power G);
- ``spatial=L``: key cosine minus ``L`` * the Euclidean distance between the two tokens' centroids
  (patch units divided by the grid side); the centroids are carried through the merges with the
  same size-weighted average.

The attention is the block's own softmax (proportional-attention bias included; the method asks
for it with ``needs="attn"``). ``ward`` and ``spatial`` patch ``encoders.patch.common.merge_tokens``
while their variant is active: it hands the matcher the hidden states (``hidden``) or the centroids
(``pos``, [B, N, 2], kept on the forward's ``TokenState``) as options.

Screened on half A of the CIFAR-10 test set with the fourth round's harness, paired with its
saved ``pairs`` predictions (docs/BENCHMARKS.md, issue #26, ninth round):

    python -m mergeseek.bench.issue26_metric score --variant attncol "method=p9,r=16"
    python -m mergeseek.bench.issue26_metric table
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Optional

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher
from mergeseek.encoders.merging.energy import pair_merge
from mergeseek.encoders.merging.pairs import (PAIR_CANDIDATES, candidate_edges, greedy_pairs, matrix_edges,
                                             prepare_pairs)
from mergeseek.encoders.merging.registry import MergeResult

VARIANTS = ("base", "attncol", "attnrow", "mix", "ward", "wardns", "wardk", "wardp", "spatial")
PATCHING = ("ward", "wardns", "wardp", "spatial")  # variants that patch common.merge_tokens to hand the matcher more

_variant = {"kind": "base", "value": 0.0}


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def grid_positions(batch: int, n: int, keep_first: int, device=None) -> torch.Tensor:
    """[B, N, 2] (row, column) of every patch token divided by the grid side; the ``keep_first``
    leading (protected) tokens get (0, 0). Refuses a token count that is not a square grid."""
    side = math.isqrt(n - keep_first)
    if side * side != n - keep_first:
        raise ValueError(f"spatial: {n - keep_first} patch tokens are not a square grid")
    i = torch.arange(side * side, device=device)
    grid = torch.stack([i // side, i % side], dim=-1).float() / side
    pos = torch.cat([torch.zeros(keep_first, 2, device=device), grid])
    return pos.expand(batch, n, 2).contiguous()


def edge_scores(kind: str, value: float, unit: torch.Tensor, attn: Optional[torch.Tensor] = None,
                hidden: Optional[torch.Tensor] = None, size: Optional[torch.Tensor] = None,
                pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, N, N] the variant's edge score between every two tokens (higher merges first; the
    diagonal and the protected tokens are masked by the caller). ``unit``: the unit keys [B, N, C];
    ``attn`` [B, H, N, N] probabilities; ``hidden`` [B, N, C] and ``size`` [B, N, 1] (None: ones)
    for ``ward``; ``pos`` [B, N, 2] centroids for ``spatial``."""
    batch, n, _ = unit.shape
    if kind == "base":
        return unit @ unit.transpose(-1, -2)
    if kind in ("attncol", "attnrow", "mix"):
        if attn is None:
            raise ValueError(f"{kind} needs the attention probabilities (needs='attn')")
        a = attn.float()
        # columns: token j's entries attn[h, q, j] over (head, query); rows: attn[h, i, k] over (head, key)
        feats = a.permute(0, 3, 1, 2) if kind != "attnrow" else a.permute(0, 2, 1, 3)
        u = _unit(feats.reshape(batch, n, -1))
        cos = (u @ u.transpose(-1, -2)).to(unit.dtype)
        if kind == "mix":
            return value * (unit @ unit.transpose(-1, -2)) + (1 - value) * cos
        return cos
    if kind in ("ward", "wardns", "wardk", "wardp"):
        if hidden is None:
            raise ValueError(f"{kind} needs the hidden states (run inside variant('{kind}'))")
        x = hidden.float()
        sq = (x * x).sum(dim=-1)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2 * (x @ x.transpose(-1, -2))).clamp_min(0)
        s = torch.ones(batch, n, device=x.device) if size is None or kind == "wardns" else size[..., 0].float()
        harmonic = s[:, :, None] * s[:, None, :] / (s[:, :, None] + s[:, None, :])
        return (-(harmonic ** (value if kind == "wardp" else 1.0)) * d2).to(unit.dtype)  # wardp=G: its power
    if kind == "spatial":
        if pos is None:
            raise ValueError("spatial needs the token centroids (run inside variant('spatial=L'))")
        p = pos.float()
        dist = (p[:, :, None] - p[:, None, :]).pow(2).sum(dim=-1).sqrt()
        return unit @ unit.transpose(-1, -2) - (value * dist).to(unit.dtype)
    raise ValueError(f"unknown variant {kind!r}")


@torch.no_grad()
@matcher
def p9_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
               padded: Optional[bool] = None, attn: Optional[torch.Tensor] = None,
               hidden: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
               **_: object) -> MergeResult:
    """``pairs`` with the selected variant's edge score (module doc)."""
    n = metric.shape[1]
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "p9")
    if r <= 0:
        return identity_merge(n)
    kind, value = _variant["kind"], _variant["value"]
    if kind == "base":
        edges = candidate_edges(unit, keep_first, PAIR_CANDIDATES)
    else:
        hidden = metric if kind == "wardk" else hidden  # wardk: Ward's cost on the raw head-averaged keys
        sim = edge_scores(kind, value, unit, attn=attn, hidden=hidden, size=size, pos=pos)
        edges = matrix_edges(sim, keep_first, PAIR_CANDIDATES)
    src, dst, fallback = greedy_pairs(*edges, r, n, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out


def _patched_merge_tokens(saved, kind: str):
    """``common.merge_tokens`` that hands ``p9`` the hidden states (``ward``) or the centroids
    (``spatial``; merged with the tokens' size-weighted average and kept on the new state)."""
    from mergeseek.encoders.merging import merge_wavg

    def merge_tokens(x, state, metric, attn, r, plan):
        if r <= 0:
            return saved(x, state, metric, attn, r, plan)
        if kind in ("ward", "wardns", "wardp"):
            return saved(x, state, metric, attn, r, dataclasses.replace(plan, options=dict(plan.options, hidden=x)))
        pos = getattr(state, "p9_pos", None)
        if pos is None:
            pos = grid_positions(x.shape[0], x.shape[1], plan.protected, x.device)
        out, new_state, result = saved(x, state, metric, attn, r,
                                       dataclasses.replace(plan, options=dict(plan.options, pos=pos)))
        if isinstance(result, MergeResult) and not result.identity:
            new_state.p9_pos = merge_wavg(result, pos, state.size)[0]
        else:
            new_state.p9_pos = pos
        return out, new_state, result

    return merge_tokens


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Select the edge score ``method=p9`` uses while in the block (``kind=value`` or ``kind``);
    ``ward`` and ``spatial`` also patch ``encoders.patch.common.merge_tokens`` (restored on exit)."""
    from mergeseek.encoders.patch import common

    kind, _, value = name.partition("=")
    if kind not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} (with =value)")
    saved_variant, saved_merge = dict(_variant), common.merge_tokens
    _variant.update(kind=kind, value=float(value or 0))
    if kind in PATCHING:
        common.merge_tokens = _patched_merge_tokens(saved_merge, kind)
    try:
        yield
    finally:
        _variant.update(saved_variant)
        common.merge_tokens = saved_merge


def register() -> None:
    from mergeseek.encoders.merging.registry import MatcherSpec, register as add

    add(MatcherSpec("p9", p9_merging, needs="attn", doc="issue #26 ninth-round screening (bench only)"))


def main() -> None:
    from mergeseek.bench.issue26_schedule import screening_main

    screening_main(__doc__, variant, "attncol, attnrow, mix=W, ward, spatial=L or base", "method=p9,r=16", register)


if __name__ == "__main__":
    main()
