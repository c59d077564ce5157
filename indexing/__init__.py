"""Ingest videos, keyframe folders and image folders into an on-disk FAISS + parquet index.

Public API (heavy libraries load lazily, inside the functions)::

    from mergeseek.indexing import index_paths, IndexOptions, Sampling, Dedup, IndexStore
    report = index_paths(["videos/"], "my_index", encoder, IndexOptions(sampling=Sampling.parse("fps=1")))
"""

from mergeseek.indexing.dedup import Dedup
from mergeseek.indexing.pipeline import IndexOptions, IndexReport, index_paths
from mergeseek.indexing.sampling import Sampling
from mergeseek.indexing.sources import BadInput, Frame, MediaSource, SourceReader, discover
from mergeseek.indexing.store import IndexStore, Manifest

__all__ = [
    "BadInput",
    "Dedup",
    "Frame",
    "IndexOptions",
    "IndexReport",
    "IndexStore",
    "Manifest",
    "MediaSource",
    "Sampling",
    "SourceReader",
    "discover",
    "index_paths",
]
