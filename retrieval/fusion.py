"""One query over several indexes of the same media built with different models (``search --fuse``).

``cli.py search "a red car" --index ix_b32 --fuse ix_l14 [--fuse ix_siglip]``: each index encodes
the query with its own model and ranks its frames (its best ``depth`` = ``max(5 k, 100)``); the
rankings are fused by reciprocal rank on the frame's ``(video_id, frame_idx)``, the one RRF of
``retrieval.hybrid.fuse`` (``RRF_K = 60``): a frame scores

    sum over the indexes that ranked it of weight / (60 + rank)

with weight 1 for every index (``weights`` in ``search_fused`` changes that; the CLI uses 1s). A
frame two models agree on outranks one that only one model put first, whatever the scale of each
model's similarities. A hit is the first index's frame (its id, path and metadata) when that index
holds it, ranked or not (otherwise another index's, with id -1), with ``channels`` saying each
index's rank and score.

Same media: every index must hold the same set of video ids (frames may be sampled differently;
only frames at the same ``frame_idx`` fuse); anything else is one ``InputError`` line.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

from mergeseek.errors import InputError
from mergeseek.retrieval.hybrid import RRF_K, fuse
from mergeseek.retrieval.search import Hit, best_per_video


def index_labels(searchers: Sequence) -> list[str]:
    """A short name per index for a hit's ``channels``: its folder name (``name@i`` when names repeat)."""
    names = [Path(s.store.root).name or "index" for s in searchers]
    return [f"{n}@{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_same_media(stores: Sequence) -> None:
    """One line when the indexes (``IndexStore`` s) do not hold the same videos."""
    first = {e.video_id for e in stores[0].manifest.sources.values()}
    for s in stores[1:]:
        other = {e.video_id for e in s.manifest.sources.values()}
        if other != first:
            only_a, only_b = sorted(first - other), sorted(other - first)
            example = f"{only_a[0]!r} only in {stores[0].root}" if only_a else f"{only_b[0]!r} only in {s.root}"
            raise InputError(f"--fuse {s.root} indexes other media than {stores[0].root} "
                             f"({len(only_a) + len(only_b)} video(s) differ, e.g. {example}); fuse indexes of the same "
                             "videos built with different models")


def search_fused(searchers: Sequence, text: str, k: int = 20, per_video: bool = False, depth: Optional[int] = None,
                 weights: Optional[Sequence[float]] = None, k_rrf: int = RRF_K) -> list[Hit]:
    """The best ``k`` frames of ``text`` by RRF of each searcher's ranking (see the module docstring)."""
    if len(searchers) < 2:
        raise InputError("--fuse needs a second index (--fuse DIR)")
    check_same_media([s.store for s in searchers])
    if weights is not None and len(weights) != len(searchers):
        raise InputError(f"{len(weights)} fusion weights for {len(searchers)} indexes; give one per index")
    depth = depth or max(5 * k, 100)
    keys: dict = {}  # (video_id, frame_idx) -> a small int for fuse()
    rankings, hit_of, info = {}, {}, {}
    labels = index_labels(searchers)
    for n, (s, name) in enumerate(zip(searchers, labels)):
        hits = s.search_text(text, k=min(depth, s.size))
        rankings[name] = []
        for rank, h in enumerate(hits, start=1):
            key = keys.setdefault((h.video_id, h.frame_idx), len(keys))
            rankings[name].append(key)
            if key not in hit_of:
                hit_of[key] = h if n == 0 else _in_first(searchers[0], h)  # ids are only the first index's
            info.setdefault(key, {})[name] = {"rank": rank, "score": round(h.score, 6)}
    w = None if weights is None else {name: float(x) for name, x in zip(labels, weights)}
    out = [replace(hit_of[key], score=round(score, 6), channels=info[key]) for key, score, _ in fuse(rankings, k_rrf, w)]
    if per_video:
        out = best_per_video(out)
    return out[:k]


def _in_first(first, h: Hit) -> Hit:
    """``h`` (a frame another index ranked) as the first index's frame when it has one, else with id -1."""
    import numpy as np

    from mergeseek.retrieval.scope import video_rows

    try:
        rows = video_rows(first, h.video_id)
    except InputError:
        return replace(h, id=-1)
    at = rows[np.asarray(first._frame)[rows] == h.frame_idx]
    if len(at) == 0:
        return replace(h, id=-1)
    own = first._hits(np.asarray([h.score], np.float32), np.asarray(first._ids)[at[:1]])[0]
    return own


def open_fused(index_dirs: Sequence[Union[str, Path]], **open_kwargs) -> list:
    """A ``Searcher`` per index, each with the encoder its manifest names (checks the media first)."""
    from mergeseek.indexing.store import IndexStore
    from mergeseek.retrieval.search import Searcher

    check_same_media([IndexStore.open_for_read(Path(d)) for d in index_dirs])  # before minutes of model loading
    kw = {k: v for k, v in open_kwargs.items() if k not in ("model", "pretrained", "merge")}
    return [Searcher.open(d, **kw) for d in index_dirs]


__all__ = ["check_same_media", "index_labels", "open_fused", "search_fused"]
