"""Importance-guided token merging (Bian et al., "Multi-Scale And Token Mergence: Make Your ViT
More Efficient", arXiv 2306.04897), training-free part, written from the paper.

At a merging layer the class token's attention, averaged over heads, scores every token. The
``N - r`` best-scored tokens are *important* and keep their slots; each of the other ``r`` tokens
is merged into its most similar important token (cosine of the metric), and the merged token is
the importance-weighted mean of its members (their eq. 4). Sizes are still summed, so
proportional attention and size-weighted pooling keep working. The paper's multi-scale branch
needs training and is left out.

Unlike ToMe's alternate A/B split, the split here is "kept vs. the rest", so this module also
holds the generalized assignment :func:`assignment_from_keep` ("each token keeps its own slot or
goes to the slot of a kept token, or is dropped"), which Zero-TPrune reuses.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher, merge_from_slots, padding_mask
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.errors import ConfigError, UnsupportedModelError

# Floor of the normalized importance used as an averaging weight: a token the class token ignores
# (softmax underflow) still counts a little, so a kept token never gets weight 0.
MIN_WEIGHT = 1e-4


def assignment_from_keep(
    keep: torch.Tensor,
    target: torch.Tensor,
    real: Optional[torch.Tensor] = None,
    width: Optional[int] = None,
    drops: bool = False,
) -> MergeResult:
    """``merge``/``unmerge`` closures for "kept tokens keep a slot, the others join a kept one".

    The output holds the kept tokens in their original order (so a class token at position 0
    stays first). Images that keep different numbers of tokens are padded to the widest one with
    size-0 slots (see :mod:`encoders.merging.core`).

    Args:
        keep: [B, N] bool, tokens that keep their own slot. Padding must not be kept.
        target: [B, N] long, for every token that is not kept: the position of the kept token it
            merges into, or -1 to drop it (pruning). Ignored where ``keep`` is true.
        real: [B, N] non-padding mask, or None when there is no padding.
        width: output width when the caller knows it without a device sync (no padding, every
            image keeps the same number of tokens).
        drops: some ``target`` may be -1 (decided by the caller, so no device sync is needed).
    """
    batch, n = keep.shape
    slot_ord = keep.long().cumsum(dim=1) - 1  # rank of each kept token among the kept
    padded = False
    if width is None:  # one device sync: the widest image sets the width
        kept = slot_ord[:, -1] + 1
        fewest, width = torch.stack(kept.aminmax()).tolist()
        padded = fewest < width
    dropped = (~keep) & (target < 0)
    if real is not None:
        dropped |= ~real
    dump = drops or real is not None  # dropped tokens and padding go to an extra, discarded slot
    partner_slot = slot_ord.gather(1, target.clamp(min=0))
    slot = torch.where(keep, slot_ord, partner_slot)
    slot = torch.where(dropped, torch.full_like(slot, width), slot)  # the extra slot is cut off
    removed = (~keep) if real is None else (~keep & real)
    # dropped tokens and padding go to the discarded slot, and come back from unmerge as 0
    return merge_from_slots(slot, width, dump, removed.sum(dim=1), padded, live=~dropped)


def class_attention(attn: torch.Tensor) -> torch.Tensor:
    """[B, N] head-averaged attention of the class token (row 0) over all tokens.

    Accepts the class row alone ([B, H, 1, N], what ``needs = "cls_attn"`` delivers) or the full
    matrix ([B, H, N, N]).
    """
    if attn.dim() != 4:
        raise ValueError(f"attention must be [B, H, rows, N]; got shape {tuple(attn.shape)}")
    return attn[:, :, 0, :].float().mean(dim=1)


def keep_top(
    scores: torch.Tensor, r: int, protected: int, real: Optional[torch.Tensor]
) -> torch.Tensor:
    """[B, N] bool: protected tokens plus the best-scored others, r fewer real tokens per image.

    Every image removes r of *its own* real tokens (a padded image removes what it would remove
    alone) but always keeps at least one unprotected token.
    """
    batch, n = scores.shape
    s = scores.float().clone()
    if protected:
        s[:, :protected] = float("inf")
    if real is not None:
        s = s.masked_fill(~real, NEG_INF)
        n_real = real.sum(dim=1, keepdim=True)
    else:
        n_real = torch.full((batch, 1), n, dtype=torch.long, device=scores.device)
    # Stable: equal scores go to the earlier token, so results do not depend on the sort backend.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(batch, n))
    n_keep = torch.maximum(n_real - r, torch.clamp(n_real, max=protected + 1))
    keep = rank < n_keep
    return keep if real is None else keep & real


def most_similar_kept(
    metric: torch.Tensor, keep: torch.Tensor, protected: int, real: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every token: (cosine to, position of) its most similar kept unprotected token."""
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (unit @ unit.transpose(-1, -2)).float()  # [B, N, N]
    dest = keep.clone()
    if protected:
        dest[:, :protected] = False  # nothing merges into the class token
    if real is not None:
        dest &= real
    sim.masked_fill_(~dest[:, None, :], NEG_INF)
    return sim.max(dim=-1)


def importance_weight(importance: torch.Tensor, size: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[B, N, 1] averaging weights size * importance (eq. 4), scaled per image so the largest is 1."""
    imp = importance / importance.amax(dim=1, keepdim=True).clamp_min(1e-30)
    w = imp.clamp_min(MIN_WEIGHT)[..., None]
    if size is not None:
        w = w * size.float()
    return w.to(dtype)


@torch.no_grad()
@matcher
def importance_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor],
                       padded: Optional[bool], attn: Optional[torch.Tensor], **_: object) -> MergeResult:
    """Keep the N - r tokens the class token attends to most; merge each other token into its
    most similar kept token, weighted by importance.

    Called as every matcher (``core.matcher``): ``metric`` [B, N, C] similarity features
    (head-averaged keys); ``r`` tokens to remove (clamped so that one unprotected token stays);
    ``class_token`` / ``protected`` the leading tokens never merged and never a destination (the
    class token must be the first); ``size`` [B, N, 1] token sizes, size-0 rows are padding, never
    kept and never merged; ``attn`` the class-token attention probabilities [B, H, 1, N] (or the
    full [B, H, N, N]).

    Returns:
        ``MergeResult`` whose ``weight`` holds the importance weights for ``merge_wavg``.
    """
    n = metric.shape[1]
    r = min(r, n - keep_first - 1)
    if r <= 0:
        return identity_merge(n)
    if keep_first == 0:
        raise UnsupportedModelError(
            "method=importance scores tokens by the class token's attention, but this model has no class token; "
            "use method=zerotprune (attention-graph importance) or method=bipartite"
        )
    if attn is None:
        raise ConfigError("method=importance needs the class-token attention (its MatcherSpec needs='cls_attn'); "
                          "run it through encoders.apply_merging, which provides it")
    real = padding_mask(size, padded)
    importance = class_attention(attn)
    keep = keep_top(importance, r, keep_first, real)
    _, partner = most_similar_kept(metric, keep, keep_first, real)
    result = assignment_from_keep(keep, partner, real, width=None if real is not None else n - r)
    result.weight = importance_weight(importance, size, metric.dtype)
    result.importance = importance
    return result
