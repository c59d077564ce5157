"""Hashed partner search for token merging (``method=lsh``).

Bipartite matching scores every A token against every B token (an N/2 x N/2 matrix). Here each
token gets SimHash codes (signs of random-hyperplane projections of its normalised metric) in
``tables`` independent tables of ``bits`` bits; an A token looks for its most similar B token
only among tokens that share its bucket in some table.

Buckets are ragged, so each table sorts the tokens by (bucket code, one more random projection)
and cuts the sorted order into chunks of ``window`` tokens; a token is compared with the tokens
of its own and the neighbouring chunks that share its code. The extra projection keeps similar
tokens of a large bucket close in the sorted order. Cost per table is O(N * window * C) plus a
sort, against O(N^2 * C / 4) for the full matrix; with ``window >= N`` the search is exhaustive
within buckets. Edges are then chosen exactly as in bipartite matching (top-r by cosine) and
merged with the same size-weighted average; an A token with no bucket-mate in B scores -inf
and is never merged, so an image can merge fewer than r tokens (reported, never hidden).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from encoders.merging.bipartite import protected_count
from encoders.merging.core import NEG_INF, MergeFn, assign_top_r, identity_merge, real_mask


def simhash_planes(dim: int, bits: int, tables: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """[dim, tables * (bits + 1)] random hyperplanes: ``bits`` code planes + 1 ordering direction per table."""
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(dim, tables * (bits + 1), generator=gen)
    return planes.to(device=device, dtype=dtype)


@torch.no_grad()
def lsh_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = True,
    *,
    size: Optional[torch.Tensor] = None,
    protected: Optional[int] = None,
    padded: Optional[bool] = None,
    lsh_bits: int = 4,
    lsh_tables: int = 4,
    lsh_window: int = 16,
    seed: int = 0,
    planes: Optional[torch.Tensor] = None,
    **_: object,
) -> Tuple[MergeFn, MergeFn]:
    """Merge up to r tokens, each A token into its best B bucket-mate (see module doc).

    Args:
        metric: [B, N, C] similarity features.
        r: tokens to remove (at most; fewer when fewer A tokens have a bucket-mate).
        class_token: position 0 is never merged.
        size: [B, N, 1] sizes; size-0 rows are padding and never matched.
        protected: leading prefix tokens never merged (overrides class_token).
        padded: unused here (kept for the shared signature).
        lsh_bits / lsh_tables / lsh_window / seed: hashing options (see ``MergeConfig``).
        planes: precomputed ``simhash_planes`` (else drawn from ``seed``).
    """
    batch, n, dim = metric.shape
    keep_first = protected_count(class_token, protected)
    r = min(r, (n - keep_first) // 2)
    if r <= 0:
        return identity_merge()
    bits, tables, window = lsh_bits, lsh_tables, max(1, min(lsh_window, n))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    if planes is None:
        planes = simhash_planes(dim, bits, tables, seed, metric.device, metric.dtype)
    # [B, T, N, bits + 1]: per table, the code planes then the ordering direction.
    proj = (metric @ planes.to(metric.dtype)).view(batch, n, tables, bits + 1).transpose(1, 2)
    weights = 2 ** torch.arange(bits, device=metric.device)
    codes = ((proj[..., :bits] > 0).long() * weights).sum(-1)  # [B, T, N]
    # Sort key = code + a fraction from the ordering projection; ineligible tokens (class token,
    # padding) get +inf and sort last. Sorting returns the key, so the code of each sorted
    # position is its floor: no gather of the codes is needed.
    key_dtype = torch.float32 if bits <= 12 else torch.float64
    key = codes.to(key_dtype) + (proj[..., bits].to(key_dtype).clamp(-1, 1) + 1) * 0.25
    chunks = -(-n // window)
    padded_n = chunks * window
    if padded_n > n:  # pad the key (once) so the sorted order cuts into whole chunks
        key = torch.nn.functional.pad(key, (0, padded_n - n), value=float("inf"))
    if keep_first:
        key[:, :, :keep_first] = float("inf")
    real = real_mask(size)
    padded_in = real is not None and (padded if padded is not None else not bool(real.all()))
    if padded_in:
        key[:, :, :n].masked_fill_(~real[:, None, :], float("inf"))
    sorted_key, perm = key.sort(dim=-1)  # [B, T, padded_n] sorted position -> token
    ok = torch.isfinite(sorted_key)
    # Rows of the flat metric (sort padding and ineligible tokens read an extra zero row).
    offsets = (torch.arange(batch, device=metric.device) * n)[:, None, None]
    rows = torch.where(ok, perm + offsets, batch * n)
    # A pair (i, j) is a candidate iff same code, both eligible, one A and one B: with
    # tag = 2*code + is_A (ineligible: -2) that is exactly tag_i ^ 1 == tag_j.
    tag = torch.where(ok, sorted_key.masked_fill(~ok, 0).long() * 2 + 1 - (perm & 1), -2)
    # One flat sequence of all (image, table) sorted orders, after `window` zero rows, so that
    # "chunk c" and "chunk c-1" are both plain contiguous views (no copies before the matmuls).
    flat = torch.cat([metric.reshape(batch * n, dim), metric.new_zeros(1, dim)])
    lead = torch.full((window,), batch * n, dtype=rows.dtype, device=rows.device)
    seq = flat.index_select(0, torch.cat([lead, rows.reshape(-1)]))
    cur = seq[window:].view(-1, window, dim)
    prev = seq[:-window].view(-1, window, dim)
    tag = tag.view(batch, tables, chunks, window)
    prev_tag = tag.roll(1, dims=2)
    prev_tag[:, :, 0] = -2  # chunk 0 has no previous chunk (the view reaches into another table)

    own = torch.bmm(cur, cur.transpose(1, 2)).view(batch, tables, chunks, window, window)
    own.masked_fill_((tag[..., :, None] ^ 1) != tag[..., None, :], NEG_INF)
    best_val, best_arg = own.max(dim=-1)
    chunk_start = torch.arange(chunks, device=metric.device)[:, None] * window
    best_pos = chunk_start + best_arg
    if chunks > 1:
        # cross[c] = chunk c (rows) against chunk c-1 (columns); chunk c-1's partners in chunk c
        # are the columns of cross[c].
        cross = torch.bmm(cur, prev.transpose(1, 2)).view(batch, tables, chunks, window, window)
        cross.masked_fill_((tag[..., :, None] ^ 1) != prev_tag[..., None, :], NEG_INF)
        prev_val, prev_arg = cross[:, :, 1:].max(dim=-1)
        next_val, next_arg = cross[:, :, 1:].max(dim=-2)
        take = prev_val > best_val[:, :, 1:]
        best_val[:, :, 1:] = torch.where(take, prev_val, best_val[:, :, 1:])
        best_pos[:, :, 1:] = torch.where(take, chunk_start[:-1] + prev_arg, best_pos[:, :, 1:])
        take = next_val > best_val[:, :, :-1]
        best_val[:, :, :-1] = torch.where(take, next_val, best_val[:, :, :-1])
        best_pos[:, :, :-1] = torch.where(take, chunk_start[1:] + next_arg, best_pos[:, :, :-1])
    best_val = best_val.view(batch, tables, padded_n)
    best_tok = perm.gather(2, best_pos.view(batch, tables, padded_n))  # partner as a token position

    # Back to token order, then the best over tables.
    dest = torch.where(ok, perm, n)  # sort padding goes to a dropped column
    tok_val = torch.full((batch, tables, n + 1), NEG_INF, dtype=best_val.dtype, device=metric.device)
    tok_partner = torch.zeros((batch, tables, n + 1), dtype=torch.long, device=metric.device)
    tok_val.scatter_(2, dest, best_val)
    tok_partner.scatter_(2, dest, best_tok)
    table_val, table_arg = tok_val[..., :n].max(dim=1)  # [B, N]
    partner_tok = tok_partner[..., :n].gather(1, table_arg[:, None])[:, 0]

    best = table_val[:, 0::2]
    # B tokens sit at odd positions; an A token without a partner points at B 0 (never used).
    partner = torch.where(best > NEG_INF, partner_tok[:, 0::2] // 2, 0)
    return assign_top_r(best, partner, r, n, real if padded_in else None)
