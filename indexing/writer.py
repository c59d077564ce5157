"""The one ingest writer: every run that adds rows to an index (``index``, ``import-features``,
``merge-index``, the Ray driver) writes through :class:`IndexWriter`.

It opens the index (``IndexStore.open_for_write``: lock, identity check, recovery), says which
sources are already current, buffers finished sources and commits them as one shard when
``shard_rows`` rows are buffered or ``commit_every_s`` has passed, writes each side channel's file
for a shard right after its commit (thumbnails today; a channel is anything with ``write`` and
``drop``), and at the end switches a ``force`` generation in and brings the FAISS index up to date
(appending the new rows to the delta when it can, else rebuilding). What it did is in :attr:`stats`.

The FAISS state of an index folder is ``index.faiss`` (the main index, of the manifest's type) plus
``index.delta.faiss`` (an exact ``IDMap2,Flat`` of the rows added since the main one was saved).
An add writes only the delta (its old rows and the new ones; the main file is not opened for
writing, not even read: the ids it holds come from its tail, ``faiss_index.file_ids``), then the
manifest that lists both files' sizes. When the delta holds more than ``faiss_index.delta_limit``
(10% of the main index, at most 100k vectors), it is folded into the main index instead: one
rewrite of index.faiss, no training (IVF: into the trained lists; HNSW: into the graph), and the
delta file goes. A rebuild (new type, a re-indexed source, ``auto`` moving to another type)
writes index.faiss alone. Every step is recoverable from the shards: a delta that is missing,
damaged or stale is made again from the live rows the main index lacks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from mergeseek.errors import ConfigError, DamagedIndexError
from mergeseek.indexing.faiss_index import (
    add_to_index, build_index, delta_contents, delta_limit, file_ids, held_ids, live_ids_by_shard, load_index, make_delta,
    read_rows, save_index,
)
from mergeseek.indexing.store import EncodedSource, IndexStore
from mergeseek.indexing.thumbs import ThumbCollector

log = logging.getLogger(__name__)


class SideChannel(Protocol):
    """Per-row data written beside a shard right after its commit (thumbnails, later OCR/ASR text)."""

    def write(self, root: Path, shard: str, items: Sequence[EncodedSource], ids: np.ndarray) -> object: ...

    def drop(self, key: str) -> None: ...


@dataclass
class WriteStats:
    """What an :class:`IndexWriter` committed (sources, rows, their video ids) and the seconds it spent."""

    sources: int = 0
    rows: int = 0
    video_ids: list = field(default_factory=list)
    write_s: float = 0.0
    faiss_s: float = 0.0


class IndexWriter:
    """Buffered, resumable writes into one index folder (see the module docstring).

    Args:
        identity: model, pretrained, merge, precision, dim (refused when the index has others, unless ``force``).
        index_type: FAISS factory string or ``auto``; None keeps the index's type (``Flat`` when new).
        force: write a new generation that replaces the old one in :meth:`finish` (when it holds a source).
        memory_budget: bytes the FAISS index may use (``auto`` type only).
        ngpu: GPUs for building FAISS (-1: all there are).
        settings: informational ``sampling``/``dedup`` recorded in the manifest and each shard.
        shard_rows / commit_every_s: commit once this many rows are buffered, or this long after the last commit.
        on_commit: called with the committed source keys after every commit (progress hooks, tests).
    """

    def __init__(self, root: Path, identity: dict, *, index_type: Optional[str] = None, force: bool = False,
                 memory_budget: Optional[int] = None, ngpu: int = -1, settings: Optional[dict] = None,
                 shard_rows: int = 65536, commit_every_s: float = math.inf,
                 on_commit: Optional[Callable[[list], None]] = None):
        self.store = IndexStore.open_for_write(Path(root), identity, index_type, force, memory_budget)
        self.ngpu, self.settings = ngpu, dict(settings or {})
        self.shard_rows, self.commit_every_s, self.on_commit = shard_rows, commit_every_s, on_commit
        self.replaced = False  # a committed source replaced rows of the index: index.faiss is rebuilt, not appended to
        self.thumbs = ThumbCollector()
        self.channels: list[SideChannel] = [self.thumbs]
        self.text: dict = {}  # channel name -> indexing.text.TextChannel (--ocr)
        self.buffer: list[EncodedSource] = []
        self.new_shards: list[str] = []
        self.stats = WriteStats()
        self._last_commit = time.perf_counter()

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.store.__exit__(exc_type, exc, tb)

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def manifest(self):
        return self.store.manifest

    def add_text_channel(self, channel) -> None:
        """Store ``channel``'s per-frame text (an ``indexing.text.TextChannel``) beside every shard."""
        self.text[channel.channel] = channel
        self.channels.append(channel)

    def is_current(self, key: str, fingerprint: str, recipe: str) -> bool:
        """The index holds ``key`` made from the same file (``fingerprint``) the same way (``recipe``)."""
        return self.store.is_current(key, fingerprint, recipe)

    # ------------------------------------------------------------------ buffering and commits
    def add(self, source: EncodedSource, thumbs: Optional[list] = None) -> None:
        """Buffer a finished source (its rows in frame order; ``thumbs``: one JPEG per row, if known)."""
        if thumbs is not None:
            self.thumbs.add(source.key, thumbs)
        self.replaced = self.replaced or source.key in self.store.manifest.sources
        self.buffer.append(source)

    def drop(self, key: str) -> None:
        """Forget what the side channels hold for a source that failed before it was added."""
        for channel in self.channels:
            channel.drop(key)

    @property
    def buffered_rows(self) -> int:
        return sum(len(e.frame_idx) for e in self.buffer)

    def commit_if_due(self) -> None:
        if self.buffer and (self.buffered_rows >= self.shard_rows
                            or time.perf_counter() - self._last_commit >= self.commit_every_s):
            self.commit()

    def flush(self) -> None:
        if self.buffer:
            self.commit()

    def commit(self) -> None:
        """Commit the buffer as one shard, then each side channel's file for it."""
        t0 = time.perf_counter()
        ids = self.store.commit(self.buffer, self.settings)
        if len(ids):
            self.new_shards.append(self.store.last_shard)
            for channel in self.channels:
                channel.write(self.store.root, self.new_shards[-1], self.buffer, ids)
        self.stats.write_s += time.perf_counter() - t0
        committed = [e for e in self.buffer if len(e.frame_idx)]
        self.stats.sources += len(committed)
        self.stats.rows += int(len(ids))
        self.stats.video_ids += [e.video_id for e in committed]
        keys = [e.key for e in self.buffer]
        self.buffer, self._last_commit = [], time.perf_counter()
        if self.on_commit is not None:
            self.on_commit(keys)

    # ------------------------------------------------------------------ the end of a run
    def finish(self) -> None:
        """Commit what is buffered, switch a ``force`` generation in and bring ``index.faiss`` up to date."""
        self.flush()
        self.store.finish()  # --force: the new generation replaces the old one only now, and only when it holds a source
        t0 = time.perf_counter()
        refresh_faiss(self.store, self.new_shards, not self.replaced, self.ngpu)
        self.stats.faiss_s += time.perf_counter() - t0


def refresh_faiss(store: IndexStore, new_shards: list, can_append: bool, ngpu: int = -1) -> None:
    """Make the FAISS state match the committed shards: append the rows it lacks to the delta when it
    can (folding the delta into index.faiss past ``delta_limit``), else rebuild index.faiss.

    Appending never trains and never writes index.faiss. Which rows are missing is read from the ids
    the saved files hold, so the rows committed by a run killed before this step are appended by the
    next run too. It rebuilds instead when index.faiss holds a row that is no longer live (a
    re-indexed source), was invalidated by a new --index-type (``faiss_generation`` -1), cannot be
    read, or ``auto`` moves to another type."""
    m = store.manifest
    if store.faiss_is_current() and not new_shards:
        return
    saved = _appendable(store, can_append)
    if saved is not None and len(saved.missing) and _auto_type_changes(store, saved.main_rows):
        saved = None
    if saved is not None and _append(store, saved):
        return
    ids, vecs = store.read_vectors()
    if len(ids) == 0:
        return
    try:
        index = build_index(vecs, ids, m.index_type, ngpu=ngpu, memory_budget=m.memory_budget)
    except ConfigError as exc:  # e.g. an IVF with more lists than vectors: keep the type it had
        _keep_previous_type(store, ids, vecs, ngpu, exc)
    save_main(store, index)


@dataclass
class _Saved:
    """What an append starts from: the main index's row count, the delta to extend (loaded, or new
    when there was none or it was unusable), and the live ids neither holds."""

    main_rows: int
    delta: object
    from_file: bool
    missing: np.ndarray
    by_shard: dict


def _appendable(store: IndexStore, can_append: bool) -> Optional[_Saved]:
    """The state to append to, or None when index.faiss must be rebuilt (see :func:`refresh_faiss`)."""
    m = store.manifest
    if not can_append or store.staged or not store.faiss_path.is_file() or m.faiss_generation < 0:
        return None
    held = _main_ids(store)
    if held is None:
        return None
    by_shard = live_ids_by_shard(store)
    live = np.concatenate(list(by_shard.values())) if by_shard else np.zeros(0, np.int64)
    if len(np.unique(held)) != len(held) or not np.isin(held, live).all():
        return None  # it holds a row that is no longer live
    rest = live[~np.isin(live, held)]
    delta, from_file = _saved_delta(store, rest)
    return _Saved(len(held), delta, from_file, rest[~np.isin(rest, held_ids(delta))], by_shard)


def _main_ids(store: IndexStore) -> Optional[np.ndarray]:
    """The ids index.faiss holds: from its tail when its size is the one the manifest recorded (no
    load), else from loading it (it was replaced by a run killed before its manifest); None: unusable."""
    path = store.faiss_path
    if path.stat().st_size == store.manifest.faiss_size:
        ids = file_ids(path)
        if ids is not None:
            return ids
        log.warning("index file %s is damaged (not an IndexIDMap2); rebuilding it", path)
        return None
    try:
        return held_ids(load_index(path))
    except DamagedIndexError as exc:  # derived data: rebuilt from the shards
        log.warning("%s; rebuilding it", str(exc).split(";")[0])
        return None


def _saved_delta(store: IndexStore, rest: np.ndarray) -> tuple[object, bool]:
    """(the delta file's index, True) when it holds only live rows index.faiss lacks, each once;
    else (an empty delta, False): a damaged one with one warning, a stale one quietly."""
    path, dim = store.delta_path, store.manifest.dim
    if not path.is_file():
        return make_delta(dim), False
    try:
        delta = load_index(path)
    except DamagedIndexError as exc:
        log.warning("%s; rebuilding it from the shards", str(exc).split(";")[0])
        return make_delta(dim), False
    ids = held_ids(delta) if hasattr(delta, "id_map") and delta.d == dim else None
    if ids is None or len(np.unique(ids)) != len(ids) or not np.isin(ids, rest).all():
        log.info("%s is stale (rows index.faiss holds, or gone); made again from the shards", path.name)
        return make_delta(dim), False
    return delta, True


def _append(store: IndexStore, saved: _Saved) -> bool:
    """Add the missing rows to the delta and save it (index.faiss untouched), or fold past the bound;
    False when index.faiss turns out unreadable while folding (the caller rebuilds it)."""
    delta = saved.delta
    if len(saved.missing):
        ids, vecs = read_rows(store, saved.missing, saved.by_shard)
        add_to_index(delta, vecs, ids)
    if delta.ntotal > delta_limit(saved.main_rows):
        log.info("the delta holds %d vectors, over %d for %d in index.faiss: folding it in (no training)",
                 delta.ntotal, delta_limit(saved.main_rows), saved.main_rows)
        try:
            index = load_index(store.faiss_path)
        except DamagedIndexError as exc:
            log.warning("%s; rebuilding it", str(exc).split(";")[0])
            return False
        ids, vecs = delta_contents(delta)
        add_to_index(index, vecs, ids)
        save_main(store, index)
        return True
    if delta.ntotal == 0:
        store.drop_delta()
    elif len(saved.missing) or not saved.from_file:
        log.info("appending %d vectors to %s (%d in it; index.faiss untouched, no training)", len(saved.missing),
                 store.delta_path.name, delta.ntotal)
        save_index(delta, store.delta_path)
    store.write_manifest(faiss_current=True)
    return True


def save_main(store: IndexStore, index) -> None:
    """Save ``index`` as index.faiss holding every live row: the delta goes first (a run killed after
    that leaves index.faiss's rows plus the shards, enough to make the delta again), then the file,
    then the manifest that lists it alone."""
    if not store.staged:
        store.drop_delta()
    save_index(index, store.faiss_path)
    store.write_manifest(faiss_current=True)


def fold_into_main(store: IndexStore, live_ids: np.ndarray, index=None) -> Optional[int]:
    """Make index.faiss hold every live row without training (``compact``, ``repair``): the rows it
    lacks (the delta's, an interrupted run's) are read from the shards and added, then it is saved
    and the delta removed. Returns how many were added, or None when index.faiss is missing,
    damaged or holds rows that are gone (the caller rebuilds it). ``index``: already loaded."""
    if index is None:
        if not store.faiss_path.is_file():
            return None
        try:
            index = load_index(store.faiss_path)
        except DamagedIndexError:
            return None
    if not hasattr(index, "id_map"):
        return None
    live = np.asarray(live_ids, np.int64)
    held = held_ids(index)
    if len(np.unique(held)) != len(held) or not np.isin(held, live).all():
        return None
    missing = live[~np.isin(live, held)]
    if len(missing) or store.delta_path.is_file():
        if len(missing):
            ids, vecs = read_rows(store, missing)
            add_to_index(index, vecs, ids)
        save_main(store, index)
    return int(len(missing))


def _keep_previous_type(store: IndexStore, ids: np.ndarray, vecs: np.ndarray, ngpu: int, exc: ConfigError) -> None:
    """A new --index-type that cannot be built here is not stored: index.faiss keeps the previous type."""
    m = store.manifest
    asked, m.index_type = m.index_type, store.previous_index_type
    save_main(store, build_index(vecs, ids, m.index_type, ngpu=ngpu, memory_budget=m.memory_budget))
    raise ConfigError(f"{exc}. The vectors are committed and index.faiss was built as {m.index_type}, the index "
                      f"type it keeps; run `cli.py index` again with another --index-type than {asked!r} "
                      "to switch (no re-encoding)") from None


def _auto_type_changes(store: IndexStore, main_rows: int) -> bool:
    """With --index-type auto, True when the live rows call for another FAISS type than the one chosen
    for index.faiss's ``main_rows`` (rebuild)."""
    from mergeseek.indexing.faiss_index import AUTO, choose_index_type

    m = store.manifest
    if m.index_type.lower() != AUTO:
        return False
    total = m.counts()["vectors"]
    return choose_index_type(total, m.dim, m.memory_budget) != choose_index_type(main_rows, m.dim, m.memory_budget)


__all__ = ["IndexWriter", "SideChannel", "WriteStats", "fold_into_main", "refresh_faiss", "save_main"]
