"""Shared machinery of every matcher: turn "which A tokens merge into which B tokens" into the
``merge`` / ``unmerge`` closures, plus the size-weighted average.

Tokens are split alternately: A = positions 0, 2, 4, ...; B = positions 1, 3, 5, ... A merged A
token is added into its B partner; the output is ``[the P protected prefix tokens in place,
unmerged A in position order, all B]`` -- ToMe's ``[unmerged A, all B]`` for a class token
(P = 1) and its distillation-token order for P = 2, so that every prefix token (class, distillation,
register tokens) keeps its position in every block. Each input token gets an output *slot*;
``merge`` scatters tokens into their slots.

Output widths are static (``num_tokens - r``, known without reading the device) whenever the
input holds no padding, which is always the case inside a patched model. Inputs that do hold
padding (size-0 rows, from direct callers) keep batches rectangular: the output is as wide as the
widest image and the spare slots are *padding* with size 0. Proportional attention gives a size-0 key the bias
log(0) = -inf, size-weighted pooling gives it weight 0, and matchers never pick it, so padding is
invisible: a padded image computes exactly what it computes alone.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from mergeseek.encoders.merging.registry import MergeResult

MergeFn = Callable[..., torch.Tensor]
NEG_INF = float("-inf")


def identity_merge(num_tokens: int = 0) -> MergeResult:
    """The result of a layer that merges nothing."""

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        return x

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return x

    return MergeResult(merge, unmerge, num_tokens, 0, identity=True)


def real_mask(size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, N] bool of non-padding tokens, or None when no size is tracked yet."""
    return None if size is None else size[..., 0] > 0


def protected_count(class_token: bool, protected: Optional[int]) -> int:
    """Leading tokens never merged: ``protected``, else 1 with a class token and 0 without."""
    return int(class_token) if protected is None else protected


def padding_mask(size: Optional[torch.Tensor], padded: Optional[bool]) -> Optional[torch.Tensor]:
    """[B, N] non-padding mask when ``size`` holds padding, else None (``padded`` None: look, which
    costs a device sync)."""
    if padded is False:
        return None
    real = real_mask(size)
    if real is None or padded:
        return real
    return None if bool(real.all()) else real


def matcher(fn: Callable) -> Callable:
    """Give ``fn(metric, r, keep_first, *, size, padded, attn, **options)`` the calling convention
    every matcher shares (``registry.MatcherSpec``): ``(metric [B, N, C], r, class_token=True, *,
    size=None, protected=None, padded=None, attn=None, **options) -> MergeResult``.

    ``keep_first`` is :func:`protected_count`; ``size`` [B, N, 1] token sizes (size-0 rows are
    padding), ``padded`` whether they hold padding (None: look), ``attn`` what the method's spec
    ``needs`` from attention, ``options`` the spec's options and state.
    """

    @functools.wraps(fn)
    def call(metric: torch.Tensor, r: int, class_token: bool = True, *, size: Optional[torch.Tensor] = None,
             protected: Optional[int] = None, padded: Optional[bool] = None, attn: Optional[torch.Tensor] = None,
             **options: Any) -> MergeResult:
        return fn(metric, r, protected_count(class_token, protected), size=size, padded=padded, attn=attn, **options)

    del call.__wrapped__  # the signature callers see is the convention, not ``fn``'s
    return call


def partner_search(fn: Callable) -> Callable:
    """Give ``fn(metric, keep_first, real, **options) -> (best, partner, ...)`` the calling convention
    of the partner searches: ``(metric [B, N, C], class_token=True, *, size=None, protected=None,
    padded=None, **options) -> (best [B, NA], partner [B, NA], real, ...)``.

    ``best`` is each A token's score to its partner (-inf: none), ``partner`` an index into B,
    ``real`` the [B, N] non-padding mask when ``size`` holds padding, else None (:func:`padding_mask`).
    """

    @functools.wraps(fn)
    def call(metric: torch.Tensor, class_token: bool = True, *, size: Optional[torch.Tensor] = None,
             protected: Optional[int] = None, padded: Optional[bool] = None, **options: Any):
        return fn(metric, protected_count(class_token, protected), padding_mask(size, padded), **options)

    del call.__wrapped__
    return call


def protect(scores: torch.Tensor, protected: int, real: Optional[torch.Tensor]) -> torch.Tensor:
    """Forbid protected (class/prefix) tokens and padding as merge sources or destinations.

    ``scores`` is [B, NA, NB] (A rows, B columns); edited in place and returned.
    """
    if protected:
        scores[:, : (protected + 1) // 2, :] = NEG_INF  # protected A positions 0, 2, ...
        scores[:, :, : protected // 2] = NEG_INF  # protected B positions 1, 3, ...
    if real is not None:
        scores.masked_fill_(~real[:, 0::2, None], NEG_INF)
        scores.masked_fill_(~real[:, None, 1::2], NEG_INF)
    return scores


def assign_top_r(
    best: torch.Tensor,
    partner: torch.Tensor,
    r: int,
    num_tokens: int,
    real: Optional[torch.Tensor] = None,
    exact_r: bool = False,
    protected: int = 0,
) -> MergeResult:
    """Merge the r A tokens with the highest ``best`` score into their ``partner`` B tokens.

    Args:
        best: [B, NA] score of each A token's best partner (-inf: no partner, never merged).
        partner: [B, NA] index into B of that partner.
        r: tokens to remove.
        num_tokens: N, tokens in the sequence.
        real: [B, N] non-padding mask, or None when there is no padding.
        exact_r: the caller guarantees r valid edges in every image and no padding, so the output
            width is N - r without a device sync.
        protected: leading prefix tokens, kept first and in place (see the module doc).
    """
    if exact_r and real is None and protected <= 1:
        # A class token (protected = 1) is A token 0 and has no partner: left out of the ranking.
        return top_r_merge(best[:, protected:], partner[:, protected:], r, num_tokens, protected)
    # The r best edges as a set, ties at the r-th score going to the earlier A tokens: exactly the
    # first r of a stable descending sort (the naive loop's rule), without sorting all N/2 scores.
    r = min(r, best.shape[1])
    threshold = best.topk(r, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = best > threshold
    tied = best == threshold
    room = r - above.sum(dim=-1, keepdim=True)
    merged_a = above | (tied & (tied.cumsum(dim=-1) <= room))
    merged_a &= best > NEG_INF  # A tokens without a partner never merge
    return merge_from_assignment(
        merged_a, partner, num_tokens, real, width=num_tokens - r if exact_r else None, protected=protected
    )


def top_r_merge(best: torch.Tensor, partner: torch.Tensor, r: int, num_tokens: int, first_a: int = 0) -> MergeResult:
    """Merge the r best edges, for inputs without padding whose every image has r edges and at
    most one prefix token (the class token): the common case inside a patched model, in few ops.

    Args:
        best: [B, K] or [B, K, 1] score of each mergeable A token's best partner (finite), K = NA - first_a.
        partner: the same shape, index into B of that partner.
        r: tokens to remove (at most K).
        num_tokens: N.
        first_a: 1 when A token 0 is a class token (kept first, never merged), else 0.

    The edges are the first r of a stable descending sort of ``best`` (ties go to the earlier A
    token, as in :func:`assign_top_r`); the layout is the same, ``[class, unmerged A in position
    order, all B]``. ``wavg`` merges the tokens and their sizes in one pass: the size rides along
    as an extra channel through two gathers and one scatter-add (ToMe's own merge, plus sizes).
    ``merge`` / ``unmerge`` build the general slot closures on first use. Indices are kept as
    [B, k, 1] throughout, so each gather needs only an ``expand``.
    """
    if best.dim() == 2:
        best, partner = best.unsqueeze(-1), partner.unsqueeze(-1)
    r = min(r, best.shape[1])  # never more edges than mergeable A tokens (the matchers clamp already)
    order = best.argsort(dim=1, descending=True, stable=True)
    src = order[:, :r]
    unm = order[:, r:].sort(dim=1).values
    dst = partner.gather(1, src)
    width = num_tokens - r

    def wavg(x: torch.Tensor, size: Optional[torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
        # [x * size, size] in one tensor: one gather/scatter pass merges both
        xs = torch.nn.functional.pad(x, (0, 1), value=1.0) if size is None else torch.cat([x * size, size], dim=-1)
        c1 = xs.shape[-1]
        xa, xb = xs[:, 2 * first_a :: 2], xs[:, 1::2]
        unm_x = xa.gather(1, unm.expand(-1, -1, c1))
        src_x = xa.gather(1, src.expand(-1, -1, c1))
        xb = xb.scatter_add(1, dst.expand(-1, -1, c1), src_x)
        out = torch.cat([xs[:, :1], unm_x, xb] if first_a else [unm_x, xb], dim=1)
        size = out[..., -1:]
        return out[..., :-1] / size, size

    slots: list = []

    def general() -> MergeResult:
        if not slots:
            batch, k = best.shape[:2]
            merged_a = torch.zeros(batch, k + first_a, dtype=torch.bool, device=best.device)
            merged_a.scatter_(1, src[..., 0] + first_a, True)
            full = torch.nn.functional.pad(partner[..., 0], (first_a, 0)) if first_a else partner[..., 0]
            slots.append(merge_from_assignment(merged_a, full, num_tokens, None, width=width, protected=first_a))
        return slots[0]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        return general().merge(x, mode=mode)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return general().unmerge(x)

    def slot() -> torch.Tensor:
        # [class, unmerged A in position order, all B]: A token unm[j] -> first_a + j, B token j ->
        # first_a + K - r + j, a merged A token src[j] -> its destination's slot
        batch, k = best.shape[:2]
        b0 = first_a + k - r
        dev = best.device
        slot_a = torch.empty(batch, k, dtype=torch.long, device=dev)
        slot_a.scatter_(1, unm[..., 0], torch.arange(first_a, b0, device=dev).expand(batch, k - r))
        slot_a.scatter_(1, src[..., 0], dst[..., 0] + b0)
        out = torch.empty(batch, num_tokens, dtype=torch.long, device=dev)
        out[:, 0::2] = torch.nn.functional.pad(slot_a, (first_a, 0)) if first_a else slot_a
        out[:, 1::2] = torch.arange(b0, b0 + num_tokens // 2, device=dev).expand(batch, num_tokens // 2)
        return out

    num_merged = torch.full((best.shape[0],), r, dtype=torch.long, device=best.device)
    return MergeResult(merge, unmerge, width, num_merged, wavg=wavg, slot=slot)


def merge_from_assignment(
    merged_a: torch.Tensor,
    partner: torch.Tensor,
    num_tokens: int,
    real: Optional[torch.Tensor] = None,
    width: Optional[int] = None,
    protected: int = 0,
) -> MergeResult:
    """Build ``merge``/``unmerge`` from a per-A-token "merged into partner" decision.

    Args:
        merged_a: [B, NA] bool, A tokens merged away.
        partner: [B, NA] long, index into B of each merged A token's destination.
        num_tokens: N.
        real: [B, N] non-padding mask or None.
        width: output width when known without a sync (no padding, equal counts).
        protected: the first ``protected`` tokens (never merged, never merged into) keep slots
            0..protected-1; then come the unmerged A tokens, then the B tokens.
    """
    batch, num_a = merged_a.shape
    num_b = num_tokens - num_a
    dev = merged_a.device
    pa, pb = (protected + 1) // 2, protected // 2  # protected tokens among A and among B
    keep = torch.cat([~merged_a[:, pa:], torch.ones(batch, num_b - pb, dtype=torch.bool, device=dev)], dim=1)
    if real is not None:
        keep &= torch.cat([real[:, 0::2][:, pa:], real[:, 1::2][:, pb:]], dim=1)
    slot_ord = keep.cumsum(dim=1) + (protected - 1)
    padded = False
    if width is None:  # one device sync: the widest image sets the width, narrower ones get padding
        kept = slot_ord[:, -1] + 1
        fewest, width = torch.stack(kept.aminmax()).tolist()
        padded = fewest < width
    slot_a, slot_b = slot_ord[:, : num_a - pa], slot_ord[:, num_a - pa :]
    if protected:  # prefix tokens keep their own positions as slots
        prefix = torch.arange(protected, device=dev).expand(batch, protected)
        slot_a = torch.cat([prefix[:, 0::2], slot_a], dim=1)
        slot_b = torch.cat([prefix[:, 1::2], slot_b], dim=1)
    slot_a = torch.where(merged_a, slot_b.gather(1, partner), slot_a)
    dump = real is not None
    if dump:  # padding of the input goes to an extra slot that is dropped
        slot_a = torch.where(real[:, 0::2], slot_a, width)
        slot_b = torch.where(real[:, 1::2], slot_b, width)
    slot = torch.empty(batch, num_tokens, dtype=torch.long, device=merged_a.device)
    slot[:, 0::2] = slot_a
    slot[:, 1::2] = slot_b
    return merge_from_slots(slot, width, real is not None, merged_a.sum(dim=1), padded, live=real)


def merge_from_slots(
    slot: torch.Tensor,
    width: int,
    dump: bool,
    num_merged: Any,
    padded: bool,
    live: Optional[torch.Tensor] = None,
) -> MergeResult:
    """``merge``/``unmerge`` closures from the output slot of every input token.

    Args:
        slot: [B, N] long, output slot of each token (``width``: an extra slot that is discarded).
        width: output tokens.
        dump: some tokens go to the discarded slot.
        num_merged: tokens each image removed ([B] tensor or int), kept for the stats.
        padded: the output holds size-0 padding slots.
        live: [B, N] tokens that ``unmerge`` restores (others come back as 0); None: all.
    """
    batch, num_tokens = slot.shape
    out_width = width + int(dump)
    # Sums go through one index_add_ over flattened rows (row i of image b -> output row
    # b * out_width + slot): whole rows at a time, several times faster on CPU than an
    # element-wise scatter_add_ with an expanded index.
    flat = (slot + torch.arange(batch, device=slot.device)[:, None] * out_width).reshape(-1)

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        b, n, c = x.shape
        if mode == "sum":
            out = x.new_zeros(b * out_width, c).index_add_(0, flat, x.reshape(b * n, c)).view(b, out_width, c)
            return out[:, :width] if dump else out
        index = slot.unsqueeze(-1).expand(b, n, c)
        out = x.new_zeros(b, out_width, c)
        if mode == "mean":
            out.scatter_reduce_(1, index, x, reduce="mean", include_self=False)
        elif mode == "amax":
            out.scatter_reduce_(1, index, x, reduce="amax", include_self=False)
        else:
            raise ValueError(f"merge mode {mode!r} is not valid; choose one of: sum, mean, amax")
        return out[:, :width] if dump else out

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        out = x.gather(1, slot.clamp(max=width - 1).unsqueeze(-1).expand(b, num_tokens, c))
        return out if live is None else out * live[..., None].to(out.dtype)

    return MergeResult(merge, unmerge, width, num_merged, padded, slot=lambda: slot)


def merge_wavg(
    merge: Any, x: torch.Tensor, size: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
    mlerp: bool = False,
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Weighted average of merged tokens; returns (x, size) with sizes summed.

    Args:
        merge: a matcher's ``MergeResult`` (its ``weight`` is used when ``weight`` is None) or
            its ``merge`` function.
        x: [B, N, C] tokens.
        size: [B, N, 1] tokens represented by each row (None: all ones).
        weight: [B, N, 1] averaging weights (None: the sizes, as in ToMe).
        mlerp: norm-preserving merge (ToFu's MLERP): each merged token keeps the average's
            direction and takes the same weighted average of its members' norms (averaging
            dissimilar tokens otherwise shrinks them). The norms ride along as one more channel
            of the same average; a token merged with nothing comes out unchanged.
    """
    if mlerp:
        aug, size = merge_wavg(merge, torch.cat([x, x.norm(dim=-1, keepdim=True)], dim=-1), size, weight)
        mean, norm = aug[..., :-1], aug[..., -1:]
        return mean * (norm / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)), size
    if isinstance(merge, MergeResult):
        if merge.wavg is not None and weight is None and merge.weight is None:
            return merge.wavg(x, size)
        weight = merge.weight if weight is None else weight
        merge = merge.merge
    if size is None:
        size = torch.ones_like(x[..., :1])
    w = size if weight is None else weight
    x = merge(x * w, mode="sum")
    size_merged = merge(size, mode="sum")
    denom = size_merged if weight is None else merge(w, mode="sum")
    x = x / torch.where(denom > 0, denom, torch.ones_like(denom))
    return x, size_merged
