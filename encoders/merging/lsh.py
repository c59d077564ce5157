"""Hashed partner search for token merging (``method=lsh``).

Bipartite matching scores every A token against every B token (an N/2 x N/2 matrix). Here each
token gets SimHash codes (signs of random-hyperplane projections of its normalised metric) in
``tables`` independent tables of ``bits`` bits; an A token looks for its most similar B token
only among B tokens that share its bucket in some table.

Buckets are ragged, so each table turns them into fixed-size work by sorting. The A tokens and
the B tokens are sorted separately by a 16-bit key, (bucket code, quantised position along one
more random direction), so that similar tokens of a large bucket sit close together. The sorted
A tokens are cut into chunks of ``window``; each chunk is scored against the ``window`` sorted B
tokens centred on the chunk's middle key (one ``searchsorted``), as one batched product of small
blocks; pairs whose codes differ are masked. Every score computed is an A-B pair: per table the
cost is N/2 * window * C multiply-adds plus two sorts of N/2 keys, against N^2 * C / 4 for the
full matrix; with ``window >= N/2`` the search is exhaustive within buckets. The gathered rows
are scored in slabs of about 2 MiB so they are read back from cache, not from memory.

Edges are then chosen exactly as in bipartite matching (top-r by cosine) and merged with the same
size-weighted average. An A token with no bucket-mate in B scores -inf in the search; so that every
image still merges exactly r tokens (a static output width, no device read), ``lsh_soft_matching``
gives such tokens a *fallback* edge: their most similar token among ``FALLBACK_B`` B tokens spread
evenly over the sequence, ranked below every bucket edge. Fallback edges are used only when an
image has fewer than r bucket edges; how many were used is reported (``MergeResult.fallback``).

Two implementations compute the same partners. In eager mode on CPU with a float32 metric (or
bf16/fp16, scored in float32) the search runs in a fused C kernel (``lsh_kernel.c``, built on first
use by ``lsh_native``; one pass per image and table on torch's OpenMP threads). Otherwise (GPU,
float64, no C compiler, and always under ``torch.compile``) it runs as tensor code below, which
traces into one graph; there the keys are sorted by NumPy's radix sort in eager CPU runs
(``kind="stable"``, several times faster than a comparison sort at these sizes) and by
``torch.argsort`` elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import numpy as np
import torch

from mergeseek.encoders.merging import lsh_native
from mergeseek.encoders.merging.core import NEG_INF, assign_top_r, identity_merge, matcher, partner_search
from mergeseek.encoders.merging.registry import MergeResult


# Metric dtypes the CPU kernel takes (half precision is scored in float32: more exact than the
# tensor code's half-precision products, and still far faster); float64 stays in float64.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ORDER_RANGE = 4.0  # the ordering projection (N(0, 1) for a unit metric) is quantised on [-4, 4]
SLAB_ROWS = 8192  # gathered metric rows scored per slab (8192 x 64 fp32 = 2 MiB)
FALLBACK_B = 16  # B tokens (evenly spread) where an A token without bucket-mate finds its fallback partner
FALLBACK_OFFSET = 4.0  # fallback scores are cosine - 4 < -3: below every bucket edge's cosine


def _compiling() -> bool:
    """Inside torch.compile tracing: host code (the C kernel, NumPy) would break the graph."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def simhash_planes(dim: int, bits: int, tables: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """[dim, tables * (bits + 1)] random hyperplanes: ``bits`` code planes + 1 ordering direction per table."""
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(dim, tables * (bits + 1), generator=gen)
    return planes.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def cached_planes(dim: int, bits: int, tables: int, seed: int, device: str) -> torch.Tensor:
    return simhash_planes(dim, bits, tables, seed, torch.device(device))


def _argsort_rows(keys: torch.Tensor) -> torch.Tensor:
    """Stable argsort along the last dim (ties keep token order, so results are deterministic)."""
    if keys.device.type == "cpu" and keys.dtype == torch.int16 and not _compiling():
        return torch.from_numpy(np.argsort(keys.numpy(), axis=-1, kind="stable"))
    return torch.argsort(keys, dim=-1, stable=True)


@functools.lru_cache(maxsize=64)
def _constants(batch: int, n: int, bits: int, pos_bits: int, window: int, device: str, dtype: torch.dtype):
    """Small index tensors that depend only on shapes (built once per shape, not per call)."""
    dev = torch.device(device)
    weights = 2.0 ** torch.arange(bits + 1, device=dev, dtype=dtype)
    weights[bits] = 0  # the last column of each table is the ordering direction, not a code bit
    parity = torch.arange(n, device=dev, dtype=dtype).remainder(2)
    sentinel = (parity + (1 << bits)) * (1 << pos_bits)  # code 2**bits (A) / 2**bits + 1 (B)
    steps = torch.arange(window, device=dev)
    offsets = (torch.arange(batch, device=dev) * n)[:, None, None]
    return weights, sentinel, steps, offsets


def _full_precision(dev: torch.device):
    """Autocast switched off where it is on (entering a context only when needed is cheaper)."""
    return torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type) else contextlib.nullcontext()


@functools.lru_cache(maxsize=64)
def _eligible(batch: int, n: int, keep_first: int) -> torch.Tensor:
    """[B, N] uint8, 0 for the protected prefix (shared and never written to)."""
    eligible = torch.ones(batch, n, dtype=torch.uint8)
    eligible[:, :keep_first] = 0
    return eligible


def _native_partners(
    metric: torch.Tensor,
    planes: torch.Tensor,
    tables: int,
    bits: int,
    keep_first: int,
    real: Optional[torch.Tensor],
    window: int,
    chunk: int,
    fallback: bool = False,
) -> Optional[Tuple[torch.Tensor, ...]]:
    """The fused C kernel's (best, partner), or None when it is unavailable or failed; with
    ``fallback`` (no padding), (best, partner, missing) with the fallback edges already in place
    and ``missing`` [B] the eligible A tokens of each image that had no bucket-mate.

    The kernel takes the metric as it is and its projections onto ``planes``; it normalises
    (scores and ordering positions) itself, so no normalised copy of the metric is made here.
    """
    lib = lsh_native.load()
    if lib is None:
        return None
    batch, n, dim = metric.shape
    if metric.dtype != torch.float32 or not metric.is_contiguous():
        metric = metric.float().contiguous()
    with _full_precision(metric.device):
        proj = metric @ (planes if planes.dtype == torch.float32 else planes.float())  # [B, N, T * (bits + 1)]
    eligible = _eligible(batch, n, keep_first)
    if real is not None:
        eligible = eligible & real.to(torch.uint8)
    num_a = (n + 1) // 2
    best = torch.empty(batch, num_a, dtype=torch.float32)
    partner = torch.empty(batch, num_a, dtype=torch.int64)
    status = lib.mergeseek_lsh_search(
        metric.data_ptr(), proj.data_ptr(), eligible.data_ptr(), batch, n, dim, tables, bits, window, chunk,
        best.data_ptr(), partner.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        return None
    if fallback:  # fallback edges of the tokens without a bucket-mate, in the same library (see fallback_partners)
        cols = _fallback_cols(n, keep_first, "cpu")
        missing = torch.empty(batch, dtype=torch.int64)
        status = lib.mergeseek_lsh_fallback(
            metric.data_ptr(), eligible.data_ptr(), batch, n, dim, cols.data_ptr(), len(cols), FALLBACK_OFFSET,
            best.data_ptr(), partner.data_ptr(), missing.data_ptr(),
        )
        if status != 0:
            return None
        return best, partner, missing
    return best, partner


@torch.no_grad()
@partner_search
def lsh_partners(
    metric: torch.Tensor,
    keep_first: int,
    real: Optional[torch.Tensor],
    *,
    lsh_bits: int = 4,
    lsh_tables: int = 4,
    lsh_window: int = 16,
    lsh_chunk: Optional[int] = None,
    seed: int = 0,
    planes: Optional[torch.Tensor] = None,
    backend: str = "auto",
    native_fallback: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Each A token's best B bucket-mate: ``(best [B, NA], partner [B, NA], real)``, called as
    every partner search (``core.partner_search``: ``metric``, ``class_token`` / ``protected``,
    ``size``, ``padded``).

    ``best`` is the cosine to the partner (-inf: no bucket-mate, never merged), ``partner`` an
    index into B, ``real`` the [B, N] non-padding mask when ``size`` holds padding (else None).
    ``lsh_chunk`` (A tokens sharing one window, default ``lsh_window``): smaller chunks centre
    each window closer to its tokens at the price of smaller, slower matrix blocks.
    ``backend``: ``auto`` runs the fused C kernel (``lsh_native``) for float32, bfloat16 and
    float16 CPU inputs (scored in float32) with at most 11 bits when it can be built, else the
    tensor code; ``torch`` / ``native`` force one.
    ``native_fallback``: where the C kernel runs on an input without padding, it also gives the
    tokens without a bucket-mate their fallback edges (``fallback_partners``) and a fourth value
    is returned, [B] how many eligible A tokens had none; elsewhere three values as usual.
    """
    batch, n, dim = metric.shape
    bits, tables, dev = lsh_bits, lsh_tables, metric.device
    window = max(1, min(lsh_window, n // 2))
    half = max(1, min(lsh_chunk or window, window))  # A tokens per chunk
    if planes is None:
        planes = cached_planes(dim, bits, tables, seed, str(dev))
    elif tuple(planes.shape) != (dim, tables * (bits + 1)):
        raise ValueError(
            f"planes must be [{dim}, {tables * (bits + 1)}] (metric dim, tables * (bits + 1)), got {list(planes.shape)}"
        )
    # 16-bit keys (the kernel's and the radix sort's) up to 11 bits; wider ones: int64
    if backend != "torch" and dev.type == "cpu" and metric.dtype in _KERNEL_DTYPES and bits <= 11 and not _compiling():
        found = _native_partners(metric, planes, tables, bits, keep_first, real, window, half,
                                 fallback=native_fallback and real is None)
        if found is not None:
            return (found[0], found[1], real, found[2]) if len(found) == 3 else (found[0], found[1], real)
        if backend == "native":
            raise RuntimeError(f"the fused LSH kernel is unavailable: {lsh_native.reason() or 'it failed'}")
    best, partner = _tensor_partners(metric, planes, bits, tables, keep_first, real, window, half)
    return best, partner, real


def _tensor_partners(metric: torch.Tensor, planes: torch.Tensor, bits: int, tables: int, keep_first: int,
                     real: Optional[torch.Tensor], window: int, half: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The search as tensor code (traced by torch.compile): sort keys per table, score each chunk of
    sorted A tokens against its window of sorted B tokens, best over tables. Returns (best, partner)."""
    batch, n, dim = metric.shape
    num_a, num_b = (n + 1) // 2, n // 2
    small = bits <= 11
    metric = metric / metric.norm(dim=-1, keepdim=True)
    # A and B sorted orders are both padded to `length` (whole A chunks, at least one B window).
    length = max(-(-num_a // half) * half, window)
    # Keys: int16 (bits + 2 code bits, 13 - bits position bits; radix-sorted on CPU) up to 11 bits,
    # else int64 built exactly in float64 (bits + 2 <= 32 code bits, 20 position bits < 2**53).
    pos_bits = 13 - bits if small else 20
    constants = _constants.__wrapped__ if _compiling() else _constants  # traced: no lru_cache
    weights, sentinel, steps, offsets = constants(batch, n, bits, pos_bits, window, str(metric.device),
                                                  torch.float32 if small else torch.float64)
    key = _sort_keys(metric, planes, bits, tables, keep_first, real, length, pos_bits, weights, sentinel)
    perm = _argsort_rows(key).to(metric.device)  # [B, T, 2 (A, B), length]: sorted position -> A / B index
    sorted_key = key.gather(3, perm)
    sorted_code = sorted_key >> pos_bits
    perm_a = perm[:, :, 0]
    cand = _windows(sorted_key, real, keep_first, num_b, window, half, steps)
    cand_b = perm[:, :, 1].gather(2, cand)  # -> B index
    cand_code = sorted_code[:, :, 1].gather(2, cand)
    val, partner = _score_windows(metric, perm_a, cand_b, sorted_code[:, :, 0], cand_code, window, half, offsets)
    val = val.reshape(batch, tables, length)
    partner = partner.reshape(batch, tables, length)

    # Back to A token order (perm_a is a permutation of 0..length-1), then the best over tables.
    tok_val = val.new_empty(batch, tables, length).scatter_(2, perm_a, val)
    tok_partner = partner.new_empty(batch, tables, length).scatter_(2, perm_a, partner)
    best, table = tok_val[..., :num_a].max(dim=1)  # [B, NA]
    best_b = tok_partner[..., :num_a].gather(1, table[:, None])[:, 0].clamp_(max=num_b - 1)
    return best, best_b


def _sort_keys(metric: torch.Tensor, planes: torch.Tensor, bits: int, tables: int, keep_first: int,
               real: Optional[torch.Tensor], length: int, pos_bits: int, weights: torch.Tensor,
               sentinel: torch.Tensor) -> torch.Tensor:
    """[B, T, 2 (A, B), length] integer sort keys ``code << pos_bits | position along the ordering
    direction`` of the unit ``metric``'s A and B tokens in every table.

    Tokens that may not merge get code 2**bits (A) or 2**bits + 1 (B), which match nothing; sort
    padding gets the largest key, whose code matches no real token either. The ordering projection
    of a unit vector onto a Gaussian direction is N(0, 1): [-4, 4] is cut into equal levels.
    """
    batch, n, _ = metric.shape
    small = bits <= 11
    key_dtype = weights.dtype
    # Keys are built in float32/64 whatever the metric's precision (bf16 cannot hold a 15-bit key).
    with _full_precision(metric.device):
        proj = (metric.float() @ planes.float()).view(batch, n, tables, bits + 1)
        code = (proj > 0).to(key_dtype) @ weights  # [B, N, T]
    key = proj[..., bits].to(key_dtype).clamp(-ORDER_RANGE, ORDER_RANGE).add_(ORDER_RANGE)
    key = key.mul_(((1 << pos_bits) - 1) / (2 * ORDER_RANGE)).round_().add_(code, alpha=1 << pos_bits)
    if keep_first:
        key[:, :keep_first] = sentinel[:keep_first, None]
    if real is not None:
        key = torch.where(real[..., None], key, sentinel[:, None])
    big = (1 << 15) - 1 if small else (1 << 52)  # above every real or ineligible key
    key = torch.nn.functional.pad(key.transpose(1, 2), (0, 2 * length - n), value=big)
    return key.to(torch.int16 if small else torch.int64).view(batch, tables, length, 2).transpose(2, 3)


def _windows(sorted_key: torch.Tensor, real: Optional[torch.Tensor], keep_first: int, num_b: int, window: int,
             half: int, steps: torch.Tensor) -> torch.Tensor:
    """[B, T, chunks * window] sorted B positions each A chunk is scored against: the ``window``
    B tokens centred on the chunk's middle key."""
    batch, tables = sorted_key.shape[:2]
    mid = sorted_key[:, :, 0, half // 2 :: half].contiguous()  # [B, T, chunks]
    # Windows stay inside the eligible B tokens (they sort first), so an image's windows do not
    # depend on how much padding its batch adds: a batch computes what each image does alone.
    start = torch.searchsorted(sorted_key[:, :, 1].contiguous(), mid).sub_(window // 2)
    if real is not None:
        count_b = real[:, 1::2].sum(dim=1) - keep_first // 2  # eligible B: real and not protected
        start = torch.minimum(start, (count_b - window).clamp(min=0)[:, None, None]).clamp_(min=0)
    else:
        start = start.clamp_(0, max(0, num_b - keep_first // 2 - window))
    return (start[..., None] + steps).reshape(batch, tables, -1)


def _score_windows(metric: torch.Tensor, perm_a: torch.Tensor, cand_b: torch.Tensor, sorted_code_a: torch.Tensor,
                   cand_code: torch.Tensor, window: int, half: int,
                   offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best same-code candidate of every sorted A token in every table: (score, B index), each
    [B * T, chunks, half]."""
    batch, n, dim = metric.shape
    tables, length = perm_a.shape[1:]
    chunks = length // half
    # Rows of the flat metric: A token a is row 2a, B token j row 2j + 1. Sort padding reads
    # some real row: its code matches no real token, so its scores are masked (B) or land in
    # dropped columns (A).
    flat = metric.reshape(batch * n, dim)
    groups = batch * tables
    # Sort padding (index >= num_a / num_b) is clamped onto the last real row.
    # reshape, not view: under torch.compile the sort's output may be laid out differently.
    row_a = (perm_a * 2).clamp_(max=n - 1).add_(offsets).reshape(groups, length)
    row_b = (cand_b * 2 + 1).clamp_(max=n - 1).add_(offsets).reshape(groups, chunks * window)
    code_a = sorted_code_a.reshape(groups, chunks, half, 1)
    code_b = cand_code.reshape(groups, chunks, 1, window)
    cand_b = cand_b.reshape(groups, chunks, window)

    def score(sl: slice) -> Tuple[torch.Tensor, torch.Tensor]:
        """Best same-code candidate of each A token in the groups ``sl``: (score, B index)."""
        xa = flat.index_select(0, row_a[sl].reshape(-1)).view(-1, half, dim)
        xb = flat.index_select(0, row_b[sl].reshape(-1)).view(-1, window, dim)
        scores = torch.bmm(xa, xb.transpose(1, 2)).view(-1, chunks, half, window)
        scores.masked_fill_(code_a[sl] != code_b[sl], NEG_INF)
        v, arg = scores.max(dim=-1)  # [g, chunks, half]
        return v, cand_b[sl].gather(2, arg)

    # Score in slabs of (image, table) groups small enough to stay in cache: the gathered rows
    # are written and read back at once instead of streaming through memory.
    slabs = max(1, round(groups * (length + chunks * window) / SLAB_ROWS))
    step = -(-groups // slabs)
    # Slabs are for CPU caches; on a GPU each slab is ~10 more kernel launches, and a compiled
    # graph fuses the gathers: one pass there.
    if step >= groups or _compiling() or metric.device.type != "cpu":
        return score(slice(None))
    val = metric.new_empty(groups, chunks, half)
    partner = cand_b.new_empty(groups, chunks, half)
    for g in range(0, groups, step):
        sl = slice(g, g + step)
        val[sl], partner[sl] = score(sl)
    return val, partner


@functools.lru_cache(maxsize=64)
def _fallback_cols(n: int, keep_first: int, device: str, count: int = FALLBACK_B) -> torch.Tensor:
    """The ``count`` eligible B tokens (indices into B) spread evenly where fallback edges end."""
    num_b = n // 2
    first = keep_first // 2  # protected B tokens come first
    count = max(1, min(count, num_b - first))
    return torch.linspace(first, num_b - 1, count).round().long().to(device)


def fallback_partners(
    metric: torch.Tensor, keep_first: int, count: int = FALLBACK_B
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each A token's most similar B token among ``count`` eligible B tokens spread evenly.

    Static work (``[B, NA, count]`` scores): used for A tokens without a bucket-mate, so that an
    image always has r edges and the output width never depends on the data.
    """
    n = metric.shape[1]
    cols = (_fallback_cols.__wrapped__ if _compiling() else _fallback_cols)(n, keep_first, str(metric.device), count)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    with _full_precision(metric.device):
        scores = unit[:, 0::2].float() @ unit[:, 1::2].index_select(1, cols).float().transpose(1, 2)
    val, arg = scores.max(dim=-1)
    return val, cols[arg]


@torch.no_grad()
@matcher
def lsh_soft_matching(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                      padded: Optional[bool] = None, attn: Optional[torch.Tensor] = None, fallback: bool = True,
                      **options: object) -> MergeResult:
    """Merge r tokens, each A token into its best B bucket-mate (see module doc).

    Called as every matcher (``core.matcher``): ``metric`` [B, N, C] similarity features, ``r``
    tokens to remove (clamped to half of the unprotected tokens), ``class_token`` / ``protected``
    the leading tokens never merged, ``size`` / ``padded`` as for ``lsh_partners``; ``attn`` is
    unused (hashing needs none).

    Args:
        fallback: A tokens without a bucket-mate get a fallback edge (module doc), so every image
            merges exactly r tokens and the width is static; False: such images merge fewer and
            the batch is padded to the widest image (a device read).
        options: the hashing options of ``lsh_partners``
            (``lsh_bits``, ``lsh_tables``, ``lsh_window``, ``lsh_chunk``, ``seed``, ``planes``,
            ``backend``; see ``MergeConfig``).
    """
    n = metric.shape[1]
    r = min(r, (n - keep_first) // 2)
    if r <= 0:
        return identity_merge(n)
    found = lsh_partners(metric, protected=keep_first, size=size, padded=padded, native_fallback=fallback, **options)
    if len(found) == 4:  # the C kernel placed the fallback edges: no padding, r edges per image
        best, partner, _, missing_count = found
        result = assign_top_r(best, partner, r, n, None, exact_r=True, protected=keep_first)
        free = (n + 1) // 2 - (keep_first + 1) // 2  # eligible A tokens
        result.fallback = missing_count.sub_(free - r).clamp_(min=0)  # fallback edges are ranked last
        return result
    best, partner, real = found
    missing = None
    if fallback and real is None:
        fb_best, fb_partner = fallback_partners(metric, keep_first)
        missing = best == NEG_INF
        if keep_first:  # protected A tokens stay without an edge
            missing[:, : (keep_first + 1) // 2] = False
        bucket_edges = ((best > NEG_INF) & ~missing).sum(dim=1)
        best = torch.where(missing, fb_best.to(best.dtype) - FALLBACK_OFFSET, best)
        partner = torch.where(missing, fb_partner, partner)
    result = assign_top_r(best, partner, r, n, real, exact_r=missing is not None, protected=keep_first)
    if missing is not None:
        result.fallback = (r - bucket_edges).clamp(min=0)  # fallback edges are ranked last
    return result
