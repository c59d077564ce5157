"""Energy-guided merging (``method=energy``, ``method=energy_lsh``): PiToMe's rule (Tran et al.,
"Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024, arXiv
2405.16148), written from the paper.

ToMe merges the r A tokens with the most similar B partner, whatever the B token is: an isolated,
informative token in B can still receive a merge and be averaged away. Here every token first
gets an *energy*, how much of the image looks like it:

    E_i = 1/N * sum_j f(cos(k_i, k_j)),   f(x) = x if x >= margin else alpha * (exp(x - margin) - 1)

(k: the head-averaged keys, ToMe's metric). Similar tokens count with their cosine, dissimilar
ones with a small bounded penalty, so E is high inside large groups of alike tokens (background,
texture) and low for isolated ones. Only the 2r highest-energy tokens may take part in a merge:
ranked by energy, they are dealt alternately into A (ranks 0, 2, 4, ...) and B (ranks 1, 3, ...),
and every A token is merged into its most similar B token (size-weighted, sizes summed, as in
ToMe). The other N - 2r tokens, the protected prefix (class token) among them, are never merged
nor merged into. r tokens leave per call, so the output width is ``N - r`` without a device read.

``energy_lsh`` is the hashed variant: no N x N matrix. The energy is a SimHash density, the
fraction of tokens sharing a token's bucket, averaged over tables (a collision counts a pair with
probability ``(1 - angle / pi) ** bits``: a sharp kernel on the cosine, like ``f``); the partner
of each A token is searched among its B bucket-mates by the sorted-window search of
:mod:`encoders.merging.lsh` (tokens without a bucket-mate take its fallback partner), so every
call still removes exactly r tokens.

The output keeps every unmerged token in position order (the class token first): the layout of
``importance.assignment_from_keep``, which also builds the general ``merge``/``unmerge`` closures
on first use; the size-weighted average itself runs fused (:func:`pair_merge`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher, padding_mask
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.errors import InputError

MARGIN = 0.5  # f's margin: cosines above it count as they are, below it as a bounded penalty
ALPHA = 1.0  # the penalty's scale (f >= -alpha)


def similarity_energy(unit: torch.Tensor, margin: float = MARGIN, alpha: float = ALPHA) -> torch.Tensor:
    """[B, N] energy of unit vectors [B, N, C]: the mean over all tokens j of f(cos(i, j))."""
    sim = unit @ unit.transpose(-1, -2)
    penalty = (sim - margin).exp_().sub_(1.0).mul_(alpha)
    return torch.where(sim >= margin, sim, penalty).mean(dim=-1)


def bucket_energy(unit: torch.Tensor, planes: torch.Tensor, bits: int, tables: int) -> torch.Tensor:
    """[B, N] SimHash density of unit vectors [B, N, C]: per table, the fraction of the N tokens in
    the token's bucket (itself included), averaged over tables. ``planes``: [C, tables * (bits +
    1)], ``lsh.simhash_planes`` (the last column of each table, its ordering direction, is unused)."""
    batch, n, _ = unit.shape
    proj = (unit.float() @ planes.float()).view(batch, n, tables, bits + 1)[..., :bits]
    weights = 2 ** torch.arange(bits, device=unit.device)
    code = ((proj > 0).long() * weights).sum(dim=-1)  # [B, N, T]
    code = code + torch.arange(tables, device=unit.device) * (1 << bits)  # one code range per table
    counts = torch.zeros(batch, tables << bits, device=unit.device).scatter_add_(
        1, code.view(batch, -1), torch.ones(batch, n * tables, device=unit.device))
    return counts.gather(1, code.view(batch, -1)).view(batch, n, tables).mean(dim=-1) / n


def candidates(energy: torch.Tensor, r: int, keep_first: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) [B, r] positions: the 2r highest-energy unprotected tokens dealt alternately by rank
    (ties to the earlier token)."""
    if keep_first:
        energy = energy.clone()
        energy[:, :keep_first] = NEG_INF
    order = energy.argsort(dim=-1, descending=True, stable=True)[:, : 2 * r]
    return order[:, 0::2], order[:, 1::2]


def pair_merge(src: torch.Tensor, dst: torch.Tensor, num_tokens: int) -> MergeResult:
    """Merge token ``src[b, k]`` into token ``dst[b, k]`` (positions; sources and destinations
    disjoint, each source once); every other token keeps a slot, in position order.

    ``wavg`` is the size-weighted average in one pass (the size rides as an extra channel through
    one gather, one scatter-add and one gather of the kept rows); ``merge`` / ``unmerge`` are the
    general closures of ``importance.assignment_from_keep`` (same layout), built on first use.
    """
    batch, r = src.shape
    width = num_tokens - r
    positions = torch.arange(num_tokens, device=src.device).expand(batch, num_tokens)
    gone = torch.zeros(batch, num_tokens, dtype=torch.long, device=src.device).scatter_(1, src, num_tokens)
    kept = (positions + gone).sort(dim=1).values[:, :width, None]  # kept positions, in order
    src3, dst3 = src[..., None], dst[..., None]

    def wavg(x: torch.Tensor, size: Optional[torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
        xs = torch.nn.functional.pad(x, (0, 1), value=1.0) if size is None else torch.cat([x * size, size], dim=-1)
        c1 = xs.shape[-1]
        xs = xs.scatter_add(1, dst3.expand(-1, -1, c1), xs.gather(1, src3.expand(-1, -1, c1)))
        out = xs.gather(1, kept.expand(-1, -1, c1))
        size = out[..., -1:]
        return out[..., :-1] / size, size

    slots: list = []

    def general() -> MergeResult:
        if not slots:
            from mergeseek.encoders.merging.importance import assignment_from_keep

            keep = gone == 0
            target = torch.zeros_like(positions).scatter_(1, src, dst)
            slots.append(assignment_from_keep(keep, target, None, width=width))
        return slots[0]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        return general().merge(x, mode=mode)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return general().unmerge(x)

    def slot() -> torch.Tensor:
        # kept tokens take their rank among the kept; a source takes its destination's slot
        ranks = torch.arange(width, device=src.device).expand(batch, width)
        out = torch.zeros(batch, num_tokens, dtype=torch.long, device=src.device).scatter_(1, kept[..., 0], ranks)
        return out.scatter_(1, src, out.gather(1, dst))

    num_merged = torch.full((batch,), r, dtype=torch.long, device=src.device)
    return MergeResult(merge, unmerge, width, num_merged, wavg=wavg, slot=slot)


def _prepare(metric: torch.Tensor, r: int, keep_first: int, size: Optional[torch.Tensor],
             padded: Optional[bool]) -> Tuple[int, torch.Tensor]:
    """(r clamped to half of the unprotected tokens, the unit metric); refuses padded inputs."""
    n = metric.shape[1]
    if padding_mask(size, padded) is not None:
        raise InputError("method=energy merges inputs without padding (size-0 rows) only; a patched model never "
                         "makes padding. Merge each image alone, or use method=bipartite for padded batches")
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return min(r, (n - keep_first) // 2), unit


@torch.no_grad()
@matcher
def energy_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                   padded: Optional[bool] = None, margin: float = MARGIN, alpha: float = ALPHA,
                   **_: object) -> MergeResult:
    """Merge r tokens by the energy rule (module doc): every A token of the 2r highest-energy tokens
    into its most similar B token.

    Called as every matcher (``core.matcher``): ``metric`` [B, N, C] similarity features
    (head-averaged keys), ``r`` tokens to remove (clamped to half of the unprotected tokens),
    ``class_token`` / ``protected`` the leading tokens never merged; ``size`` token sizes (inputs
    with padding are refused); ``margin`` / ``alpha`` the energy's f.
    """
    n = metric.shape[1]
    r, unit = _prepare(metric, r, keep_first, size, padded)
    if r <= 0:
        return identity_merge(n)
    src, dst_b = candidates(similarity_energy(unit, margin, alpha), r, keep_first)
    c = unit.shape[-1]
    ua, ub = unit.gather(1, src[..., None].expand(-1, -1, c)), unit.gather(1, dst_b[..., None].expand(-1, -1, c))
    partner = (ua @ ub.transpose(-1, -2)).argmax(dim=-1)  # ties: the first maximum
    return pair_merge(src, dst_b.gather(1, partner), n)


@torch.no_grad()
@matcher
def energy_lsh_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                       padded: Optional[bool] = None, planes: Optional[torch.Tensor] = None, lsh_bits: int = 4,
                       lsh_tables: int = 4, lsh_window: int = 16, lsh_chunk: Optional[int] = None, seed: int = 0,
                       attn: object = None, **options: object) -> MergeResult:
    """The hashed energy rule (module doc): bucket-density energy, partners among bucket-mates.

    Called as every matcher; ``planes`` and the ``lsh_*`` options as for ``method=lsh``.
    """
    from mergeseek.encoders.merging.lsh import cached_planes, fallback_partners, lsh_partners

    n, dim = metric.shape[1], metric.shape[2]
    r, unit = _prepare(metric, r, keep_first, size, padded)
    if r <= 0:
        return identity_merge(n)
    if planes is None:
        planes = cached_planes(dim, lsh_bits, lsh_tables, seed, str(metric.device))
    src, dst_b = candidates(bucket_energy(unit, planes, lsh_bits, lsh_tables), r, keep_first)
    # The candidates in rank order (A at even, B at odd places): lsh's alternate split is ours.
    ranked = torch.stack([src, dst_b], dim=2).view(src.shape[0], 2 * r)
    sub = unit.gather(1, ranked[..., None].expand(-1, -1, dim))
    found = lsh_partners(sub, protected=0, lsh_bits=lsh_bits, lsh_tables=lsh_tables, lsh_window=lsh_window,
                         lsh_chunk=lsh_chunk, planes=planes, native_fallback=True, **options)
    partner = found[1]
    if len(found) == 3:  # tensor search: the A tokens without a bucket-mate take the fallback partner
        _, fb_partner = fallback_partners(sub, 0)
        partner = torch.where(found[0] == NEG_INF, fb_partner, partner)
    return pair_merge(src, dst_b.gather(1, partner), n)
