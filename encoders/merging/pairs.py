"""One-to-one greedy merging (``method=pairs``, ``method=pairs_lsh``): every merge joins exactly two
tokens, chosen greedily by similarity over all tokens (issue #26).

ToMe splits the tokens by position into A and B and merges the r A tokens with the most similar
B partner; several A tokens may go into one B token in the same block. At large r (the last
blocks of a -50% FLOP schedule, where r is half the tokens) that builds a few very large tokens
out of whatever A tokens are left, while other B tokens merge nothing. Here merges are pairs:

1. every unprotected token lists its ``PAIR_CANDIDATES`` most similar unprotected tokens
   (cosine of the metric, ToMe's head-averaged keys): the candidate edges;
2. r times, the best candidate edge whose two tokens are both still unused is taken, and both
   tokens are marked used (a greedy maximum-weight matching, truncated at r edges);
3. each pair becomes one token, the size-weighted average, sizes summed (as ToMe), in the slot of
   its earlier token; every other token keeps a slot, in position order (the class token first).

When no candidate edge is left (possible when r is close to half the tokens), that step pairs
the two earliest unused unprotected tokens instead, so every call removes exactly r tokens and
the output width is ``N - r`` without a device read; how many steps did so is reported as
``MergeResult.fallback``.

``pairs_lsh`` is the hashed variant: no N x N matrix. Per SimHash table the tokens are sorted by
(bucket code, position along one more random direction), as in :mod:`encoders.merging.lsh`, and
each token is scored against the ``lsh_window // 2`` tokens that follow it in that order; edges
between different buckets are kept but ranked below every same-bucket edge (cosine - 4). The
greedy step and the merge are the same.

No size- or energy-based protection: on the CIFAR-10 references PiToMe's energy rule lost 2-3
points to ToMe (docs/BENCHMARKS.md, issue #26) and protecting the most isolated tokens gained
nothing; what the pairs constraint gains is measured there. ``method=pairs_mix``
(:mod:`encoders.merging.mixed`) uses this rule only in the blocks that remove at least 5% of their
tokens, and ToMe's bipartite matching in the others.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from mergeseek.encoders.merging.core import NEG_INF, identity_merge, matcher, padding_mask
from mergeseek.encoders.merging.energy import pair_merge
from mergeseek.encoders.merging.registry import MergeResult
from mergeseek.errors import InputError

PAIR_CANDIDATES = 16  # candidate partners per token (its most similar tokens) for method=pairs
# up to this r a matrix rule's greedy steps read the score matrix directly (``greedy_matrix``: one
# row maximum per step) rather than a top-k candidate list; the same pairs (2 r - 1 <= 16)
MATRIX_GREEDY_UP_TO = 8
BUCKET_OFFSET = 4.0  # pairs_lsh: an edge across buckets scores cosine - 4 < -3, below every same-bucket edge


def prepare_pairs(metric: torch.Tensor, r: int, keep_first: int, size: Optional[torch.Tensor],
                  padded: Optional[bool], method: str, unit: bool = True) -> Tuple[int, Optional[torch.Tensor]]:
    """(r clamped to half of the unprotected tokens, the unit metric, or None with ``unit=False``
    for rules that never read it); refuses padded inputs."""
    n = metric.shape[1]
    if padding_mask(size, padded) is not None:
        raise InputError(f"method={method} merges inputs without padding (size-0 rows) only; a patched model never "
                         "makes padding. Merge each image alone, or use method=bipartite for padded batches")
    unit_metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12) if unit else None
    return min(r, (n - keep_first) // 2), unit_metric


def greedy_pairs(score: torch.Tensor, first: torch.Tensor, second: torch.Tensor, r: int, num_tokens: int,
                 keep_first: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy one-to-one matching over candidate edges, truncated at r pairs.

    Args:
        score: [B, E] edge scores (-inf: not an edge); ties go to the earlier edge.
        first, second: [B, E] long, the edge's two token positions (never protected, never equal).
        r: pairs to take (at most half of the unprotected tokens).
        num_tokens: N.
        keep_first: leading tokens that are never paired.

    Returns ``(src, dst, fallback)``: [B, r] the later and the earlier token of each pair, and [B]
    the steps that found no edge and paired the two earliest unused unprotected tokens instead.
    Edges only ever die, so such steps are the last ones: they are filled after the loop, from the
    unused tokens in position order.

    On the CPU (float32) the fused C kernel runs (``native_edges``), elsewhere the tensor loop
    (``tensor_greedy_pairs``): the same pairs.
    """
    found = native_edges(score, first, second, r, num_tokens, keep_first)
    if found is not None:
        return found
    return tensor_greedy_pairs(score, first, second, r, num_tokens, keep_first)


def tensor_greedy_pairs(score: torch.Tensor, first: torch.Tensor, second: torch.Tensor, r: int, num_tokens: int,
                        keep_first: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``greedy_pairs`` in tensor operations, r rounds of a masked argmax over the edges (GPUs,
    torch.compile; static shapes, no host read)."""
    batch, n = score.shape[0], num_tokens
    dev = score.device
    used = torch.zeros(batch, n + 1, dtype=torch.bool, device=dev)  # column n: where a failed step writes
    used[:, :keep_first] = True
    ends = torch.stack([first, second], dim=2)  # [B, E, 2]
    picked = []
    for _ in range(r):
        taken = used.gather(1, ends.view(batch, -1)).view_as(ends).any(dim=2)
        live = score.masked_fill(taken, NEG_INF)
        edge = live.argmax(dim=1, keepdim=True)  # the first maximum
        pair = ends.gather(1, edge[..., None].expand(batch, 1, 2))[:, 0]  # [B, 2]
        pair = pair.masked_fill(live.gather(1, edge) == NEG_INF, n)
        used.scatter_(1, pair, True)
        picked.append(pair)
    return close_pairs(_stacked(picked, batch, dev), used, r, n)


def _stacked(picked: list, batch: int, device) -> torch.Tensor:
    """The greedy steps' pairs [B, r, 2] (r = 0: empty)."""
    return torch.stack(picked, dim=1) if picked else torch.empty(batch, 0, 2, dtype=torch.long, device=device)


def close_pairs(pair: torch.Tensor, used: torch.Tensor, r: int,
                n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``greedy_pairs``' result from the greedy steps' pairs [B, r, 2] (failed steps hold (n, n)) and
    the used tokens [B, n + 1]: failed steps take the unused unprotected tokens in position order."""
    batch, dev = pair.shape[0], pair.device
    failed = pair[..., 0] == n
    fallback = failed.sum(dim=1)
    # unused unprotected tokens in position order: their first 2r, paired (0, 1), (2, 3), ... in turn
    position = torch.arange(n, device=dev).expand(batch, n)
    spare = (position + used[:, :n] * n).sort(dim=1).values[:, : 2 * r].view(batch, r, 2)
    slot = (failed.cumsum(dim=1) - 1).clamp(min=0)  # the k-th failed step takes the k-th spare pair
    pair = torch.where(failed[..., None], spare.gather(1, slot[..., None].expand(batch, r, 2)), pair)
    return pair.amax(dim=2), pair.amin(dim=2), fallback


def greedy_matrix(sim: torch.Tensor, r: int, keep_first: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``greedy_pairs`` over *every* edge of ``sim`` [B, N, N] (higher is better; changed in place),
    without a candidate list: r times the best entry whose row and column tokens are both unused,
    ties to the earlier (row, column). Each step is one pass over the matrix (a row maximum), so
    at small r it is cheaper than ``matrix_edges``' top-k (on the CPU ``topk`` over 145 x 145 per
    image costs as much as ~8 row maxima, whatever k is).

    The same pairs as ``greedy_pairs(*matrix_edges(sim, keep_first, k), r, ...)`` whenever
    ``2 r - 1 <= k`` (or k covers every token): after t steps at most 2t tokens are used, so the
    best unused partner of a token is among its 2t + 1 best, which the candidate list holds
    (``MATRIX_GREEDY_UP_TO``). The protected rows and columns and the diagonal are masked here.
    """
    batch, n, _ = sim.shape
    dev = sim.device
    sim.diagonal(dim1=-2, dim2=-1).fill_(NEG_INF)
    sim[:, :keep_first] = NEG_INF
    sim[:, :, :keep_first] = NEG_INF
    used = torch.zeros(batch, n + 1, dtype=torch.bool, device=dev)
    used[:, :keep_first] = True
    picked = []
    for _ in range(r):
        best, partner = sim.max(dim=2)  # [B, N] each row's best value and its first column
        row = best.argmax(dim=1, keepdim=True)  # the first row holding the maximum
        pair = torch.cat([row, partner.gather(1, row)], dim=1)  # [B, 2]
        # no edge left: the step fails ((n, n), filled by close_pairs); its rows stay masked anyway
        dead = best.gather(1, row) == NEG_INF
        sim.scatter_(1, pair[:, :, None].expand(batch, 2, n), NEG_INF)  # both tokens' rows ...
        sim.scatter_(2, pair[:, None, :].expand(batch, n, 2), NEG_INF)  # ... and columns
        pair = pair.masked_fill(dead, n)
        used.scatter_(1, pair, True)
        picked.append(pair)
    return close_pairs(_stacked(picked, batch, dev), used, r, n)


def _pairs_kernel(scores: torch.Tensor):
    """The fused pairs kernel's library where it applies to ``scores`` (float32 on the CPU, outside
    torch.compile, a C compiler at hand), else None."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    from mergeseek.encoders.merging import lsh_native

    return lsh_native.load_pairs()


def _kernel_outputs(batch: int, r: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's outputs, written in place: src, dst [B, r] and fallback [B] (int64, CPU)."""
    return (torch.empty(batch, r, dtype=torch.long), torch.empty(batch, r, dtype=torch.long),
            torch.empty(batch, dtype=torch.long))


def native_edges(score: torch.Tensor, first: torch.Tensor, second: torch.Tensor, r: int, num_tokens: int,
                 keep_first: int) -> Optional[Tuple[torch.Tensor, ...]]:
    """``greedy_pairs`` by the fused C kernel (``pairs_kernel.c``: the edges in a heap, popped until
    r have two unused ends; the same pairs, ties included), or None where it does not apply."""
    lib = _pairs_kernel(score)
    if lib is None:
        return None
    batch, edges = score.shape
    score = score.contiguous()
    first, second = first.long().contiguous(), second.long().contiguous()
    src, dst, fallback = _kernel_outputs(batch, r)
    status = lib.mergeseek_pairs_edges(score.data_ptr(), first.data_ptr(), second.data_ptr(), batch, edges, num_tokens,
                                       keep_first, r, src.data_ptr(), dst.data_ptr(), fallback.data_ptr(),
                                       torch.get_num_threads())
    return (src, dst, fallback) if status == 0 else None


def native_greedy(sim: torch.Tensor, r: int, keep_first: int, k: int) -> Optional[Tuple[torch.Tensor, ...]]:
    """``greedy_pairs(*matrix_edges(sim, keep_first, k), r, ...)`` by the fused C kernel
    (``pairs_kernel.c``): float32 CPU scores outside torch.compile, when a C compiler built it;
    else None. ``sim`` is read as it is (its diagonal and protected rows and columns are ignored).
    The same pairs as the tensor code except between exactly equal scores in one row, which the
    kernel ranks by column and torch's ``topk`` in an order of its own."""
    lib = _pairs_kernel(sim)
    if lib is None:
        return None
    batch, n, _ = sim.shape
    sim = sim.contiguous()
    src, dst, fallback = _kernel_outputs(batch, r)
    status = lib.mergeseek_pairs_greedy(sim.data_ptr(), batch, n, keep_first, k, r, src.data_ptr(), dst.data_ptr(),
                                        fallback.data_ptr(), torch.get_num_threads())
    return (src, dst, fallback) if status == 0 else None


def matrix_pairs(sim: torch.Tensor, r: int, keep_first: int, k: Optional[int] = None) -> Tuple[torch.Tensor, ...]:
    """``greedy_pairs`` over each token's k best partners in ``sim`` [B, N, N] (may be changed in
    place): by the C kernel on the CPU (``native_greedy``), else through ``greedy_matrix`` where that
    gives the same pairs and costs less (CPU, r up to ``MATRIX_GREEDY_UP_TO`` and 2 r - 1 <= k),
    else through ``matrix_edges``' candidate list (GPUs, torch.compile)."""
    k = PAIR_CANDIDATES if k is None else k
    n = sim.shape[1]
    found = native_greedy(sim, r, keep_first, k)
    if found is not None:
        return found
    if (sim.device.type == "cpu" and not torch.compiler.is_compiling() and r <= MATRIX_GREEDY_UP_TO
            and (2 * r - 1 <= k or k >= n - 1)):
        return greedy_matrix(sim, r, keep_first)
    return greedy_pairs(*matrix_edges(sim, keep_first, k), r, n, keep_first)


def candidate_edges(unit: torch.Tensor, keep_first: int, k: int) -> Tuple[torch.Tensor, ...]:
    """Every unprotected token's k most similar unprotected tokens: (score, first, second) [B, N * k]."""
    return matrix_edges(unit @ unit.transpose(-1, -2), keep_first, k)


def matrix_edges(sim: torch.Tensor, keep_first: int, k: int) -> Tuple[torch.Tensor, ...]:
    """Every unprotected token's k best-scoring unprotected partners in ``sim`` [B, N, N] (higher is
    better; changed in place): (score, first, second) [B, N * k]."""
    batch, n, _ = sim.shape
    sim.diagonal(dim1=-2, dim2=-1).fill_(NEG_INF)
    sim[:, :keep_first] = NEG_INF
    sim[:, :, :keep_first] = NEG_INF
    score, nbr = sim.topk(min(k, n - 1), dim=-1)
    first = torch.arange(n, device=sim.device)[:, None].expand(n, nbr.shape[-1])
    return score.reshape(batch, -1), first.reshape(1, -1).expand(batch, -1), nbr.reshape(batch, -1)


@torch.no_grad()
@matcher
def pairs_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                  padded: Optional[bool] = None, **_: object) -> MergeResult:
    """Merge r disjoint pairs of similar tokens, chosen greedily (module doc).

    Called as every matcher (``core.matcher``): ``metric`` [B, N, C] similarity features
    (head-averaged keys), ``r`` tokens to remove (clamped to half of the unprotected tokens),
    ``class_token`` / ``protected`` the leading tokens never merged; ``size`` token sizes (inputs
    with padding are refused).
    """
    n = metric.shape[1]
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "pairs")
    if r <= 0:
        return identity_merge(n)
    src, dst, fallback = matrix_pairs(unit @ unit.transpose(-1, -2), r, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out


def window_order(unit: torch.Tensor, planes: torch.Tensor, bits: int, tables: int,
                 keep_first: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per SimHash table, the unprotected tokens' bucket codes and their (bucket, order) sort:
    (code [B, F, T], perm [B, F, T]: the free token at each sorted place)."""
    batch, n, _ = unit.shape
    free = n - keep_first
    proj = (unit[:, keep_first:].float() @ planes.float()).view(batch, free, tables, bits + 1)
    weights = 2 ** torch.arange(bits, device=unit.device)
    code = ((proj[..., :bits] > 0).long() * weights).sum(dim=-1)  # [B, F, T]
    # order inside a bucket: the rank along the extra direction, as a fraction added to the code
    order = proj[..., bits].argsort(dim=1).argsort(dim=1).to(torch.float64) / free
    return code, (code.to(torch.float64) + order).argsort(dim=1)


def window_span(free: int, window: int, device) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(span, later [F, span]: the sorted place ``offset`` places on, clamped to the last one, past
    [F, span]: where that runs past the end) of windows of ``window // 2`` following tokens."""
    span = max(1, min(window // 2, free - 1))
    later = torch.arange(free, device=device)[:, None] + torch.arange(1, span + 1, device=device)
    return span, later.clamp(max=free - 1), later >= free


def window_dots(rows: torch.Tensor, perm: torch.Tensor, span: int) -> torch.Tensor:
    """[B, T, F, span]: per table, the dot product of each row of ``rows`` [B, F, C] with the
    ``span`` rows after it in that table's sort ``perm`` [B, F, T] (0 past the end).

    Two ways to the same numbers, by device. CPU: table by table, one product of two shifted views
    per offset (no [B, F, span, C] copy; what fits the cache: 2-4x faster than one gather of every
    window on this development machine). CUDA: every table at once, one gather of each row's
    window (a few large launches rather than ~5 small ones per table and offset)."""
    batch, free, dim = rows.shape
    tables = perm.shape[-1]
    if rows.is_cuda or BATCHED_WINDOWS[0]:
        _, later, _ = window_span(free, 2 * span, rows.device)
        srt = rows.gather(1, perm.transpose(1, 2).reshape(batch, tables * free, 1).expand(-1, -1, dim))
        srt = srt.view(batch, tables, free, dim)
        return (srt[:, :, :, None, :] * srt[:, :, later.view(-1)].view(batch, tables, free, span, dim)).sum(dim=-1)
    out = []
    for t in range(tables):
        srt = rows.gather(1, perm[..., t, None].expand(-1, -1, dim))
        out.append(torch.stack([torch.nn.functional.pad((srt[:, : free - d] * srt[:, d:]).sum(dim=-1), (0, d))
                                for d in range(1, span + 1)], dim=-1))
    return torch.stack(out, dim=1)


BATCHED_WINDOWS = [False]  # True: the CUDA path on any device (tests compare the two)


def window_ends(code: torch.Tensor, perm: torch.Tensor, later: torch.Tensor,
                keep_first: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows' edges in the order (table, sorted place, offset): (first, second) [B, E] token
    positions and ``same`` [B, E], whether both ends share the table's bucket (``window_order``'s
    ``code`` and ``perm``, ``window_span``'s ``later``)."""
    batch = perm.shape[0]
    place = perm.transpose(1, 2)  # [B, T, F] the free token at each sorted place
    sc = code.transpose(1, 2).gather(2, place)  # [B, T, F] bucket code at each sorted place
    first = place[..., None].expand(-1, -1, -1, later.shape[1])
    return (first.reshape(batch, -1) + keep_first, place[..., later].reshape(batch, -1) + keep_first,
            (sc[..., None] == sc[..., later]).reshape(batch, -1))


def window_edges(unit: torch.Tensor, planes: torch.Tensor, bits: int, tables: int, window: int,
                 keep_first: int) -> Tuple[torch.Tensor, ...]:
    """Per SimHash table, each token against the ``window // 2`` tokens after it in (bucket, order)
    sort order: (score, first, second) [B, E], in the order (table, sorted place, offset); pairs
    that run past the end score -inf, cross-bucket edges cosine - BUCKET_OFFSET. All tables at once."""
    batch, n, _ = unit.shape
    code, perm = window_order(unit, planes, bits, tables, keep_first)
    span, later, past = window_span(n - keep_first, window, unit.device)
    first, second, same = window_ends(code, perm, later, keep_first)
    cos = window_dots(unit[:, keep_first:], perm, span).masked_fill(past, NEG_INF).reshape(batch, -1)
    return torch.where(same, cos, cos - BUCKET_OFFSET).to(unit.dtype), first, second


@torch.no_grad()
@matcher
def pairs_lsh_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                      padded: Optional[bool] = None, planes: Optional[torch.Tensor] = None, lsh_bits: int = 4,
                      lsh_tables: int = 4, lsh_window: int = 16, seed: int = 0, **_: object) -> MergeResult:
    """The hashed pairs rule (module doc): candidate edges from SimHash-sorted windows.

    Called as every matcher; ``planes`` and the ``lsh_*`` options as for ``method=lsh``
    (``lsh_chunk`` is not used).
    """
    from mergeseek.encoders.merging.lsh import cached_planes

    n, dim = metric.shape[1], metric.shape[2]
    r, unit = prepare_pairs(metric, r, keep_first, size, padded, "pairs_lsh")
    if r <= 0:
        return identity_merge(n)
    if planes is None:
        planes = cached_planes(dim, lsh_bits, lsh_tables, seed, str(metric.device))
    score, first, second = window_edges(unit, planes, lsh_bits, lsh_tables, lsh_window, keep_first)
    src, dst, fallback = greedy_pairs(score, first, second, r, n, keep_first)
    out = pair_merge(src, dst, n)
    out.fallback = fallback
    return out
