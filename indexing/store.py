"""The on-disk index: one directory, no server.

::

    index_dir/
      manifest.json          model, merge, dim, metric, sampling, counts, versions, and the
                             registry of committed sources (the commit point of every write)
      index.faiss            FAISS IndexIDMap2, derived from the shards (rebuilt when stale or damaged)
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
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from mergeseek.errors import DamagedIndexError, IndexMismatchError, InputError, PartialWriteError, WriteError
from mergeseek.runtime import (  # noqa: F401 (atomic_write and software_versions are re-exported)
    atomic_write, check_writable, fsync_dir, software_versions, tmp_path_for, write_error,
)

log = logging.getLogger(__name__)

FORMAT = "mergeseek-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGING = "manifest.next.json"
FAISS_FILE = "index.faiss"
FAISS_NEXT = "index.next.faiss"  # a --force generation's index.faiss until the switch
FAISS_MAGIC = b"IxM2"  # FAISS's fourcc of IndexIDMap2, the first bytes of every index.faiss we write
LOCK_FILE = ".lock"
JOURNAL = ".journal"
DAMAGED_DIR = "damaged"
TMP_TAG = ".tmp"
SHARD_META_KEY = b"mergeseek"
_SHARD_NAME = re.compile(r"^part-\d{5,}$")
# What makes two indexes' vectors comparable; anything else (sampling, dedup) is per source.
IDENTITY_KEYS = ("model", "pretrained", "merge", "precision", "dim")


def repair_hint(root: Path) -> str:
    return f"run `cli.py repair --index {root}`"


@dataclass
class SourceEntry:
    """A committed source: where its rows live and what produced them."""

    video_id: str
    kind: str
    fingerprint: str
    recipe: str
    shard: str
    count: int
    duplicates: int = 0


_ENTRY_TYPES = {"video_id": str, "kind": str, "fingerprint": str, "recipe": str, "shard": str, "count": int,
                "duplicates": int}


@dataclass
class Manifest:
    model: str
    pretrained: str
    merge: str
    precision: str
    dim: int
    index_type: str = "Flat"
    metric: str = "inner_product"
    sampling: str = ""
    dedup: str = ""
    next_id: int = 0
    next_shard: int = 0
    generation: int = 0
    faiss_generation: int = -1
    faiss_size: int = -1  # bytes of index.faiss when it was saved (-1: unknown)
    memory_budget: int = 0  # bytes for --index-type auto (0: the default budget)
    shards: dict = field(default_factory=dict)  # shard name -> rows written (live and dead)
    sources: dict = field(default_factory=dict)  # source key -> SourceEntry
    versions: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""

    @property
    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY_KEYS}

    def counts(self) -> dict:
        live = sum(e.count for e in self.sources.values())
        return {
            "vectors": live,
            "videos": len(self.sources),
            "shards": len(self.shards),
            "dead_rows": sum(self.shards.values()) - live,
            "duplicates_skipped": sum(e.duplicates for e in self.sources.values()),
        }

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = {k: dataclasses.asdict(v) for k, v in self.sources.items()}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "counts": self.counts(), **d}

    @classmethod
    def from_json(cls, d) -> "Manifest":
        """Parse a manifest; ``_Malformed`` for a wrong shape, ``InputError`` for another format."""
        if not isinstance(d, dict):
            raise _Malformed(f"it holds a JSON {type(d).__name__}, not an object")
        if "format" not in d:
            raise _Malformed("it has no 'format' field")
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"manifest format {d.get('format')!r} v{d.get('format_version')} is not {FORMAT} v{FORMAT_VERSION}; "
                "it was written by another program or version: index into a new folder"
            )
        _check_fields(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["sources"] = {k: SourceEntry(**{f: v[f] for f in _ENTRY_TYPES if f in v}) for k, v in d["sources"].items()}
        return cls(**kw)


class _Malformed(ValueError):
    """A manifest of the wrong shape (the caller adds the path and the repair command)."""


def _check_fields(d: dict) -> None:
    for name, typ in (("model", str), ("pretrained", str), ("merge", str), ("precision", str), ("dim", int),
                      ("shards", dict), ("sources", dict)):
        if name not in d:
            raise _Malformed(f"field {name!r} is missing")
        if not isinstance(d[name], typ) or isinstance(d[name], bool):
            raise _Malformed(f"field {name!r} is a {type(d[name]).__name__}, not a {typ.__name__}")
    for name, typ in (("index_type", str), ("next_id", int), ("next_shard", int), ("generation", int),
                      ("faiss_generation", int), ("faiss_size", int), ("memory_budget", int)):
        if name in d and not isinstance(d[name], typ):
            raise _Malformed(f"field {name!r} is a {type(d[name]).__name__}, not a {typ.__name__}")
    if d["dim"] <= 0:
        raise _Malformed(f"dim {d['dim']} is not positive")
    for k, v in d["shards"].items():
        if not isinstance(v, int) or not _SHARD_NAME.match(k):
            raise _Malformed(f"shard entry {k!r}: {v!r} is not a shard name with a row count")
    for k, v in d["sources"].items():
        if not isinstance(v, dict):
            raise _Malformed(f"source {k!r} is a {type(v).__name__}, not an object")
        for f, typ in _ENTRY_TYPES.items():
            if f != "duplicates" and f not in v:
                raise _Malformed(f"source {k!r} has no {f!r}")
            if f in v and not isinstance(v[f], typ):
                raise _Malformed(f"source {k!r}: {f!r} is a {type(v[f]).__name__}, not a {typ.__name__}")
        if v["shard"] not in d["shards"]:
            raise _Malformed(f"source {k!r} points at shard {v['shard']!r}, which the manifest does not list")


@dataclass
class EncodedSource:
    """A source's vectors and per-frame metadata, ready to commit (rows in frame order)."""

    key: str
    video_id: str
    kind: str
    fingerprint: str
    recipe: str
    frame_idx: np.ndarray  # int64 [n]
    pts_time: np.ndarray  # float64 [n], NaN when unknown
    paths: list
    hashes: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, dim]
    duplicates: int = 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_manifest(root: Path, name: str = MANIFEST) -> Optional[Manifest]:
    """The committed manifest of ``root`` (None when there is none); ``DamagedIndexError`` when unreadable."""
    root = Path(root)
    path = root / name
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, _Malformed, TypeError, ValueError) as exc:
        raise DamagedIndexError(
            f"index file {path} is damaged ({str(exc)[:160]}); {repair_hint(root)} to rebuild it from the shards "
            "(the damaged file is moved to damaged/, nothing else is changed)"
        ) from None
    except OSError as exc:
        raise DamagedIndexError(f"index file {path} cannot be read ({exc.strerror}); {repair_hint(root)}") from None


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
        self._journaled: set = set()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_for_read(cls, root: Path) -> "IndexStore":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"index folder {root} does not exist; build one with `cli.py index VIDEOS --index {root}`")
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
            store._recover()
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
            for sub in ("emb", "meta"):
                (root / sub).mkdir(exist_ok=True)
            # FAISS files other code may save through store.faiss_path during this session
            store._journal(*(root / n for n in (FAISS_NEXT, FAISS_NEXT + TMP_TAG, FAISS_FILE + TMP_TAG)))
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Release the lock; first remove what this writer wrote and did not commit (journaled names only)."""
        if self._lock_fh is None:
            return
        try:
            self._recover()
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
    def _journal(self, *paths: Path) -> None:
        """Record names before they are created (or deleted), so a killed run's leftovers are known."""
        names = [p.relative_to(self.root).as_posix() for p in paths]
        names = [n for n in names if n not in self._journaled]
        if not names:
            return
        path = self.root / JOURNAL
        new = not path.exists()
        try:
            with open(path, "a") as fh:
                fh.write("".join(n + "\n" for n in names))
                fh.flush()
                os.fsync(fh.fileno())
            if new:
                fsync_dir(self.root)
        except OSError as exc:
            raise write_error(path, exc) from None
        self._journaled.update(names)

    def journal(self, *paths: Path) -> None:
        """Record files (inside the index folder) this writer is about to create, before creating them.

        For other parts that write beside the shards (thumbnails, sidecars): a name recorded here
        and not listed by the committed manifest is removed when this writer closes or, after a
        kill, when the next one opens. So record only temporary names (``x.tmp`` before
        ``atomic_write(x, ..., tmp=x.tmp)``), never a file that must stay.
        """
        self._journal(*(Path(p) for p in paths))

    def _recover(self) -> None:
        """Remove journaled files that the committed manifest does not list (left by a killed run)."""
        path = self.root / JOURNAL
        if not path.is_file():
            return
        names = {n.strip() for n in path.read_text(errors="replace").splitlines() if n.strip()}
        try:
            on_disk = read_manifest(self.root)
        except DamagedIndexError:
            on_disk = None
        keep = {MANIFEST, FAISS_FILE}
        if on_disk is not None:
            keep |= {p.relative_to(self.root).as_posix() for s in on_disk.shards for p in self.shard_paths(s)}
        removed = 0
        for name in sorted(names - keep):
            if ".." in Path(name).parts or Path(name).is_absolute():
                continue
            if on_disk is None and not name.endswith(TMP_TAG):
                continue  # no manifest to compare with: keep every shard for `repair`
            p = self.root / name
            if p.is_file():
                p.unlink()
                removed += 1
        if removed:
            log.warning("removed %d file(s) an interrupted run of mergeseek left in %s", removed, self.root)
        pending = [n for n in names - keep if on_disk is None and (self.root / n).is_file()]
        if on_disk is not None or not pending:
            path.unlink(missing_ok=True)
            self._journaled.clear()

    def _adopt(self, manifest: Manifest) -> None:
        log.warning("%s had no %s; rebuilt it from the %d shard(s) it holds", self.root, MANIFEST, len(manifest.shards))
        self.manifest = manifest
        self.write_manifest()

    # ------------------------------------------------------------------ state
    def is_current(self, key: str, fingerprint: str, recipe: str) -> bool:
        e = self.manifest.sources.get(key)
        return e is not None and e.fingerprint == fingerprint and e.recipe == recipe

    def shard_paths(self, shard: str) -> tuple[Path, Path]:
        return self.root / "emb" / f"{shard}.npy", self.root / "meta" / f"{shard}.parquet"

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
            self._journal(*(p for s in empty for p in self.shard_paths(s)))
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
        self._journal(tmp_path_for(emb_path), emb_path, tmp_path_for(meta_path), meta_path)

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
        if faiss_current:
            m.faiss_generation = m.generation
            m.faiss_size = self.faiss_path.stat().st_size if self.faiss_path.is_file() else -1
        m.updated = _now()
        m.versions = software_versions()
        text = json.dumps(m.to_json(), indent=1, sort_keys=False)
        path = self.root / (STAGING if self._staged else MANIFEST)
        self._journal(tmp_path_for(path), *((path,) if self._staged else ()))
        atomic_write(path, text)

    def finish(self) -> bool:
        """Switch a ``force`` run's new generation in (only when it holds a source); True when it did.

        The old generation's shards are removed only after ``manifest.json`` names the new one.
        """
        if not self._staged or not self.manifest.sources:
            return False
        old = read_manifest(self.root)
        dead = [s for s in (old.shards if old else ()) if s not in self.manifest.shards]
        self._journal(*(p for s in dead for p in self.shard_paths(s)))
        staged_faiss = self.faiss_is_current()  # this writer saved index.next.faiss for the new generation
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

    def read_meta(self):
        """Live metadata rows of all shards as one pyarrow Table (ordered by shard, then row); a
        read-only store retries on a manifest a writer committed meanwhile (``_retrying``)."""
        return self._retrying(self._read_meta_once)

    def _read_meta_once(self):
        import pyarrow as pa

        parts = []
        for shard in sorted(self.manifest.shards):
            t = self._read_table(shard)
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

    def faiss_is_current(self) -> bool:
        """index.faiss was saved for this manifest and still looks like it (size, IndexIDMap2 magic)."""
        m = self.manifest
        if not self.faiss_path.is_file() or m.faiss_generation != m.generation:
            return False
        if m.faiss_size >= 0 and self.faiss_path.stat().st_size != m.faiss_size:
            return False  # truncated or replaced: rebuilt from the shards
        try:
            with open(self.faiss_path, "rb") as fh:
                return fh.read(4) == FAISS_MAGIC
        except OSError:
            return False


# ---------------------------------------------------------------------------- checks
def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:160]


RACE_WAIT_S = 30.0  # how long a reader keeps retrying on manifests a busy writer keeps replacing


def _damaged(root: Path, path: Path, reason: str) -> DamagedIndexError:
    return DamagedIndexError(
        f"index file {path} is damaged ({reason}); {repair_hint(root)}: it moves the shard to damaged/ and "
        "drops its sources from the manifest, so the next `cli.py index` run encodes them again"
    )


def _npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file from its header alone."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = reader(fh)
        return shape, dtype, fh.tell()


def shard_problem(root: Path, shard: str, rows: int, dim: int, deep: bool = False) -> Optional[tuple[Path, str]]:
    """(file, reason) when a shard is missing or damaged, else None.

    The cheap check reads the parquet footer and the .npy header and compares sizes (a truncated
    file fails it); ``deep`` reads both files whole and checks the vectors' CRC32.
    """
    import pyarrow.parquet as pq

    root = Path(root)
    emb, meta = root / "emb" / f"{shard}.npy", root / "meta" / f"{shard}.parquet"
    for p in (meta, emb):
        if not p.is_file():
            return p, "missing"
    try:
        md = pq.read_metadata(meta)
        if md.num_rows != rows:
            return meta, f"{md.num_rows} rows, the manifest says {rows}"
        if deep:
            table = pq.read_table(meta)
            if table.column_names[:1] != ["id"] or "source" not in table.column_names:
                return meta, f"columns {table.column_names} are not an index shard's"
    except Exception as exc:  # ArrowInvalid, OSError, ...
        return meta, _short(exc)
    try:
        shape, dtype, offset = _npy_header(emb)
        if shape != (rows, dim) or dtype != np.float32:
            return emb, f"shape {shape} {dtype}, expected ({rows}, {dim}) float32"
        size = emb.stat().st_size
        if size != offset + rows * dim * 4:
            return emb, f"{size} bytes, a ({rows}, {dim}) float32 array needs {offset + rows * dim * 4}"
        if deep:
            described = shard_description(meta)
            crc = (described or {}).get("emb_crc32")
            if crc is not None and zlib.crc32(np.ascontiguousarray(np.load(emb)).tobytes()) != crc:
                return emb, "its vectors do not match the checksum recorded at commit"
    except (ValueError, OSError, EOFError) as exc:
        return emb, _short(exc)
    return None


def shard_description(meta_path: Path) -> Optional[dict]:
    """What a shard says about itself (its parquet schema metadata), or None when it says nothing."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(meta_path).metadata or {}).get(SHARD_META_KEY)
        d = json.loads(raw) if raw else None
    except Exception:
        return None
    return d if isinstance(d, dict) and d.get("format") == FORMAT else None


def _described_shards(root: Path) -> list:
    d = Path(root) / "meta"
    if not d.is_dir():
        return []
    return [p for p in sorted(d.glob("part-*.parquet")) if _SHARD_NAME.match(p.stem) and shard_description(p)]


def check_index_folder(root: Path) -> str:
    """'new', 'index' or 'orphaned' (shards without a manifest); refuse a folder that holds other files.

    Called before the model loads, so a wrong ``--index`` costs nothing.
    """
    root = Path(root)
    if not root.exists():
        return "new"
    if not root.is_dir():
        raise InputError(f"--index {root} is a file, not a folder; give a new or existing index folder")
    if (root / MANIFEST).exists():
        return "index"
    if _described_shards(root):
        return "orphaned"
    journaled = set()
    if (root / JOURNAL).is_file():
        journaled = {n.strip() for n in (root / JOURNAL).read_text(errors="replace").splitlines() if n.strip()}
    others = []
    for p in root.iterdir():
        if p.name in (LOCK_FILE, JOURNAL):
            continue
        if p.name in ("emb", "meta") and p.is_dir():
            others += [q for q in p.iterdir() if f"{p.name}/{q.name}" not in journaled]
        elif p.name not in journaled:
            others.append(p)
    if not others:
        return "new"
    example = ", ".join(sorted(str(p.relative_to(root)) for p in others)[:3])
    raise InputError(
        f"{root} is not empty ({example}{', ...' if len(others) > 3 else ''}) and is not a mergeseek index "
        f"(no {MANIFEST}, no index shards); nothing was changed: give --index a new or empty folder"
    )


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


def rebuild_manifest(root: Path) -> Manifest:
    """A manifest made from what the shards say about themselves (for a lost or damaged manifest).

    The identity (model, weights, merge, precision, dim) of the newest shard wins; shards of
    another identity are left out (and left in place). A source in several shards belongs to the
    newest; older rows are dead, as after a re-index.
    """
    import pyarrow.parquet as pq

    root = Path(root)
    described = []
    for p in _described_shards(root):
        d = shard_description(p)
        described.append((int(p.stem.split("-")[1]), p.stem, d))
    if not described:
        raise DamagedIndexError(f"{root} holds no shard that describes itself; the index cannot be rebuilt: index again")
    described.sort()
    newest = described[-1][2]
    identity = {k: newest[k] for k in IDENTITY_KEYS}
    m = Manifest(**identity, index_type=newest.get("index_type", "Flat"), sampling=newest.get("sampling", ""),
                 dedup=newest.get("dedup", ""), created=_now())
    for number, shard, d in described:
        if any(d.get(k) != identity[k] for k in IDENTITY_KEYS):
            log.warning("shard %s was made by another model/merge; left out of the rebuilt manifest", shard)
            continue
        if shard_problem(root, shard, int(d.get("rows", -1)), m.dim) is not None:
            log.warning("shard %s is damaged; left out of the rebuilt manifest", shard)
            continue
        ids = pq.read_table(root / "meta" / f"{shard}.parquet", columns=["id"]).column("id").to_numpy()
        m.shards[shard] = int(d["rows"])
        for key, e in d.get("sources", {}).items():
            m.sources[key] = SourceEntry(**{f: e[f] for f in _ENTRY_TYPES if f in e and f != "shard"}, shard=shard)
        m.next_id = max(m.next_id, int(ids.max()) + 1 if len(ids) else 0)
        m.next_shard = max(m.next_shard, number + 1)
    return m


def _empty_meta():
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array([], pa.int64()),
            "video_id": pa.array([], pa.string()),
            "frame_idx": pa.array([], pa.int64()),
            "pts_time": pa.array([], pa.float64()),
            "path": pa.array([], pa.string()),
            "hash": pa.array([], pa.int64()),
            "source": pa.array([], pa.string()),
        }
    )


def _check_identity(root: Path, m: Manifest, identity: dict, action: str, keys: Sequence[str] = IDENTITY_KEYS) -> None:
    diffs = [k for k in keys if str(identity.get(k)) != str(getattr(m, k))]
    if not diffs:
        return
    have = ", ".join(f"{k}={getattr(m, k)}" for k in diffs)
    want = ", ".join(f"{k}={identity.get(k)}" for k in diffs)
    flags = " ".join(f"--{k} {getattr(m, k)}" for k in diffs if k != "dim")
    raise IndexMismatchError(
        f"cannot {action} {root}: it was built with {have} (model {m.model}) but you asked for {want}; "
        f"pass {flags or '--model ' + m.model} to match it, or rebuild it with --force"
    )


def check_identity(root: Path, m: Manifest, identity: dict, keys: Sequence[str], action: str) -> None:
    """Raise ``IndexMismatchError`` when ``identity`` differs from the manifest on ``keys``."""
    _check_identity(root, m, identity, action, keys)


__all__ = [
    "EncodedSource", "IndexStore", "Manifest", "SourceEntry", "atomic_write", "check_identity", "check_index_folder",
    "read_manifest", "rebuild_manifest", "shard_problem", "software_versions",
]
