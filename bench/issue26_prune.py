"""Issue #26, seventh round: pruning instead of averaging where averaging hurts, and a centred
metric, screened on top of ``pairs`` (no registered method unless one wins).

Each variant keeps ``pairs``' r per block (so the token counts and block FLOPs of ``pairs`` and
``bipartite``) and changes one thing:

- ``early=K``: in the first K blocks a pair keeps its earlier token's value instead of the average
  (ToFu prunes in the early blocks, where averaging inputs is furthest from averaging outputs);
  sizes still add up.
- ``medoid=F``: in the blocks that remove at least a share F of their free tokens, a pair keeps
  the value of the member the class token attends to more (the other is pruned); sizes add up.
- ``prune=F``: in those blocks the r free tokens the class token attends to least are the ones
  removed (PPT prunes inattentive tokens in the deep blocks); each gives its size to its most
  similar kept token and nothing of its value (``prunemerge=F``: it is averaged in instead).
- ``center``: the cosine is taken on keys minus their mean over the image's free tokens (the
  keys share a large common part, which makes every cosine high).
- ``cands=K``: each token lists its K most similar tokens as candidate edges instead of 16 (in
  the last blocks, where r is half the free tokens, 16 can run out and the fallback pairs by
  position).
- ``agglo=W``: no pairs limit: r steps of agglomerative clustering with average linkage (the two
  most similar clusters join; the joined cluster's similarity to each other is the weighted mean
  of its parts', Lance-Williams), each cluster then one size-weighted token. ``W=0`` weighs a
  cluster by its tokens in this block, ``W=1`` by the patches they stand for; ``agglo=-1`` is
  complete linkage (the smaller of the two similarities).

Screened on half A of the CIFAR-10 test set with the fourth round's harness, paired with its
saved ``pairs`` predictions (docs/BENCHMARKS.md, issue #26, seventh round):

    python -m mergeseek.bench.issue26_prune score --variant early=2 "method=p7,r=16"
    python -m mergeseek.bench.issue26_prune table
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher
from mergeseek.encoders.merging.energy import pair_merge
from mergeseek.encoders.merging.pairs import PAIR_CANDIDATES, candidate_edges, greedy_pairs, prepare_pairs
from mergeseek.encoders.merging.registry import MergeResult

VARIANTS = ("base", "early", "medoid", "prune", "prunemerge", "center", "cands", "agglo")

_variant = {"kind": "base", "value": 0.0}
_first = {"n": 0}  # token count at the first merging block of the running forward


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Select the variant ``method=p7`` runs while in the block (``kind=value`` or ``kind``)."""
    kind, _, value = name.partition("=")
    if kind not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} (with =value)")
    saved = dict(_variant)
    _variant.update(kind=kind, value=float(value or 0))
    try:
        yield
    finally:
        _variant.update(saved)


def _keep_dst_weight(src: torch.Tensor, size: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Averaging weights that give every source weight 0 (its partner keeps its own value)."""
    w = torch.ones_like(like[..., :1]) if size is None else size.clone()
    return w.scatter(1, src[..., None], 0.0)


def _class_attention(attn: torch.Tensor) -> torch.Tensor:
    """[B, N] the class token's attention to each token, averaged over heads."""
    return attn[:, :, 0].mean(dim=1)


@torch.no_grad()
@matcher
def p7_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
               padded: Optional[bool] = None, attn: Optional[torch.Tensor] = None, **_: object) -> MergeResult:
    """``pairs`` with the selected variant (module doc); ``attn`` is the class token's row."""
    n = metric.shape[1]
    if size is None:
        _first["n"] = n
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "p7")
    if r <= 0:
        return identity_merge(n)
    kind, value = _variant["kind"], _variant["value"]
    block = round((_first["n"] - n) / r) if _first["n"] else 0  # exact for a constant r
    share = r / (n - keep_first)
    if kind == "center":
        free = unit[:, keep_first:]
        centred = torch.cat([unit[:, :keep_first], free - free.mean(dim=1, keepdim=True)], dim=1)
        unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if kind in ("prune", "prunemerge") and share >= value:
        score = _class_attention(attn).clone()
        score[:, :keep_first] = float("inf")
        src = score.topk(r, dim=1, largest=False).indices  # [B, r] least attended free tokens
        sim = unit @ unit.transpose(-1, -2)
        gone = torch.zeros(sim.shape[:2], dtype=torch.bool, device=sim.device).scatter_(1, src, True)
        gone[:, :keep_first] = True
        sim = sim.masked_fill(gone[:, None, :], NEG_INF)
        dst = sim.gather(1, src[..., None].expand(-1, -1, n)).argmax(dim=-1)  # most similar kept token
        out = pair_merge(src, dst, n)
        if kind == "prune":
            out.weight = _keep_dst_weight(src, size, metric)
        return out
    if kind == "agglo":
        return _agglomerate(unit, r, keep_first, size, value)
    edges = candidate_edges(unit, keep_first, int(value) if kind == "cands" else PAIR_CANDIDATES)
    src, dst, fallback = greedy_pairs(*edges, r, n, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    if kind == "early" and block < value:
        out.weight = _keep_dst_weight(src, size, metric)
    elif kind == "medoid" and share >= value:
        a = _class_attention(attn)
        loser = torch.where(a.gather(1, src) >= a.gather(1, dst), dst, src)
        winner = torch.where(loser == src, dst, src)
        out = pair_merge(loser, winner, n)
        out.weight = _keep_dst_weight(loser, size, metric)
    return out


def _agglomerate(unit: torch.Tensor, r: int, keep_first: int, size: Optional[torch.Tensor],
                 linkage: float) -> MergeResult:
    """r agglomerative steps over the free tokens (``agglo`` in the module doc)."""
    from mergeseek.encoders.merging.importance import assignment_from_keep

    batch, n, _ = unit.shape
    dev = unit.device
    sim = (unit @ unit.transpose(-1, -2)).float()
    sim.diagonal(dim1=-2, dim2=-1).fill_(NEG_INF)
    sim[:, :keep_first] = NEG_INF
    sim[:, :, :keep_first] = NEG_INF
    if linkage > 0 and size is not None:
        w = size[..., 0].float().clone()
    else:
        w = torch.ones(batch, n, device=dev)
    label = torch.arange(n, device=dev).expand(batch, n).clone()
    rows = torch.arange(batch, device=dev)
    for _ in range(r):
        best = sim.view(batch, -1).argmax(dim=1)
        a, b = best // n, best % n
        keep, gone = torch.minimum(a, b), torch.maximum(a, b)
        sk, sg = sim[rows, keep], sim[rows, gone]  # [B, N]
        wk, wg = w[rows, keep][:, None], w[rows, gone][:, None]
        joined = torch.minimum(sk, sg) if linkage < 0 else (wk * sk + wg * sg) / (wk + wg)
        joined = torch.where((sk == NEG_INF) | (sg == NEG_INF), torch.full_like(joined, NEG_INF), joined)
        sim[rows, keep] = joined
        sim[rows, :, keep] = joined
        sim[rows, keep, keep] = NEG_INF
        sim[rows, gone] = NEG_INF
        sim[rows, :, gone] = NEG_INF
        w[rows, keep] = (wk + wg)[:, 0]
        label = torch.where(label == gone[:, None], keep[:, None], label)
    keep_mask = label == torch.arange(n, device=dev)
    return assignment_from_keep(keep_mask, label, None, width=n - r)


def register() -> None:
    from mergeseek.encoders.merging.registry import MatcherSpec, register as add

    add(MatcherSpec("p7", p7_merging, needs="cls_attn", doc="issue #26 seventh-round screening (bench only)"))


def main() -> None:
    from mergeseek.bench.issue26_schedule import screening_main

    screening_main(__doc__, variant, "early=K, medoid=F, prune=F, prunemerge=F, center, cands=K, agglo=W or base", "method=p7,r=16", register)


if __name__ == "__main__":
    main()
