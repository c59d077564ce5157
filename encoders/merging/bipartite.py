"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023), written from the paper."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergeseek.encoders.merging.core import assign_top_r, identity_merge, protect, real_mask, top_r_merge
from mergeseek.encoders.merging.registry import MergeResult


def protected_count(class_token: bool, protected: Optional[int]) -> int:
    return int(class_token) if protected is None else protected


@torch.no_grad()
def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = True,
    *,
    size: Optional[torch.Tensor] = None,
    protected: Optional[int] = None,
    padded: Optional[bool] = None,
    **_: object,
) -> MergeResult:
    """Merge r tokens: each A token's most similar B token (cosine), top-r edges.

    Args:
        metric: [B, N, C] similarity features (ToMe: head-averaged attention keys).
        r: tokens to remove (clamped to half of the unprotected tokens).
        class_token: position 0 is a class token that is never merged.
        size: [B, N, 1] token sizes; size-0 rows are padding and are never matched.
        protected: number of leading prefix tokens never merged (overrides class_token).
        padded: whether ``size`` holds padding (None: look, which costs a device sync).
    """
    n = metric.shape[1]
    keep_first = protected_count(class_token, protected)
    r = min(r, (n - keep_first) // 2)
    if r <= 0:
        return identity_merge(n)
    if keep_first <= 1 and (size is None or padded is False):
        # No padding and at most a class token (the patched models' case): the class token is
        # left out of A instead of masked, and the merge runs in few ops (core.top_r_merge).
        metric = metric / metric.norm(dim=-1, keepdim=True)
        best, partner = (metric[:, 2 * keep_first :: 2] @ metric[:, 1::2].transpose(-1, -2)).max(dim=-1, keepdim=True)
        return top_r_merge(best, partner, r, n, keep_first)
    best, partner, real = bipartite_partners(metric, class_token, size=size, protected=protected, padded=padded)
    return assign_top_r(best, partner, r, n, real, exact_r=real is None, protected=keep_first)


@torch.no_grad()
def bipartite_partners(
    metric: torch.Tensor,
    class_token: bool = True,
    *,
    size: Optional[torch.Tensor] = None,
    protected: Optional[int] = None,
    padded: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Each A token's most similar B token: ``(best [B, NA], partner [B, NA], real)``.

    ``best`` is the cosine (-inf for protected tokens and padding), ``partner`` an index into B,
    ``real`` the [B, N] non-padding mask when ``size`` holds padding (else None).
    """
    keep_first = protected_count(class_token, protected)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)
    real = real_mask(size)
    if padded is None:
        padded = real is not None and not bool(real.all())
    protect(scores, keep_first, real if padded else None)
    best, partner = scores.max(dim=-1)
    return best, partner, (real if padded else None)
