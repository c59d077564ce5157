"""Token-merging algorithms as pure tensor functions.

Every matcher has one signature, ``(metric[B,N,C], r, class_token=True, **options) ->
MergeResult`` (which also unpacks as ``merge, unmerge``), so the patches, the benchmarks and new
methods can swap them freely. Each method is one ``MatcherSpec`` in
:mod:`encoders.merging.registry` (``REGISTRY``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from mergeseek.encoders.merging.bipartite import bipartite_partners, bipartite_soft_matching
from mergeseek.encoders.merging.core import assign_top_r, merge_from_assignment, merge_wavg
from mergeseek.encoders.merging.importance import assignment_from_keep, importance_merging
from mergeseek.encoders.merging.lsh import fallback_partners, lsh_partners, lsh_soft_matching, simhash_planes
from mergeseek.encoders.merging.registry import REGISTRY, MatcherSpec, MergeResult, get_spec, register
from mergeseek.encoders.merging.zerotprune import weighted_pagerank, zerotprune_merging


class _MatcherView(Mapping):
    """``MATCHERS[name]`` -> the registered matcher function (a read-only view of ``REGISTRY``)."""

    def __getitem__(self, name: str) -> Callable:
        return get_spec(name).fn

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


MATCHERS: Mapping[str, Callable] = _MatcherView()

__all__ = [
    "MATCHERS",
    "REGISTRY",
    "MatcherSpec",
    "MergeResult",
    "assign_top_r",
    "assignment_from_keep",
    "bipartite_partners",
    "bipartite_soft_matching",
    "fallback_partners",
    "get_spec",
    "importance_merging",
    "lsh_partners",
    "lsh_soft_matching",
    "merge_from_assignment",
    "merge_wavg",
    "register",
    "simhash_planes",
    "weighted_pagerank",
    "zerotprune_merging",
]
