"""Unmerge for dense heads: give every original token position the value of the merged token it
now lives in (``MergeConfig.unmerge``; ToMe for Stable Diffusion's unmerge, kept across blocks).

A patched forward with ``unmerge=true`` carries one int map per image, ``index [B, N0]``: the
current slot of every original position (N0 = the tokens entering the first block). It starts
as ``arange(N0)``; each merge moves it on through the matcher's slots (``slot[b, i]``: the output
slot of input token i, :func:`token_slots`) with one gather, ``index = slot.gather(1, index)``;
reading the grid is one more gather, ``x.gather(1, index)``. Shapes are static, nothing is read
back to the host, and merges chain: a position merged twice follows both merges.

A dropped token (``prune=on``) goes to slot ``width`` (one past the last): it keeps that slot
through later merges, and its position reads a zero vector (there is no merged token to copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeseek.encoders.merging.registry import MergeResult


def start_index(x: torch.Tensor) -> torch.Tensor:
    """[B, N] long: every position in its own slot (the tokens ``x`` [B, N, C] entering the first block)."""
    b, n = x.shape[:2]
    return torch.arange(n, device=x.device).expand(b, n)


def token_slots(result: MergeResult, batch: int, device=None) -> torch.Tensor:
    """[B, N] long: the output slot of every input token of one merge (``result.width``: dropped).

    From the matcher's own ``slot`` when it has one; otherwise read off ``unmerge`` applied to the
    slot numbers (``unmerge`` gathers each input token's slot row, so it returns the slot; a token
    that ``unmerge`` zeroes, a dropped one, is given ``width``).
    """
    if result.slot is not None:
        return result.slot()
    numbers = torch.arange(1, result.width + 1, device=device, dtype=torch.float32)
    got = result.unmerge(numbers.expand(batch, result.width)[..., None])[..., 0]
    got = torch.where(got > 0, got - 1, torch.full_like(got, float(result.width)))
    return got.round().long()


def advance(index: torch.Tensor, result) -> torch.Tensor:
    """``index`` after one merge (``result``: the block's MergeResult, or 0 / an identity: unchanged)."""
    if not isinstance(result, MergeResult) or result.identity:
        return index
    slot = token_slots(result, index.shape[0], index.device)
    # one more entry so that an already-dropped position (== old width) stays dropped (== new width)
    slot = F.pad(slot, (0, 1), value=result.width)
    return slot.gather(1, index)


def unmerge_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, N0, C]: each original position's merged token (zero for dropped positions)."""
    b, n0 = index.shape
    c = x.shape[-1]
    padded = F.pad(x, (0, 0, 0, 1))  # slot ``width``: the zero row of dropped positions
    return padded.gather(1, index[..., None].expand(b, n0, c))
