"""mergeseek: video retrieval with CLIP ViT encoders accelerated by token merging.

The repository's top-level folders are the subpackages of this one package (``mergeseek.encoders``,
``mergeseek.indexing``, ``mergeseek.retrieval``, ``mergeseek.eval``, ``mergeseek.serve``, plus
``mergeseek.cli``, ``mergeseek.errors`` and ``mergeseek.runtime``): pyproject.toml maps this folder
to the package, so an installed mergeseek adds one name to site-packages, not eight.

The names most programs need are importable from here; they load on first use, so that
``import mergeseek`` (and ``mergeseek --help``) stays instant::

    from mergeseek import Encoder, MergeConfig, apply_merging
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "mergeseek.encoders",
    "MergeConfig": "mergeseek.encoders",
    "apply_merging": "mergeseek.encoders",
    "remove_merging": "mergeseek.encoders",
    "token_counts": "mergeseek.encoders",
    "Searcher": "mergeseek.retrieval.search",
    "index_paths": "mergeseek.indexing",
    "MergeseekError": "mergeseek.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergeseek' has no attribute {name!r}")
