"""The one ingest writer: every run that adds rows to an index (``index``, ``import-features``,
``merge-index``, the Ray driver) writes through :class:`IndexWriter`.

It opens the index (``IndexStore.open_for_write``: lock, identity check, recovery), says which
sources are already current, buffers finished sources and commits them as one shard when
``shard_rows`` rows are buffered or ``commit_every_s`` has passed, writes each side channel's file
for a shard right after its commit (thumbnails today; a channel is anything with ``write`` and
``drop``), and at the end switches a ``force`` generation in and brings ``index.faiss`` up to date
(appending the new shards when it can, else rebuilding). What it did is in :attr:`stats`.
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
from mergeseek.indexing.faiss_index import add_to_index, build_index, load_index, save_index
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
    """Make index.faiss match the committed shards: append the shards it lacks when it can, else rebuild.

    Appending adds the missing shards' vectors to the saved index (IVF: to its trained lists, never
    training again; HNSW: into its graph) and writes nothing else: the shards are never rewritten.
    Which shards are missing is read from the ids the saved index holds, so the shards committed by a
    run killed before this step are appended by the next run too. It rebuilds instead when the index
    holds a row that is no longer live (a re-indexed source), covers part of a shard, was invalidated
    by a new --index-type (``faiss_generation`` -1), or ``auto`` moves to another type."""
    m = store.manifest
    if store.faiss_is_current() and not new_shards:
        return
    index = _appendable(store, can_append)
    if index is not None:
        index, todo = index
        ids, vecs = store.read_vectors(shards=todo) if todo else (np.zeros(0, np.int64), None)
        if todo and _auto_type_changes(store, len(ids)):
            index = None
        elif todo:
            log.info("appending %d vectors of %d shard(s) to %s (no training)", len(ids), len(todo), store.faiss_path.name)
            add_to_index(index, vecs, ids)
    if index is None:
        ids, vecs = store.read_vectors()
        if len(ids) == 0:
            return
        try:
            index = build_index(vecs, ids, m.index_type, ngpu=ngpu, memory_budget=m.memory_budget)
        except ConfigError as exc:  # e.g. an IVF with more lists than vectors: keep the type it had
            _keep_previous_type(store, ids, vecs, ngpu, exc)
    if index.ntotal != m.counts()["vectors"]:
        log.warning("index.faiss has %d vectors but the shards hold %d; rebuilding", index.ntotal, m.counts()["vectors"])
        ids, vecs = store.read_vectors()
        index = build_index(vecs, ids, m.index_type, ngpu=ngpu, memory_budget=m.memory_budget)
    save_index(index, store.faiss_path)
    store.write_manifest(faiss_current=True)


def _appendable(store: IndexStore, can_append: bool):
    """(the saved index, the shards it lacks) when appending those shards makes it current, else None."""
    m = store.manifest
    if not can_append or not store.faiss_path.is_file() or m.faiss_generation < 0:
        return None
    try:
        index = load_index(store.faiss_path)
    except DamagedIndexError as exc:  # derived data: rebuilt from the shards
        log.warning("%s; rebuilding it", str(exc).split(";")[0])
        return None
    from mergeseek.indexing.faiss_index import held_ids

    held = held_ids(index)
    held_set = set(held.tolist())
    if len(held_set) != len(held):
        return None
    todo, covered = [], 0
    for shard in store.shard_names():
        live = store.read_shard(shard, columns=["id"]).column("id").to_numpy()
        inside = int(np.isin(live, held, assume_unique=True).sum()) if len(live) else 0
        if inside == len(live):
            covered += inside
        elif inside == 0:
            todo.append(shard)
        else:
            return None  # part of a shard: not a state appending produces
    return (index, todo) if covered == len(held) else None  # == : every row it holds is live


def _keep_previous_type(store: IndexStore, ids: np.ndarray, vecs: np.ndarray, ngpu: int, exc: ConfigError) -> None:
    """A new --index-type that cannot be built here is not stored: index.faiss keeps the previous type."""
    m = store.manifest
    asked, m.index_type = m.index_type, store.previous_index_type
    save_index(build_index(vecs, ids, m.index_type, ngpu=ngpu, memory_budget=m.memory_budget), store.faiss_path)
    store.write_manifest(faiss_current=True)
    raise ConfigError(f"{exc}. The vectors are committed and index.faiss was built as {m.index_type}, the index "
                      f"type it keeps; run `cli.py index` again with another --index-type than {asked!r} "
                      "to switch (no re-encoding)") from None


def _auto_type_changes(store: IndexStore, added: int) -> bool:
    """With --index-type auto, True when ``added`` more vectors move the index to another FAISS type (rebuild)."""
    from mergeseek.indexing.faiss_index import AUTO, choose_index_type

    m = store.manifest
    if m.index_type.lower() != AUTO:
        return False
    total = m.counts()["vectors"]
    return choose_index_type(total, m.dim, m.memory_budget) != choose_index_type(total - added, m.dim, m.memory_budget)


__all__ = ["IndexWriter", "SideChannel", "WriteStats", "refresh_faiss"]
