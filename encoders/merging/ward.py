"""Pairs by Ward's merge cost (``method=ward``, ``method=ward_lsh``; issue #26, ninth round).

``method=pairs`` joins disjoint pairs of tokens greedily, best edge first, scoring an edge by the
cosine of the two tokens' head-averaged keys. This rule keeps that greedy one-to-one step and
scores an edge by what averaging the two tokens throws away instead: Ward's cost

    cost(a, b) = s_a * s_b / (s_a + s_b) * ||x_a - x_b||^2

on the block's tokens ``x`` (the residual stream after the attention branch, the rows that are
averaged), with ``s`` the token sizes. It is the increase of the squared error between every
patch and the token that stands for it when ``a`` and ``b`` become one size-weighted token, so it
prefers merging small tokens and tokens with close values *and* norms (the cosine of the keys
sees neither). The cheapest edges merge first (the edge score is ``-cost``); each token lists
its ``PAIR_CANDIDATES`` cheapest partners as candidate edges, as for ``pairs``.

``ward_lsh`` is the hashed variant: the candidate edges are ``pairs_lsh``'s (SimHash-sorted
windows over the unit keys), each scored by the same cost; edges between different buckets rank
below every same-bucket edge. Up to ``GRAM_UP_TO`` free tokens the window costs are read off one
Gram product of the tokens (one BLAS call is cheaper there than the windows' elementwise
products); above it they are computed window by window, with no N x N matrix.

``ward_imp`` (and ``ward_imp_lsh``) put weighted sizes into the cost, ``s (1 + 2 N c)`` with ``c``
the class token's attention to the token (heads averaged), so tokens the class token reads merge
later; the merge still averages by the true sizes (issue #26, tenth round: the most accurate rule
at -50% FLOPs on both references, +0.75 / +0.59 points over bipartite; docs/BENCHMARKS.md).

``ward`` measured on the CIFAR-10 references (docs/BENCHMARKS.md, issue #26, ninth round; all 10,000 test
images): +0.54 ± 0.23 points above bipartite at r=16 on the 145-token reference (chosen on half A;
half B alone +0.46 ± 0.32), +0.33 ± 0.18 at r=20 on the 197-token one. The cost without the
sizes, or on the keys instead of the tokens, did not beat ``pairs``.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher
from mergeseek.encoders.merging.energy import pair_merge
from mergeseek.encoders.merging.pairs import (greedy_pairs, matrix_pairs, prepare_pairs, window_dots,
                                             window_ends, window_order, window_span)
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.errors import ConfigError


GRAM_UP_TO = 1024  # ward_lsh: up to this many free tokens a block's window costs come from the Gram matrix


def _tokens_of(tokens: Optional[torch.Tensor], metric: torch.Tensor, method: str) -> torch.Tensor:
    if tokens is None or tokens.shape[:2] != metric.shape[:2]:
        raise ConfigError(f"method={method} scores pairs on the block's tokens; call it through a patched model "
                          "(apply_merging), which hands them over, or pass tokens=[B, N, C]")
    return tokens


def ward_scores(tokens: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, N, N] ``-cost(a, b)`` (module doc) in float32; ``size`` [B, N, 1] or None (all ones).

    ``s_a s_b / (s_a + s_b) = 1 / (1 / s_a + 1 / s_b)``, and ``||x_a - x_b||^2`` is one fused
    product-and-add (``baddbmm``): three passes over the N x N matrix besides the product."""
    x = tokens.float()
    sq = (x * x).sum(dim=-1)
    d2 = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(-1, -2), alpha=-2.0)
    if size is None:
        return d2.mul_(-0.5)
    inv = size[..., 0].float().reciprocal()
    return d2.div_(inv[:, :, None] + inv[:, None, :]).neg_()


def window_ward_scores(tokens: torch.Tensor, size: Optional[torch.Tensor], perm: torch.Tensor, keep_first: int,
                       window: int) -> torch.Tensor:
    """[B, E] ``-cost`` of the windows' edges in ``pairs.window_ends``' order (table, sorted place, offset):
    each free token against the ``window // 2`` tokens after it in each table's sort ``perm``
    [B, F, T] (past the end: a finite placeholder the caller masks); from the Gram matrix up to
    ``GRAM_UP_TO`` free tokens, window by window (``pairs.window_dots``) above."""
    x = tokens[:, keep_first:].float()
    batch, free, _ = x.shape
    span, later, _ = window_span(free, window, x.device)
    place = perm.transpose(1, 2)  # [B, T, F]
    sq = (x * x).sum(dim=-1)
    s = torch.ones_like(sq) if size is None else size[:, keep_first:, 0].float()
    sqs, ss = sq.gather(1, place.reshape(batch, -1)).view_as(place), s.gather(1, place.reshape(batch, -1)).view_as(place)
    if free <= GRAM_UP_TO:  # one product (BLAS) and a gather beat the windows' elementwise products here
        pairs_at = place[..., None] * free + place[..., later]  # [B, T, F, span] flat (a, b)
        dots = (x @ x.transpose(-1, -2)).view(batch, -1).gather(1, pairs_at.reshape(batch, -1)).view_as(pairs_at)
    else:
        dots = window_dots(x, perm, span)
    d2 = (sqs[..., None] + sqs[..., later] - 2 * dots).clamp_min(0)
    sb = ss[..., later]
    return (-(ss[..., None] * sb) / (ss[..., None] + sb) * d2).reshape(batch, -1)


@torch.no_grad()
@matcher
def ward_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                 padded: Optional[bool] = None, tokens: Optional[torch.Tensor] = None, **_: object) -> MergeResult:
    """Merge r disjoint pairs, the cheapest by Ward's cost first (module doc).

    Called as every matcher (``core.matcher``) plus ``tokens`` [B, N, C], the block's tokens
    (the patched blocks hand them over: ``MatcherSpec.tokens``); ``r`` is clamped to half of the
    unprotected tokens; inputs with padding are refused, as for ``pairs``.
    """
    n = metric.shape[1]
    x = _tokens_of(tokens, metric, "ward")
    r, _ = prepare_pairs(metric, r, keep_first, size, padded, "ward", unit=False)
    if r <= 0:
        return identity_merge(n)
    src, dst, fallback = matrix_pairs(ward_scores(x, size), r, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out


def _hashed(metric: torch.Tensor, unit: torch.Tensor, r: int, keep_first: int, x: torch.Tensor,
            cost_size: Optional[torch.Tensor],
            planes: Optional[torch.Tensor], lsh_bits: int, lsh_tables: int, lsh_window: int, seed: int) -> MergeResult:
    """``ward_lsh``'s rule (module doc) with the cost's sizes ``cost_size`` [B, N, 1] or None;
    ``unit`` the unit metric and ``r`` clamped and positive (``prepare_pairs``)."""
    from mergeseek.encoders.merging.lsh import cached_planes

    n, dim = metric.shape[1], metric.shape[2]
    if planes is None:
        planes = cached_planes(dim, lsh_bits, lsh_tables, seed, str(metric.device))
    code, perm = window_order(unit, planes, lsh_bits, lsh_tables, keep_first)
    span, later, past = window_span(n - keep_first, lsh_window, metric.device)
    first, second, same = window_ends(code, perm, later, keep_first)
    cost = window_ward_scores(x, cost_size, perm, keep_first, lsh_window)
    # same-bucket edges first: a cross-bucket edge drops below the image's most costly edge; edges
    # past the end of a window stay -inf
    floor = cost.amin(dim=1, keepdim=True) - 1.0
    score = torch.where(same, cost, floor + cost - cost.amax(dim=1, keepdim=True))
    score = score.unflatten(1, (lsh_tables, -1, span)).masked_fill(past, NEG_INF).flatten(1)
    src, dst, fallback = greedy_pairs(score, first, second, r, n, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out


@torch.no_grad()
@matcher
def ward_lsh_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                     padded: Optional[bool] = None, tokens: Optional[torch.Tensor] = None,
                     planes: Optional[torch.Tensor] = None, lsh_bits: int = 4, lsh_tables: int = 4,
                     lsh_window: int = 16, seed: int = 0, **_: object) -> MergeResult:
    """The hashed rule (module doc): ``pairs_lsh``'s candidate edges, scored by Ward's cost.

    ``planes`` and the ``lsh_*`` options as for ``method=pairs_lsh``.
    """
    n = metric.shape[1]
    x = _tokens_of(tokens, metric, "ward_lsh")
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "ward_lsh")
    if r <= 0:
        return identity_merge(n)
    return _hashed(metric, unit, r, keep_first, x, size, planes, lsh_bits, lsh_tables, lsh_window, seed)


# ward_imp: A in s' = s (1 + A N c), chosen on the CIFAR-10 references (docs/BENCHMARKS.md, tenth round)
IMPORTANCE = 2.0


def importance_sizes(size: Optional[torch.Tensor], cls_attn: Optional[torch.Tensor], method: str,
                     weight: float = IMPORTANCE) -> torch.Tensor:
    """[B, N, 1] float32 the sizes ``ward_imp`` puts into Ward's cost: ``s (1 + weight N c)``, with
    ``c`` [B, N] the class token's attention to each token averaged over the heads
    (``cls_attn`` [B, H, 1, N], proportional-attention bias included) and N the tokens present, so
    ``N c`` is 1 for a token the class token attends to as much as to the average token."""
    if cls_attn is None or cls_attn.dim() != 4 or cls_attn.shape[2] != 1:
        raise ConfigError(f"method={method} weighs tokens by the class token's attention; call it through a "
                          "patched model (apply_merging), which hands it over, or pass attn=[B, H, 1, N]")
    n = cls_attn.shape[-1]
    c = cls_attn.float().mean(dim=1)[:, 0]  # [B, N]
    s = torch.ones_like(c) if size is None else size[..., 0].float()
    return (s * (1 + weight * n * c))[..., None]


@torch.no_grad()
@matcher
def ward_imp_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                     padded: Optional[bool] = None, tokens: Optional[torch.Tensor] = None,
                     attn: Optional[torch.Tensor] = None, importance: float = IMPORTANCE, **_: object) -> MergeResult:
    """``ward`` with each token's size in the cost weighted by how much the class token attends to it
    (``importance_sizes``): tokens the class token reads merge later. The merge itself averages by
    the true sizes. Called as every matcher plus ``tokens`` [B, N, C] and ``attn`` [B, H, 1, N]."""
    n = metric.shape[1]
    x = _tokens_of(tokens, metric, "ward_imp")
    r, _ = prepare_pairs(metric, r, keep_first, size, padded, "ward_imp", unit=False)
    if r <= 0:
        return identity_merge(n)
    weights = importance_sizes(size, attn, "ward_imp", importance)
    src, dst, fallback = matrix_pairs(ward_scores(x, weights), r, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out


@torch.no_grad()
@matcher
def ward_imp_lsh_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                         padded: Optional[bool] = None, tokens: Optional[torch.Tensor] = None,
                         attn: Optional[torch.Tensor] = None, planes: Optional[torch.Tensor] = None, lsh_bits: int = 4,
                         lsh_tables: int = 4, lsh_window: int = 16, seed: int = 0, importance: float = IMPORTANCE,
                         **_: object) -> MergeResult:
    """The hashed ``ward_imp``: ``ward_lsh``'s window edges scored with ``importance_sizes``."""
    n = metric.shape[1]
    x = _tokens_of(tokens, metric, "ward_imp_lsh")
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "ward_imp_lsh")
    if r <= 0:
        return identity_merge(n)
    weights = importance_sizes(size, attn, "ward_imp_lsh", importance)
    return _hashed(metric, unit, r, keep_first, x, weights, planes, lsh_bits, lsh_tables, lsh_window, seed)
