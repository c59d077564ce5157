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
    proj = (metric @ planes.to(metric.dtype)).view(batch, n, tables, bits + 1)
    weights = 2 ** torch.arange(bits, device=metric.device)
    codes = ((proj[..., :bits] > 0).long() * weights).sum(-1)  # [B, N, T]

    pos = torch.arange(n, device=metric.device)
    eligible = (pos >= keep_first).expand(batch, n)
    real = real_mask(size)
    if real is not None:
        eligible = eligible & real
    # Sort key: code, then the ordering projection in (0, 2); ineligible tokens sort last.
    key = codes.double() * 4 + proj[..., bits].double().clamp(-1, 1) + 1
    key = key.masked_fill(~eligible[..., None], float("inf"))
    perm = key.argsort(dim=1).transpose(1, 2)  # [B, T, N] sorted position -> token

    chunks = -(-n // window)
    padded_n = chunks * window
    fill = padded_n - n
    s_metric = metric.unsqueeze(1).expand(batch, tables, n, dim).gather(2, perm[..., None].expand(-1, -1, -1, dim))
    s_code = codes.transpose(1, 2).gather(2, perm)
    s_ok = eligible.unsqueeze(1).expand(batch, tables, n).gather(2, perm)
    s_is_a = perm % 2 == 0
    if fill:
        s_metric = torch.nn.functional.pad(s_metric, (0, 0, 0, fill))
        s_code = torch.nn.functional.pad(s_code, (0, fill), value=-1)
        s_ok = torch.nn.functional.pad(s_ok, (0, fill), value=False)
        s_is_a = torch.nn.functional.pad(s_is_a, (0, fill), value=False)
        perm = torch.nn.functional.pad(perm, (0, fill), value=0)

    def by_chunk(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tables, chunks, window, *t.shape[3:])

    def with_previous(t: torch.Tensor) -> torch.Tensor:  # keys of chunk c = chunks c-1 and c
        return torch.cat([t.roll(1, dims=2), t], dim=3)

    q_metric, q_code, q_ok, q_a = (by_chunk(t) for t in (s_metric, s_code, s_ok, s_is_a))
    k_metric, k_code, k_ok, k_a = (with_previous(t) for t in (q_metric, q_code, q_ok, q_a))
    k_ok = k_ok.clone()
    k_ok[:, :, 0, :window] = False  # chunk 0 has no previous chunk (roll wrapped around)

    scores = q_metric @ k_metric.transpose(-1, -2)  # [B, T, chunks, window, 2*window]
    valid = (
        (q_code[..., :, None] == k_code[..., None, :])
        & q_ok[..., :, None]
        & k_ok[..., None, :]
        & (q_a[..., :, None] != k_a[..., None, :])
    )
    scores = scores.masked_fill(~valid, NEG_INF)

    # Best partner of each sorted position, seen as a query (own row) and as a key (own column,
    # from its own chunk's block and from the next chunk's block).
    k_sorted_pos = torch.arange(2 * window, device=metric.device) - window  # relative to chunk start
    chunk_start = torch.arange(chunks, device=metric.device)[:, None] * window
    row_val, row_arg = scores.max(dim=-1)  # [B, T, chunks, window]
    row_pos = chunk_start + k_sorted_pos[row_arg]
    col_val, col_arg = scores.max(dim=-2)  # [B, T, chunks, 2*window]
    col_pos = chunk_start + col_arg  # query position in sorted order
    own_val, own_pos = col_val[..., window:], col_pos[..., window:]
    nxt_val, nxt_pos = col_val[..., :window].roll(-1, dims=2), col_pos[..., :window].roll(-1, dims=2)
    nxt_val = nxt_val.clone()
    nxt_val[:, :, -1] = NEG_INF  # the last chunk has no next chunk
    cand_val = torch.stack([row_val, own_val, nxt_val], dim=-1).view(batch, tables, padded_n, 3)
    cand_pos = torch.stack([row_pos, own_pos, nxt_pos], dim=-1).view(batch, tables, padded_n, 3)
    best_val, which = cand_val.max(dim=-1)
    best_pos = cand_pos.gather(-1, which[..., None])[..., 0].clamp(0, padded_n - 1)
    best_tok = perm.gather(2, best_pos)  # partner as an original token position

    # Back to token order, then the best over tables.
    tok_val = torch.full((batch, tables, n + 1), NEG_INF, dtype=best_val.dtype, device=metric.device)
    tok_partner = torch.zeros((batch, tables, n + 1), dtype=torch.long, device=metric.device)
    dest = torch.where(s_ok, perm, n)  # padding of the sort goes to a dropped column
    tok_val.scatter_(2, dest, best_val)
    tok_partner.scatter_(2, dest, best_tok)
    table_val, table_arg = tok_val[..., :n].max(dim=1)  # [B, N]
    partner_tok = tok_partner[..., :n].gather(1, table_arg[:, None])[:, 0]

    best = table_val[:, 0::2]
    # B tokens sit at odd positions; an A token without a partner points at B 0 (never used).
    partner = torch.where(best > NEG_INF, partner_tok[:, 0::2] // 2, 0)
    padded_in = real is not None and (padded if padded is not None else not bool(real.all()))
    return assign_top_r(best, partner, r, n, real if padded_in else None)
