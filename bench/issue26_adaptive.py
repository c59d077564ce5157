"""Issue #26, eighth round: per-image adaptive merging with static widths (the issue's "per-image
adaptive r ... tokens beyond an image's budget carried as size-0 slots"), screened on top of
``pairs`` (no registered method unless it wins).

Every block keeps ``pairs``' output width ``W = N - r`` (so the token counts and block FLOPs of
``pairs`` and ``bipartite`` at the same r), but an image need not merge exactly r tokens there:

- it must merge at least ``max(0, n - W)`` of its ``n`` real tokens, so that they fit the width;
- it merges more while its best remaining pair is nearly identical (cosine of the keys >= ``tau``),
  ahead of the schedule; the slots it frees are carried as size-0 padding (hidden from attention by
  proportional attention's ``log 0``), and later blocks need merge fewer of its tokens.

So a redundant image spends its merges early on near-duplicates and keeps distinct tokens later,
while the others follow ToMe's schedule. At equal widths an image can only merge *ahead* of the
constant schedule, never behind it: whether that pays is what this measures.

    python -m mergeseek.bench.issue26_adaptive score --variant tau=0.95 "method=ada,r=16"
    python -m mergeseek.bench.issue26_adaptive table
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher
from mergeseek.encoders.merging.pairs import PAIR_CANDIDATES
from mergeseek.encoders.merging.registry import MergeResult


_tau = {"value": 2.0}  # > 1: never ahead of the schedule (exactly pairs' choice of pairs)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """``tau=T`` (merge ahead of the schedule while the best pair's cosine is >= T) or ``base``."""
    kind, _, value = name.partition("=")
    if kind not in ("tau", "base"):
        raise ValueError(f"unknown variant {name!r}; choose tau=T or base")
    saved = dict(_tau)
    _tau["value"] = float(value) if kind == "tau" else 2.0
    try:
        yield
    finally:
        _tau.update(saved)


def adaptive_pairs(unit: torch.Tensor, real: torch.Tensor, need: torch.Tensor, keep_first: int, tau: float,
                   candidates: int = PAIR_CANDIDATES):
    """Greedy one-to-one pairs per image over its real unprotected tokens: at least ``need[b]`` pairs,
    more while the best remaining pair scores >= ``tau``.

    Returns (src, dst, valid): [B, S] the later and earlier token of each step's pair and whether
    the step merged (S = the most pairs any image may take).
    """
    batch, n, _ = unit.shape
    dev = unit.device
    free = real.clone()
    free[:, :keep_first] = False
    sim = unit @ unit.transpose(-1, -2)
    sim = sim.masked_fill(~free[:, :, None] | ~free[:, None, :], NEG_INF)
    sim.diagonal(dim1=-2, dim2=-1).fill_(NEG_INF)
    score, nbr = sim.topk(min(candidates, n - 1), dim=-1)
    first = torch.arange(n, device=dev)[:, None].expand(n, nbr.shape[-1]).reshape(1, -1).expand(batch, -1)
    score, second = score.reshape(batch, -1), nbr.reshape(batch, -1)
    ends = torch.stack([first, second], dim=2)  # [B, E, 2]
    limit = (free.sum(dim=1) // 2)  # pairs an image can form
    steps = int(limit.max())
    used = torch.zeros(batch, n + 1, dtype=torch.bool, device=dev)
    used[:, :n] = ~free
    srcs, dsts, valids = [], [], []
    for t in range(steps):
        taken = used.gather(1, ends.view(batch, -1)).view_as(ends).any(dim=2)
        live = score.masked_fill(taken, NEG_INF)
        best, edge = live.max(dim=1)
        pair = ends.gather(1, edge[:, None, None].expand(batch, 1, 2))[:, 0]
        # no candidate edge left where a merge is needed: the two earliest unused free tokens (as pairs)
        spare = (torch.arange(n, device=dev) + used[:, :n].long() * n).sort(dim=1).values[:, :2]
        pair = torch.where((best == NEG_INF)[:, None], spare, pair)
        ok = ((t < need) | (best >= tau)) & (t < limit)
        pair = torch.where(ok[:, None], pair, torch.full_like(pair, n))
        used.scatter_(1, pair, True)
        srcs.append(pair.amax(dim=1))
        dsts.append(pair.amin(dim=1))
        valids.append(ok)
    if not srcs:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=dev)
        return empty, empty, empty.bool()
    return torch.stack(srcs, 1), torch.stack(dsts, 1), torch.stack(valids, 1)


@torch.no_grad()
@matcher
def ada_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                padded: Optional[bool] = None, **_: object) -> MergeResult:
    """Adaptive pairs with a static output width ``N - r`` (module doc)."""
    from mergeseek.encoders.merging.importance import assignment_from_keep

    batch, n, _ = metric.shape
    r = min(r, (n - keep_first) // 2)
    if r <= 0:
        return identity_merge(n)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    real = torch.ones(batch, n, dtype=torch.bool, device=metric.device) if size is None else size[..., 0] > 0
    width = n - r
    need = (real.sum(dim=1) - width).clamp(min=0)
    src, dst, valid = adaptive_pairs(unit, real, need, keep_first, _tau["value"])
    positions = torch.arange(n, device=metric.device).expand(batch, n)
    target = positions.clone()
    is_src = torch.zeros(batch, n + 1, dtype=torch.bool, device=metric.device)
    src_v = torch.where(valid, src, torch.full_like(src, n))
    is_src.scatter_(1, src_v, True)
    target = torch.cat([target, positions[:, :1]], dim=1).scatter(1, src_v, torch.where(valid, dst, 0))[:, :n]
    keep = real & ~is_src[:, :n]
    out = assignment_from_keep(keep, target, real, width=width)
    out.padded = True
    return out


def register() -> None:
    from mergeseek.encoders.merging.registry import MatcherSpec, register as add

    add(MatcherSpec("ada", ada_merging, doc="issue #26 eighth-round screening (bench only)"))


def main() -> None:
    from mergeseek.bench.issue26_schedule import screening_main

    screening_main(__doc__, variant, "tau=T or base", "method=ada,r=16", register)


if __name__ == "__main__":
    main()
