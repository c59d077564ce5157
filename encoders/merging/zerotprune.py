"""Zero-TPrune (Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of
the Attention Graph in Pre-Trained Transformers", arXiv 2305.17328), written from the paper.

Two stages, both training-free:

* **I-stage, importance.** The attention matrix is the adjacency matrix of a weighted directed
  graph (query i sends weight ``A[i, j]`` to key j). A token is important when important tokens
  attend to it, so the importance vector is the stationary distribution of that graph, found
  by a few power iterations ``s <- A^T s`` from the uniform vector (their Weighted PageRank).
  Each head is ranked separately and the head scores are averaged.
* **S-stage, similarity.** Tokens are ranked by importance; the less important part forms the
  source group A, the more important part the target group B. Each A token's most similar B
  token (cosine of the metric) is its partner, and the r A tokens with the most similar partners
  are removed: merged into the partner (default; size-weighted, sizes summed) or dropped
  (``prune=True``, the paper's pruning).

A is the less important half of the unprotected tokens, or the r least important ones when r
is larger (the excess is decided by importance alone, as the paper's I-stage would).
Left out: the paper's Emphasizing-Informative-Region and Variance-based-Head-Filter refinements
of the head aggregation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher, padding_mask
from mergeseek.encoders.merging.importance import assignment_from_keep
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.errors import ConfigError


def weighted_pagerank(attn: torch.Tensor, iters: int = 5, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Importance of every token: ``iters`` power iterations of ``s <- A^T s`` per head, averaged.

    Args:
        attn: [B, H, N, N] row-stochastic attention probabilities (row = query).
        iters: power iterations; the result approaches the graph's stationary distribution.
        real: [B, N] non-padding mask; padding starts with (and, attended by nobody, keeps)
            score 0, so its own attention rows carry no weight.

    Returns:
        [B, N] float32 scores; each image's scores sum to 1.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"weighted_pagerank needs the full attention [B, H, N, N]; got shape {tuple(attn.shape)}")
    batch, heads, n, _ = attn.shape
    a = attn.float()
    if real is None:
        s = a.new_full((batch, heads, n), 1.0 / n)
    else:
        w = real.float()
        s = (w / w.sum(dim=1, keepdim=True)).unsqueeze(1).expand(batch, heads, n).contiguous()
    for _ in range(iters):
        s = torch.einsum("bhi,bhij->bhj", s, a)  # s_j <- sum_i s_i A[i, j]
        # Rows sum to 1, so the mass is preserved in exact arithmetic; renormalizing only keeps
        # rounding (and fp16 attention) from drifting.
        s = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return s.mean(dim=1)


def importance_partition(
    importance: torch.Tensor, r: int, protected: int, real: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(source, target) masks [B, N]: the less important unprotected tokens and the rest."""
    batch, n = importance.shape
    s = importance.float().clone()
    free = torch.ones(batch, n, dtype=torch.bool, device=importance.device)
    if protected:
        free[:, :protected] = False
    if real is not None:
        free &= real
    s = s.masked_fill(~free, float("inf"))  # protected / padding sort first and are never sources
    order = torch.sort(s, dim=1, stable=True).indices  # ascending importance
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    n_free = free.sum(dim=1, keepdim=True)
    # Half of the free tokens, or r of them when r is larger; B keeps at least one.
    n_src = torch.maximum(n_free // 2, (n_free - 1).clamp(min=0, max=r))
    source = rank < n_src  # the n_src least important free tokens (free tokens sort first)
    source &= free
    target = free & ~source
    return source, target


@torch.no_grad()
@matcher
def zerotprune_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor],
                       padded: Optional[bool], attn: Optional[torch.Tensor], iters: int = 5, prune: bool = False,
                       **_: object) -> MergeResult:
    """Remove r tokens: PageRank importance picks the candidates, similarity picks the r removed.

    Called as every matcher (``core.matcher``): ``metric`` [B, N, C] similarity features
    (head-averaged keys); ``r`` tokens to remove (clamped so that one unprotected token stays);
    ``class_token`` / ``protected`` the leading tokens never removed and never a destination;
    ``size`` [B, N, 1] token sizes, size-0 rows are padding, never removed or chosen; ``attn`` the
    attention probabilities [B, H, N, N] of this layer.

    Args:
        iters: Weighted-PageRank power iterations.
        prune: drop the removed tokens instead of merging them into their partners.

    Returns:
        ``MergeResult`` whose ``importance`` holds the [B, N] PageRank scores.
    """
    batch, n, _ = metric.shape
    r = min(r, n - keep_first - 1)
    if r <= 0:
        return identity_merge(n)
    if attn is None or attn.dim() != 4 or attn.shape[-2] != n:
        raise ConfigError("method=zerotprune needs the full attention matrix (its MatcherSpec needs='attn'); "
                          "run it through encoders.apply_merging, which provides it")
    if iters < 1:
        raise ConfigError(f"merge iters={iters} is not valid; it must be >= 1")
    real = padding_mask(size, padded)
    importance = weighted_pagerank(attn, iters, real)
    source, target = importance_partition(importance, r, keep_first, real)

    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (unit @ unit.transpose(-1, -2)).float()
    sim.masked_fill_(~target[:, None, :], NEG_INF)
    best, partner = sim.max(dim=-1)  # [B, N]
    best = best.masked_fill(~source, NEG_INF)
    # Stable: equal similarities go to the earlier token.
    order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]
    removed = torch.zeros(batch, n, dtype=torch.bool, device=metric.device)
    removed.scatter_(1, order, best.gather(1, order) > NEG_INF)
    keep = ~removed if real is None else (~removed & real)
    dest = torch.full_like(partner, -1) if prune else partner
    result = assignment_from_keep(keep, dest, real, width=None if real is not None else n - r, drops=prune)
    result.importance = importance
    return result
