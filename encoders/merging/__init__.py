"""Token-merging algorithms as pure tensor functions.

Every matcher has one signature, ``(metric[B,N,C], r, class_token=True, **options) -> (merge,
unmerge)``, so the patches, the benchmarks and new methods can swap them freely.
"""

from encoders.merging.bipartite import bipartite_partners, bipartite_soft_matching
from encoders.merging.core import assign_top_r, merge_from_assignment, merge_wavg
from encoders.merging.importance import assignment_from_keep, importance_merging
from encoders.merging.lsh import lsh_partners, lsh_soft_matching, simhash_planes
from encoders.merging.zerotprune import weighted_pagerank, zerotprune_merging

# method name -> matcher; a matcher's ``needs`` says what the patch must hand it besides the
# metric: "keys" (nothing more), "cls_attn" (class-token attention row) or "attn" (full matrix).
MATCHERS = {
    "bipartite": bipartite_soft_matching,
    "lsh": lsh_soft_matching,
    "importance": importance_merging,
    "zerotprune": zerotprune_merging,
}

__all__ = [
    "MATCHERS",
    "assign_top_r",
    "assignment_from_keep",
    "bipartite_partners",
    "bipartite_soft_matching",
    "importance_merging",
    "lsh_partners",
    "lsh_soft_matching",
    "merge_from_assignment",
    "merge_wavg",
    "simhash_planes",
    "weighted_pagerank",
    "zerotprune_merging",
]
