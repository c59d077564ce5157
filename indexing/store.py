"""The on-disk index: one directory, no server.

::

    index_dir/
      manifest.json          model, merge, dim, metric, sampling, counts, versions, and the
                             registry of committed sources (the commit point of every write)
      index.faiss            FAISS IndexIDMap2, derived from the shards (rebuilt when stale or damaged)
      index.delta.faiss      the vectors added since index.faiss was saved (exact IDMap2,Flat), searched
                             with it; folded into it past a bound (``indexing.writer``), never needed
      meta/part-00000.parquet  one row per vector: id, video_id, frame_idx, pts_time, path, hash, source;
                             its schema metadata describes the shard (model, dim, sources, checksum)
      emb/part-00000.npy       float32 [rows, dim], same row order as the parquet part
      .journal               names a writer is about to create or delete (only while it runs or after a kill)
      damaged/               files ``cli.py repair`` moved aside (never deleted)

The shards are the source of truth. Before a writer creates a file it appends the name to
``.journal``; a commit writes one shard pair under temporary names, renames them, then rewrites
``manifest.json`` (temp + rename, file and folder fsynced). A run killed at any point leaves
either the old manifest or the new one; on the next open, journaled names that the manifest does
not list are removed, and nothing else: files the index did not write are never touched.
A source that is re-indexed gets its rows in a new shard; its old rows stay in their shard but
are dead (the registry points elsewhere), filtered out on read and dropped by :func:`compact_index`.
A ``force`` run builds a new generation beside the old one (``manifest.next.json``) and switches
``manifest.json`` only when it holds at least one source (:meth:`IndexStore.finish`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mergeseek.errors import DamagedIndexError, IndexMismatchError, InputError, PartialWriteError, WriteError, path_is_not
from mergeseek.indexing.journal import Journal
from mergeseek.indexing.layout import (  # noqa: F401 (the format's names are re-exported for callers of the store)
    DELTA_FILE, EMB_DIR, FAISS_FILE, FAISS_MAGIC, FAISS_NEXT, FORMAT, FORMAT_VERSION, IDENTITY_KEYS, LOCK_FILE,
    MANIFEST, META_DIR, SHARD_META_KEY, STAGING, TMP_TAG, EncodedSource, Manifest, SourceEntry, _check_identity, _damaged,
    _described_shards, _empty_meta, _now, _short, check_identity, check_index_folder, read_manifest, rebuild_manifest,
    repair_hint, shard_files, shard_problem,
)
from mergeseek.runtime import (  # noqa: F401 (atomic_write and software_versions are re-exported)
    atomic_write, check_writable, fsync_dir, software_versions, tmp_path_for, write_error,
)

log = logging.getLogger(__name__)


RACE_WAIT_S = 30.0  # how long a reader keeps retrying on manifests a busy writer keeps replacing


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


class IndexStore:
    """Read/write access to an index directory (one writer at a time, enforced by a lock file).

    Use :meth:`open_for_write` to index and :meth:`open_for_read` to search.
    """

    def __init__(self, root: Path, manifest: Manifest, writable: bool):
        self.root = Path(root)
        self.manifest = manifest
        self.writable = writable
        self.committed_sources = 0  # sources made durable in manifest.json by this store
        self.last_shard: Optional[str] = None  # name of the shard the last commit wrote
        self._lock_fh = None
        self._staged = False  # a force run's generation, not yet switched in
        self.previous_index_type = "Flat"  # the type before this writer changed it (kept when a new one cannot train)
        self._journal = Journal(self.root)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_for_read(cls, root: Path) -> "IndexStore":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"index folder {root} {path_is_not(root, 'folder')}; build one with `cli.py index VIDEOS --index {root}`")
        manifest = read_manifest(root)
        if manifest is None:
            if _described_shards(root):
                raise DamagedIndexError(f"{root} has index shards but no {MANIFEST}; {repair_hint(root)} to rebuild it")
            raise InputError(f"{root} has no {MANIFEST}; it is not a mergeseek index (build one with `cli.py index`)")
        store = cls(root, manifest, writable=False)
        store._retrying(store.check_shards)
        return store

    def _retrying(self, read: Callable):
        """``read()``, again with the committed manifest when a writer replaced it meanwhile.

        A reader holds the manifest it opened; a writer that commits, compacts or repairs at the
        same moment may remove a shard that manifest names. That is a commit in progress, not
        damage: when the manifest on disk has changed, the read is retried on it (a few times);
        only a failure under an unchanged manifest is reported as damage (or one that still fails
        after ``RACE_WAIT_S`` seconds of a writer changing the manifest under every try).
        """
        deadline = time.monotonic() + RACE_WAIT_S
        attempt = 0
        while True:
            try:
                return read()
            except DamagedIndexError:
                # retried for as long as the manifest keeps changing (a busy writer), within the deadline
                if self.writable or time.monotonic() > deadline or not self._adopt_newer_manifest():
                    raise
                attempt += 1
                time.sleep(min(0.05, 0.005 * attempt))

    def _adopt_newer_manifest(self) -> bool:
        try:
            fresh = read_manifest(self.root)
        except DamagedIndexError:
            return False
        if fresh is None or fresh == self.manifest:
            return False
        self.manifest = fresh
        return True

    @classmethod
    def open_for_write(
        cls, root: Path, identity: dict, index_type: Optional[str] = None, force: bool = False,
        memory_budget: Optional[int] = None,
    ) -> "IndexStore":
        """Open or create; refuse a different model/merge unless ``force``.

        ``force`` builds a new generation beside the old one; it replaces the old one in
        :meth:`finish` (called on a clean ``with`` exit) only when it holds at least one source.
        A folder that holds files but is not an index is refused; one whose manifest was lost is
        rebuilt from its shards first.
        """
        from mergeseek.indexing.faiss_index import validate_index_type

        root = Path(root)
        check_index_folder(root)
        if index_type:
            index_type = validate_index_type(index_type, identity.get("dim"))
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(root, exc) from None
        store = cls(root, None, writable=True)  # type: ignore[arg-type]
        store._lock()
        try:
            if check_index_folder(root) == "orphaned":
                store._adopt(rebuild_manifest(root))
            old = read_manifest(root)
            store._journal.recover()
            if old is not None:
                store.manifest = old
                store.check_shards()
            if force and old is not None:
                store.manifest = Manifest(
                    **{k: identity[k] for k in IDENTITY_KEYS}, index_type=index_type or "Flat", created=_now(),
                    next_shard=old.next_shard, generation=old.generation, memory_budget=int(memory_budget or 0),
                )
                store._staged = True
            elif old is not None:
                _check_identity(root, old, identity, action="index into")
                store.previous_index_type = old.index_type
                if index_type and index_type != old.index_type:
                    log.info("index type changes %s -> %s; index.faiss will be rebuilt", old.index_type, index_type)
                    old.index_type = index_type
                    old.faiss_generation = -1
                if memory_budget is not None and int(memory_budget) != old.memory_budget:
                    old.memory_budget = int(memory_budget)
                    old.faiss_generation = -1 if old.index_type == "auto" else old.faiss_generation
            else:
                store.manifest = Manifest(
                    **{k: identity[k] for k in IDENTITY_KEYS}, index_type=index_type or "Flat", created=_now(),
                    memory_budget=int(memory_budget or 0),
                )
            for sub in (EMB_DIR, META_DIR):
                (root / sub).mkdir(exist_ok=True)
            # FAISS files other code may save through store.faiss_path during this session
            store._journal.record(*(root / n for n in (FAISS_NEXT, FAISS_NEXT + TMP_TAG, FAISS_FILE + TMP_TAG,
                                                       DELTA_FILE + TMP_TAG)))
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Release the lock; first remove what this writer wrote and did not commit (journaled names only)."""
        if self._lock_fh is None:
            return
        try:
            self._journal.recover()
        except Exception as exc:  # cleanup is best effort: the next writer repeats it
            log.warning("could not clean up %s (%s); the next run does", self.root, exc)
        finally:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.writable:
                self.finish()
        except WriteError as failed:
            exc = failed
        finally:
            self.close()
        if isinstance(exc, WriteError) and not isinstance(exc, PartialWriteError):
            # The exit code must say whether this run changed the index (see docs/INDEXING.md).
            if self.committed_sources:
                raise PartialWriteError(
                    f"{exc}; the {self.committed_sources} source(s) committed before the failure are kept: "
                    "run the same command again to resume"
                ) from None
            raise WriteError(f"{exc}; nothing of this run was committed, the index is as it was") from None
        if exc is not None and exc_type is None:
            raise exc

    def _lock(self) -> None:
        import fcntl

        try:
            fh = open(self.root / LOCK_FILE, "a+")
        except OSError as exc:
            raise write_error(self.root / LOCK_FILE, exc) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise InputError(f"index {self.root} is being written by another process; wait for it to finish") from None
        self._lock_fh = fh

    # ------------------------------------------------------------------ journal and recovery
    def journal(self, *paths: Path) -> None:
        """Record files (inside the index folder) this writer is about to create, before creating them.

        For other parts that write beside the shards (thumbnails, sidecars): a name recorded here
        and not listed by the committed manifest is removed when this writer closes or, after a
        kill, when the next one opens. So record only temporary names (``x.tmp`` before
        ``atomic_write(x, ..., tmp=x.tmp)``), never a file that must stay.
        """
        self._journal.record(*(Path(p) for p in paths))

    def _adopt(self, manifest: Manifest) -> None:
        log.warning("%s had no %s; rebuilt it from the %d shard(s) it holds", self.root, MANIFEST, len(manifest.shards))
        self.manifest = manifest
        self.write_manifest()

    # ------------------------------------------------------------------ state
    def is_current(self, key: str, fingerprint: str, recipe: str) -> bool:
        e = self.manifest.sources.get(key)
        return e is not None and e.fingerprint == fingerprint and e.recipe == recipe

    def shard_paths(self, shard: str) -> tuple[Path, Path]:
        return shard_files(self.root, shard)

    def check_shards(self, shards: Optional[Sequence[str]] = None) -> None:
        """Cheap check of every shard (parquet footer, .npy header and size); ``DamagedIndexError`` names the first bad one."""
        for shard in sorted(self.manifest.shards if shards is None else shards):
            problem = shard_problem(self.root, shard, self.manifest.shards[shard], self.manifest.dim)
            if problem is not None:
                raise _damaged(self.root, *problem)

    # ------------------------------------------------------------------ writing
    def commit(self, items: Sequence[EncodedSource], settings: Optional[dict] = None) -> np.ndarray:
        """Write ``items`` as one new shard and register them; returns the ids given to the rows."""
        import pyarrow as pa

        assert self.writable, "store opened read-only"
        m = self.manifest
        items = [it for it in items if len(it.frame_idx)]
        n = sum(len(it.frame_idx) for it in items)
        if n == 0:
            return np.zeros(0, np.int64)
        ids = np.arange(m.next_id, m.next_id + n, dtype=np.int64)
        vectors = np.concatenate([it.vectors for it in items]).astype(np.float32, copy=False)
        if vectors.shape[1] != m.dim:
            raise IndexMismatchError(f"vectors have dim {vectors.shape[1]} but index {self.root} has dim {m.dim}")
        table = pa.table(
            {
                "id": ids,
                "video_id": pa.array([it.video_id for it in items for _ in range(len(it.frame_idx))], pa.string()),
                "frame_idx": np.concatenate([it.frame_idx for it in items]).astype(np.int64),
                "pts_time": np.concatenate([it.pts_time for it in items]).astype(np.float64),
                "path": pa.array([p for it in items for p in it.paths], pa.string()),
                "hash": np.concatenate([it.hashes for it in items]).astype(np.int64),
                "source": pa.array([it.key for it in items for _ in range(len(it.frame_idx))], pa.string()),
            }
        )
        entries = {
            it.key: SourceEntry(it.video_id, it.kind, it.fingerprint, it.recipe, "", len(it.frame_idx), it.duplicates)
            for it in items
        }
        backup = copy.deepcopy(m)
        try:
            shard = self._write_shard(table, vectors, entries, settings)
            replaced = {m.sources[k].shard for k in entries if k in m.sources}
            for k, e in entries.items():
                m.sources[k] = dataclasses.replace(e, shard=shard)
            m.shards[shard] = n
            m.next_id += n
            empty = [s for s in replaced if not any(e.shard == s for e in m.sources.values())]
            for s in empty:
                del m.shards[s]
            self._journal.record(*(p for s in empty for p in self.shard_paths(s)))
            self.write_manifest(settings)
        except BaseException:
            self.manifest = backup  # the shard just written is journaled: removed on close / next open
            raise
        if not self._staged:
            self.committed_sources += len(entries)
        for s in empty:  # only after the manifest that forgets them is committed
            for p in self.shard_paths(s):
                p.unlink(missing_ok=True)
        return ids

    def _write_shard(self, table, vectors: np.ndarray, entries: dict, settings: Optional[dict] = None) -> str:
        """Write one self-describing shard pair under a fresh name (never over a file that exists)."""
        import pyarrow.parquet as pq

        m = self.manifest
        while any(p.exists() or tmp_path_for(p).exists() for p in self.shard_paths(f"part-{m.next_shard:05d}")):
            m.next_shard += 1  # a file we did not write has this name: leave it alone
        shard = f"part-{m.next_shard:05d}"
        m.next_shard += 1
        self.last_shard = shard
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        described = {k: getattr(m, k) for k in IDENTITY_KEYS}
        settings = settings or {}
        described.update(
            format=FORMAT, format_version=FORMAT_VERSION, shard=shard, rows=int(len(vectors)),
            index_type=m.index_type, sampling=settings.get("sampling", m.sampling), dedup=settings.get("dedup", m.dedup),
            emb_crc32=zlib.crc32(vectors.tobytes()), created=_now(),
            ids=[int(table.column("id")[0].as_py()), int(table.column("id")[-1].as_py())],
            sources={k: {f: v for f, v in dataclasses.asdict(e).items() if f != "shard"} for k, e in entries.items()},
        )
        table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(described).encode()})
        emb_path, meta_path = self.shard_paths(shard)
        self._journal.record(tmp_path_for(emb_path), emb_path, tmp_path_for(meta_path), meta_path)

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)

        atomic_write(emb_path, write_npy)
        atomic_write(meta_path, lambda tmp: pq.write_table(table, tmp))
        return shard

    def write_manifest(self, settings: Optional[dict] = None, faiss_current: bool = False) -> None:
        m = self.manifest
        if settings:
            for k, v in settings.items():
                setattr(m, k, v)
        m.generation += 1
        if faiss_current:  # index.faiss and the delta on disk now (if any) are this generation's FAISS state
            m.faiss_generation = m.generation
            m.faiss_size = self.faiss_path.stat().st_size if self.faiss_path.is_file() else -1
            m.delta_size = self.delta_path.stat().st_size if self.delta_path.is_file() and not self._staged else -1
        m.updated = _now()
        m.versions = software_versions()
        text = json.dumps(m.to_json(), indent=1, sort_keys=False)
        path = self.root / (STAGING if self._staged else MANIFEST)
        self._journal.record(tmp_path_for(path), *((path,) if self._staged else ()))
        atomic_write(path, text)

    def finish(self) -> bool:
        """Switch a ``force`` run's new generation in (only when it holds a source); True when it did.

        The old generation's shards are removed only after ``manifest.json`` names the new one.
        """
        if not self._staged or not self.manifest.sources:
            return False
        old = read_manifest(self.root)
        dead = [s for s in (old.shards if old else ()) if s not in self.manifest.shards]
        self._journal.record(*(p for s in dead for p in self.shard_paths(s)))
        staged_faiss = self.faiss_is_current()  # this writer saved index.next.faiss for the new generation
        self.drop_delta()  # the old generation's: its ids mean other rows in the new one
        self._staged = False
        self.write_manifest()  # the switch; index.faiss is the old generation's, so not current yet
        self.committed_sources = len(self.manifest.sources)
        if staged_faiss:
            from mergeseek.runtime import commit_file

            commit_file(self.root / FAISS_NEXT, self.root / FAISS_FILE)
            self.write_manifest(faiss_current=True)
        for s in dead:
            for p in self.shard_paths(s):
                p.unlink(missing_ok=True)
        (self.root / STAGING).unlink(missing_ok=True)
        log.info("switched %s to the new generation (%d sources); the old one was removed", self.root,
                 len(self.manifest.sources))
        return True

    @property
    def staged(self) -> bool:
        """True while a ``force`` run's generation is not yet the index (readers still see the old one)."""
        return self._staged

    # ------------------------------------------------------------------ shards, for repair, compact, thumbnails and merge
    @classmethod
    def open_for_repair(cls, root: Path) -> "IndexStore":
        """The writer's lock on ``root`` without reading its manifest: repair decides what it is and
        hands it to :meth:`recover`. Close it (``with``) like any writer."""
        store = cls(Path(root), None, writable=True)  # type: ignore[arg-type]
        store._lock()
        return store

    def recover(self, manifest: Manifest) -> None:
        """Adopt ``manifest`` and remove what a killed run left (journaled files it does not list)."""
        self.manifest = manifest
        self._journal.recover()

    def shard_names(self) -> list[str]:
        """The committed shards, oldest first."""
        return sorted(self.manifest.shards)

    def read_shard(self, shard: str, columns: Optional[list] = None, live: bool = True):
        """The metadata rows of ``shard`` as a pyarrow Table: only its live rows (``live``) or all of
        them, in row order; ``DamagedIndexError`` when the file is missing or damaged."""
        import pyarrow as pa

        want = None if columns is None else list(dict.fromkeys(list(columns) + (["source"] if live else [])))
        t = self._read_table(shard, want).replace_schema_metadata(None)
        if live:
            mask = self._live_mask(shard, np.asarray(t.column("source").to_pylist(), dtype=object))
            t = t if mask.all() else t.filter(pa.array(mask))
        return t if columns is None else t.select(list(columns))

    def rewrite_shard(self, shard: str) -> Optional[str]:
        """Write the live rows of ``shard`` (ids, metadata, vectors unchanged) as a new shard and point its
        sources there; None when it has none. The manifest is written by :meth:`retire_shards`."""
        m = self.manifest
        owners = {k: e for k, e in m.sources.items() if e.shard == shard}
        if not owners:
            return None
        import pyarrow as pa

        t = self._read_table(shard)
        v = self._load_vectors(shard, t.num_rows)
        mask = self._live_mask(shard, np.asarray(t.column("source").to_pylist(), dtype=object))
        kept = t.filter(pa.array(mask)).replace_schema_metadata(None)
        new = self._write_shard(kept, np.asarray(v[mask], dtype=np.float32), owners)
        for k, e in owners.items():
            m.sources[k] = dataclasses.replace(e, shard=new)
        m.shards[new] = kept.num_rows
        return new

    def retire_shards(self, shards: Sequence[str], faiss_current: bool = False) -> None:
        """Forget ``shards`` (their rows must be dead or rewritten): the manifest without them is
        committed first, then their files are removed (journaled, so a kill in between is cleaned up)."""
        if not shards:
            return
        for s in shards:
            self.manifest.shards.pop(s, None)
        self._journal.record(*(p for s in shards for p in self.shard_paths(s)))
        self.write_manifest(faiss_current=faiss_current)
        for s in shards:
            for p in self.shard_paths(s):
                p.unlink(missing_ok=True)

    def vectors_by_id(self, ids: np.ndarray, shard: str) -> np.ndarray:
        """float32 [len(ids), dim]: the vectors of the live rows ``ids`` of ``shard``, in that order
        (the shard's vectors are kept for the next call on the same shard); ``InputError`` when one is
        not a live row there."""
        ids = np.asarray(ids, dtype=np.int64)
        if getattr(self, "_by_id", (None,))[0] != shard:
            sids, svecs = self.read_vectors(shards=[shard])
            self._by_id = (shard, sids, svecs, np.argsort(sids, kind="stable"))
        _, sids, svecs, order = self._by_id
        at = order[np.clip(np.searchsorted(sids, ids, sorter=order), 0, max(len(sids) - 1, 0))]
        if len(ids) and (len(sids) == 0 or not np.array_equal(sids[at], ids)):
            raise InputError(f"{self.root}: some rows are missing from shard {shard}; {repair_hint(self.root)} first")
        return np.ascontiguousarray(svecs[at], dtype=np.float32)

    # ------------------------------------------------------------------ reading
    def _live_mask(self, shard: str, sources: np.ndarray) -> np.ndarray:
        owner = {k: e.shard for k, e in self.manifest.sources.items()}
        return np.fromiter((owner.get(s) == shard for s in sources), dtype=bool, count=len(sources))

    def _read_table(self, shard: str, columns: Optional[list] = None):
        import pyarrow.parquet as pq

        path = self.shard_paths(shard)[1]
        try:
            t = pq.read_table(path, columns=columns)
        except FileNotFoundError:
            raise _damaged(self.root, path, "missing") from None
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise _damaged(self.root, path, _short(exc)) from None
        if t.num_rows != self.manifest.shards[shard]:
            raise _damaged(self.root, path, f"{t.num_rows} rows, the manifest says {self.manifest.shards[shard]}")
        return t

    def _load_vectors(self, shard: str, rows: int) -> np.ndarray:
        path = self.shard_paths(shard)[0]
        try:
            v = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise _damaged(self.root, path, "missing") from None
        except (ValueError, OSError, EOFError) as exc:
            raise _damaged(self.root, path, _short(exc)) from None
        if v.shape != (rows, self.manifest.dim) or v.dtype != np.float32:
            raise _damaged(self.root, path, f"shape {v.shape} {v.dtype}, expected ({rows}, {self.manifest.dim}) float32")
        return v

    def read_meta(self, columns: Optional[Sequence[str]] = None):
        """Live metadata rows of all shards as one pyarrow Table (ordered by shard, then row; only
        ``columns`` and ``source`` when named); a read-only store retries on a manifest a writer
        committed meanwhile (``_retrying``)."""
        return self._retrying(lambda: self._read_meta_once(columns))

    def _read_meta_once(self, columns: Optional[Sequence[str]] = None):
        import pyarrow as pa

        parts = []
        for shard in sorted(self.manifest.shards):
            t = self._read_table(shard, columns=None if columns is None else sorted({*columns, "source"}))
            mask = self._live_mask(shard, np.asarray(t.column("source").to_pylist(), dtype=object))
            t = t.replace_schema_metadata(None)
            parts.append(t.filter(pa.array(mask)) if not mask.all() else t)
        if not parts:
            return _empty_meta()
        return pa.concat_tables(parts)

    def read_vectors(self, shards: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of the live rows of ``shards`` (default: all;
        retried on a newer manifest like ``read_meta`` when no shards are named)."""
        if shards is None:
            return self._retrying(lambda: self._read_vectors_once(None))
        return self._read_vectors_once(shards)

    def _read_vectors_once(self, shards: Optional[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = [], []
        for shard in sorted(self.manifest.shards if shards is None else shards):
            t = self._read_table(shard, columns=["id", "source"])
            v = self._load_vectors(shard, t.num_rows)
            mask = self._live_mask(shard, np.asarray(t.column("source").to_pylist(), dtype=object))
            ids.append(t.column("id").to_numpy()[mask])
            vecs.append(np.asarray(v[mask], dtype=np.float32))
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.manifest.dim), np.float32)
        return np.concatenate(ids), np.concatenate(vecs)

    @property
    def faiss_path(self) -> Path:
        """index.faiss (``index.next.faiss`` while a force run's generation is staged: the old one stays valid)."""
        return self.root / (FAISS_NEXT if self._staged else FAISS_FILE)

    @property
    def delta_path(self) -> Path:
        """index.delta.faiss: the vectors appended since index.faiss was saved (see ``indexing.writer``)."""
        return self.root / DELTA_FILE

    def faiss_is_current(self) -> bool:
        """index.faiss (and the delta the manifest lists, if any) were saved for this manifest and still
        look like it (size, IndexIDMap2 magic)."""
        m = self.manifest
        if not self.faiss_path.is_file() or m.faiss_generation != m.generation:
            return False
        saved = [(self.faiss_path, m.faiss_size)] + ([(self.delta_path, m.delta_size)] if self.has_delta() else [])
        try:  # a size other than the one saved: truncated or replaced, rebuilt from the shards
            return all((size < 0 or p.stat().st_size == size) and _head(p) == FAISS_MAGIC for p, size in saved)
        except OSError:
            return False

    def has_delta(self) -> bool:
        """The manifest lists a delta as part of the FAISS state (while a force generation is staged: never)."""
        return self.manifest.delta_size >= 0 and not self._staged

    def drop_delta(self) -> None:
        """Remove index.delta.faiss (before a manifest that no longer lists it is written; a run killed in
        between leaves a state readers and the next writer complete from the shards)."""
        if self.delta_path.is_file():
            self.delta_path.unlink()
            fsync_dir(self.root)


def preflight(root: Path, index_type: Optional[str] = None) -> str:
    """What an indexing run checks before the model loads: the folder (new, empty or an index), that
    it can be written, and the index type. Returns the folder's state (see :func:`check_index_folder`)."""
    from mergeseek.indexing.faiss_index import validate_index_type

    state = check_index_folder(Path(root))
    if state == "index":
        IndexStore.open_for_read(Path(root))  # a damaged manifest or shard is named now, not after the model loaded
    if index_type:
        validate_index_type(index_type)
    check_writable(Path(root), folder=True, what="--index")
    return state


__all__ = [
    "EncodedSource", "IndexStore", "Manifest", "SourceEntry", "atomic_write", "check_identity", "check_index_folder",
    "preflight", "read_manifest", "rebuild_manifest", "shard_files", "shard_problem", "software_versions",
]
