"""Pairs where a block merges many of its tokens, ToMe's bipartite where it merges few
(``method=pairs_mix``, ``method=pairs_mix_lsh``; issue #26).

On the CIFAR-10 references one-to-one greedy pairs (:mod:`encoders.merging.pairs`) beat ToMe's
bipartite matching when a block removes a large share of its tokens (the last blocks of a -50%
FLOP schedule, where ToMe piles several A tokens into one B token), and lose a little when it
removes few (r=4: every token has many good partners and ToMe's positional split costs nothing).
This rule asks, per block and from shapes only (so no device read and a static width):

    r_block >= PAIRS_FROM * (unprotected tokens entering the block)  ->  pairs
    otherwise                                                         ->  bipartite (ToMe, exact)

``PAIRS_FROM`` was chosen on half A of the CIFAR-10 test set (docs/BENCHMARKS.md, issue #26,
fourth round). The hashed variant uses ``pairs_lsh`` and ``lsh`` (ToMe's split with the hashed
partner search) on the same two sides of the threshold.
"""

from __future__ import annotations

from typing import Optional

import torch

from mergeseek.encoders.merging.bipartite import bipartite_soft_matching
from mergeseek.encoders.merging.core import identity_merge, matcher
from mergeseek.encoders.merging.lsh import lsh_soft_matching
from mergeseek.encoders.merging.pairs import pairs_lsh_merging, pairs_merging
from mergeseek.encoders.merging.registry import MergeResult

PAIRS_FROM = 0.05  # pairs where a block removes at least this share of its unprotected tokens


def uses_pairs(r: int, num_tokens: int, keep_first: int, threshold: float = PAIRS_FROM) -> bool:
    """Whether a block removing ``r`` of ``num_tokens`` tokens (``keep_first`` protected) pairs."""
    free = num_tokens - keep_first
    return free > 0 and r >= threshold * free - 1e-9  # a product such as 0.07 * 100 is 7.000000000000001


def _by_share(above, below, metric: torch.Tensor, r: int, keep_first: int, threshold: float, **kwargs) -> MergeResult:
    """``above`` where the block pairs (:func:`uses_pairs`), else ``below``; nothing at r <= 0."""
    n = metric.shape[1]
    if r <= 0:
        return identity_merge(n)
    fn = above if uses_pairs(r, n, keep_first, threshold) else below
    return fn(metric, r, protected=keep_first, **kwargs)


@torch.no_grad()
@matcher
def pairs_mix_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                      padded: Optional[bool] = None, threshold: float = PAIRS_FROM, **_: object) -> MergeResult:
    """``pairs`` where ``r`` is at least ``threshold`` of the unprotected tokens, else ``bipartite``
    (module doc). Called as every matcher (``core.matcher``)."""
    return _by_share(pairs_merging, bipartite_soft_matching, metric, r, keep_first, threshold, size=size, padded=padded)


@torch.no_grad()
@matcher
def pairs_mix_lsh_merging(metric: torch.Tensor, r: int, keep_first: int, *, size: Optional[torch.Tensor] = None,
                          padded: Optional[bool] = None, threshold: float = PAIRS_FROM, **options: object) -> MergeResult:
    """The hashed rule: ``pairs_lsh`` above the threshold, ``lsh`` below (module doc); ``planes``
    and the ``lsh_*`` options as for ``method=lsh``."""
    return _by_share(pairs_lsh_merging, lsh_soft_matching, metric, r, keep_first, threshold, size=size, padded=padded,
                     **options)
