"""Encoders: open_clip / timm ViTs with token merging.

Public API::

    from mergeseek.encoders import Encoder, MergeConfig, apply_merging, remove_merging, token_counts
"""

from mergeseek.encoders.config import MergeConfig, parse_merges
from mergeseek.encoders.encoder import Encoder, load_open_clip
from mergeseek.encoders.patch import apply_merging, merge_stats, remove_merging, token_counts

__all__ = [
    "Encoder",
    "MergeConfig",
    "apply_merging",
    "load_open_clip",
    "merge_stats",
    "parse_merges",
    "remove_merging",
    "token_counts",
]
