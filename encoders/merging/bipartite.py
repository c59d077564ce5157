"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023), written from the paper."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergeseek.encoders.merging.core import assign_top_r, identity_merge, matcher, partner_search, protect, top_r_merge
from mergeseek.encoders.merging.registry import MergeResult


@torch.no_grad()
@matcher
def bipartite_soft_matching(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor],
                            padded: Optional[bool], **_: object) -> MergeResult:
    """Merge r tokens: each A token's most similar B token (cosine), top-r edges.

    Called as every matcher (``core.matcher``): ``metric`` [B, N, C] similarity features (ToMe:
    head-averaged attention keys), ``r`` tokens to remove (clamped to half of the unprotected
    tokens), ``class_token`` / ``protected`` the leading tokens never merged, ``size`` [B, N, 1]
    token sizes (size-0 rows are padding and are never matched), ``padded`` whether ``size`` holds
    padding (None: look, which costs a device sync).
    """
    n = metric.shape[1]
    r = min(r, (n - keep_first) // 2)
    if r <= 0:
        return identity_merge(n)
    if keep_first <= 1 and (size is None or padded is False):
        # No padding and at most a class token (the patched models' case): the class token is
        # left out of A instead of masked, and the merge runs in few ops (core.top_r_merge).
        metric = metric / metric.norm(dim=-1, keepdim=True)
        best, partner = (metric[:, 2 * keep_first :: 2] @ metric[:, 1::2].transpose(-1, -2)).max(dim=-1, keepdim=True)
        return top_r_merge(best, partner, r, n, keep_first)
    best, partner, real = bipartite_partners(metric, protected=keep_first, size=size, padded=padded)
    return assign_top_r(best, partner, r, n, real, exact_r=real is None, protected=keep_first)


@partner_search
def bipartite_partners(metric: torch.Tensor, keep_first: int, real: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Each A token's most similar B token: ``(best [B, NA], partner [B, NA], real)``, called as
    every partner search (``core.partner_search``); ``best`` is the cosine (-inf for protected
    tokens and padding).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)
    protect(scores, keep_first, real)
    best, partner = scores.max(dim=-1)
    return best, partner, real
