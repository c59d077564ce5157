"""Stored vectors by id, and search inside one video (``search --video ID``).

``StoredVectors`` memory-maps each shard's vectors (through the store's public ``shard_paths`` /
``read_shard``) and finds a live frame's vector by its id: relevance feedback
(``retrieval.feedback``), "more like this" in the web app and the in-video search read it.

Inside one video the search is exact whatever the index type: the video's stored vectors times
the query (a few thousand frames per video), so it never misses a frame an approximate index would
skip, and costs O(frames of the video), not O(index).
"""

from __future__ import annotations

import unicodedata
from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import InputError


class StoredVectors:
    """The vectors of an index's live rows, by id (read-only, memory-mapped).

    Args:
        store: an ``indexing.store.IndexStore``.
        live_ids: the ids a lookup may return (the searcher's live rows); others are unknown.
    """

    def __init__(self, store, live_ids: np.ndarray):
        self.root = store.root
        self._emb, ids, shard_no, rows = [], [], [], []
        for s, shard in enumerate(store.shard_names()):
            emb_path, _ = store.shard_paths(shard)
            self._emb.append(np.load(emb_path, mmap_mode="r"))
            shard_ids = store.read_shard(shard, columns=["id"], live=False).column("id").to_numpy()
            ids.append(shard_ids)
            shard_no.append(np.full(len(shard_ids), s, np.int32))
            rows.append(np.arange(len(shard_ids), dtype=np.int64))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        live = np.isin(all_ids, np.asarray(live_ids, np.int64))
        o = np.argsort(all_ids[live], kind="stable")
        self._ids = all_ids[live][o]
        self._shard = np.concatenate(shard_no)[live][o] if ids else np.zeros(0, np.int32)
        self._row = np.concatenate(rows)[live][o] if ids else np.zeros(0, np.int64)

    def __contains__(self, id_) -> bool:
        i = int(np.searchsorted(self._ids, int(id_)))
        return i < len(self._ids) and self._ids[i] == int(id_)

    def get(self, ids: Sequence[int], what: str = "frame id") -> np.ndarray:
        """float32 [len(ids), dim]; one ``InputError`` naming the ids this index does not hold."""
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in self]
        if missing:
            raise InputError(f"no frame with {what} {', '.join(map(str, missing[:10]))} in index {self.root}; "
                             "use the ids of this index's results (search --json gives them)")
        out = []
        for i in ids:
            j = int(np.searchsorted(self._ids, i))
            out.append(np.asarray(self._emb[self._shard[j]][self._row[j]], np.float32))
        return np.stack(out) if out else np.zeros((0, 0), np.float32)


def stored_vectors(searcher) -> StoredVectors:
    """The searcher's ``StoredVectors`` (built once, kept on it)."""
    if getattr(searcher, "_stored", None) is None:
        if hasattr(searcher, "stores") and len(searcher.stores) > 1:
            raise InputError("frame ids of several --shard folders cannot be looked up; search one index for this")
        searcher._stored = StoredVectors(searcher.store, searcher._ids)
    return searcher._stored


def video_rows(searcher, video_id: str) -> np.ndarray:
    """Row numbers (into the searcher's metadata) of ``video_id``'s frames; one line for an unknown video."""
    stored = resolve_video(searcher, video_id)  # builds the map first
    return searcher._rows_by_video[stored]


def resolve_video(searcher, video_id: Optional[str]) -> Optional[str]:
    """``video_id`` as the searcher's index spells it (None stays None); one line for an unknown video."""
    if video_id is None:
        return None
    if getattr(searcher, "_rows_by_video", None) is None:
        names, inverse = np.unique(np.asarray(searcher._video, dtype=object), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(names) + 1))
        searcher._rows_by_video = {str(v): order[bounds[i]:bounds[i + 1]] for i, v in enumerate(names)}
    stored = match_video(video_id, searcher._rows_by_video)
    if stored is None:
        raise unknown_video(video_id, searcher.store.root, searcher._rows_by_video)
    return stored


def match_video(video_id: str, known) -> Optional[str]:
    """The stored spelling of ``video_id`` among ``known`` ids, or None. Exact, except for how the
    characters are encoded and surrounding blanks: a name typed in composed Unicode (NFC, what
    keyboards give: "Phở") finds a file named in decomposed form (NFD, what macOS file systems
    store) and the other way round; any other difference is another video."""
    given = str(video_id)
    if given in known:
        return given
    want = unicodedata.normalize("NFC", given.strip())
    found = [k for k in known if unicodedata.normalize("NFC", str(k)) == want]
    return str(found[0]) if len(found) == 1 else None


def unknown_video(video_id: str, root, known) -> InputError:
    """The one-line error for a video id the index at ``root`` (holding ``known`` ids) lacks."""
    known = sorted(map(str, known))
    return InputError(f"no video {video_id!r} in index {root}; it holds {len(known)} video(s), e.g. "
                      f"{', '.join(known[:5])}")


def preflight(index_dir, video: Optional[str] = None, channels: Sequence[str] = (), ids: Sequence[int] = ()) -> None:
    """Refuse, before any model loads, a query that names what the index does not hold: an unknown
    ``--video``, a text channel (``"ocr"``, ``"asr"``) it was not indexed with, or frame ids
    (``--like`` / ``--unlike``) that are not live rows. Reads the metadata and the text index only."""
    from pathlib import Path

    from mergeseek.indexing.store import IndexStore

    if video is None and not channels and not len(ids):
        return
    store = IndexStore.open_for_read(Path(index_dir))
    if video is not None or len(ids):
        meta = store.read_meta(columns=["id", "video_id"])
        if video is not None:
            known = set(meta.column("video_id").to_pylist())
            if match_video(video, known) is None:
                raise unknown_video(video, store.root, known)
        missing = sorted(set(int(i) for i in ids) - set(meta.column("id").to_pylist()))
        if missing:
            raise InputError(f"no frame with frame id {', '.join(map(str, missing[:10]))} in index {store.root}; "
                             "use the ids of this index's results (search --json gives them)")
    if channels:
        from mergeseek.indexing.text import open_text_index
        from mergeseek.retrieval.hybrid import require_channel

        ix = open_text_index(store.root, store.shard_names())
        try:
            for channel in channels:
                require_channel(ix, store.root, channel)
        finally:
            if ix is not None and hasattr(ix, "close"):
                ix.close()


def search_in_video(searcher, vector: np.ndarray, video_id: str, k: Optional[int] = 20,
                    exclude: Sequence[int] = ()) -> list:
    """The frames of ``video_id`` nearest to ``vector`` (float32 [1, dim]), exactly, best first;
    ``k`` None: all of them. ``exclude``: ids left out."""
    rows = video_rows(searcher, video_id)
    ids = np.asarray(searcher._ids)[rows]
    if len(exclude):
        ids = ids[~np.isin(ids, np.asarray(list(exclude), np.int64))]
    if len(ids) == 0:
        return []
    vecs = stored_vectors(searcher).get(ids)
    scores = vecs @ np.asarray(vector, np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")[: len(ids) if k is None else int(k)]
    return searcher._hits(scores[order].astype(np.float32), ids[order])


__all__ = ["StoredVectors", "match_video", "preflight", "resolve_video", "search_in_video", "stored_vectors",
           "unknown_video", "video_rows"]
