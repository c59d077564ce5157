"""The on-disk index: one directory, no server.

::

    index_dir/
      manifest.json          model, merge, dim, metric, sampling, counts, versions, and the
                             registry of committed sources (the commit point of every write)
      index.faiss            FAISS IndexIDMap2, derived from the shards (rebuilt when stale)
      meta/part-00000.parquet  one row per vector: id, video_id, frame_idx, pts_time, path, hash, source
      emb/part-00000.npy       float32 [rows, dim], same row order as the parquet part

The shards are the source of truth. A commit writes one shard pair under temporary names,
renames them, then rewrites ``manifest.json`` (temp + rename). A run killed at any point leaves
either the old manifest (the new shard is an orphan, deleted on the next open) or the new one.
A source that is re-indexed gets its rows in a new shard; its old rows stay in their shard but
are dead (the registry points elsewhere) and are filtered out on read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from errors import IndexMismatchError, InputError

log = logging.getLogger(__name__)

FORMAT = "mergeseek-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
LOCK_FILE = ".lock"
TMP_TAG = ".tmp"
# What makes two indexes' vectors comparable; anything else (sampling, dedup) is per source.
IDENTITY_KEYS = ("model", "pretrained", "merge", "precision", "dim")


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
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"manifest format {d.get('format')!r} v{d.get('format_version')} is not {FORMAT} v{FORMAT_VERSION}; "
                "rebuild the index with --force"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["sources"] = {k: SourceEntry(**v) for k, v in d.get("sources", {}).items()}
        return cls(**kw)


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


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, then rename over ``path``: readers see old or new, never half."""
    tmp = path.with_name(path.name + TMP_TAG)
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(root: Path) -> Optional[Manifest]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"{path} is not a valid mergeseek manifest ({exc}); rebuild the index with --force") from None


def software_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("mergeseek", "torch", "open_clip_torch", "faiss-cpu", "faiss-gpu-cu12", "decord", "pyarrow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


class IndexStore:
    """Read/write access to an index directory (one writer at a time, enforced by a lock file).

    Use :meth:`open_for_write` to index and :meth:`open_for_read` to search.
    """

    def __init__(self, root: Path, manifest: Manifest, writable: bool):
        self.root = Path(root)
        self.manifest = manifest
        self.writable = writable
        self._lock_fh = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_for_read(cls, root: Path) -> "IndexStore":
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"index folder {root} does not exist; build one with `cli.py index VIDEOS --index {root}`")
        manifest = read_manifest(root)
        if manifest is None:
            raise InputError(f"{root} has no {MANIFEST}; it is not a mergeseek index (build one with `cli.py index`)")
        return cls(root, manifest, writable=False)

    @classmethod
    def open_for_write(
        cls, root: Path, identity: dict, index_type: Optional[str] = None, force: bool = False
    ) -> "IndexStore":
        """Open or create; refuse a different model/merge unless ``force`` (which starts afresh)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, None, writable=True)  # type: ignore[arg-type]
        store._lock()
        try:
            old = read_manifest(root) if not force else None
            if force:
                store._wipe()
            if old is not None:
                _check_identity(root, old, identity, action="index into")
                if index_type and index_type != old.index_type:
                    log.info("index type changes %s -> %s; index.faiss will be rebuilt", old.index_type, index_type)
                    old.index_type = index_type
                    old.faiss_generation = -1
                store.manifest = old
            else:
                store.manifest = Manifest(
                    **{k: identity[k] for k in IDENTITY_KEYS}, index_type=index_type or "Flat", created=_now()
                )
            store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> None:
        import fcntl

        fh = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise InputError(f"index {self.root} is being written by another process; wait for it to finish") from None
        self._lock_fh = fh

    def _wipe(self) -> None:
        for sub in ("emb", "meta"):
            for p in (self.root / sub).glob("*") if (self.root / sub).is_dir() else ():
                p.unlink()
        for name in (MANIFEST, FAISS_FILE):
            (self.root / name).unlink(missing_ok=True)

    def _recover(self) -> None:
        """Delete temp files and shards no committed manifest lists (left by a killed run)."""
        keep = set(self.manifest.shards)
        removed = 0
        for sub, ext in (("emb", ".npy"), ("meta", ".parquet")):
            d = self.root / sub
            d.mkdir(exist_ok=True)
            for p in d.iterdir():
                if TMP_TAG in p.name or p.name[: -len(ext)] not in keep:
                    p.unlink()
                    removed += 1
        for p in self.root.glob(f"*{TMP_TAG}"):
            p.unlink()
            removed += 1
        if removed:
            log.warning("removed %d leftover file(s) of an interrupted run in %s; resuming", removed, self.root)

    # ------------------------------------------------------------------ state
    def is_current(self, key: str, fingerprint: str, recipe: str) -> bool:
        e = self.manifest.sources.get(key)
        return e is not None and e.fingerprint == fingerprint and e.recipe == recipe

    def shard_paths(self, shard: str) -> tuple[Path, Path]:
        return self.root / "emb" / f"{shard}.npy", self.root / "meta" / f"{shard}.parquet"

    # ------------------------------------------------------------------ writing
    def commit(self, items: Sequence[EncodedSource], settings: Optional[dict] = None) -> np.ndarray:
        """Write ``items`` as one new shard and register them; returns the ids given to the rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self.writable, "store opened read-only"
        m = self.manifest
        items = [it for it in items if len(it.frame_idx)]
        n = sum(len(it.frame_idx) for it in items)
        if n == 0:
            return np.zeros(0, np.int64)
        shard = f"part-{m.next_shard:05d}"
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
        emb_path, meta_path = self.shard_paths(shard)

        def write_npy(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)

        atomic_write(emb_path, write_npy)
        atomic_write(meta_path, lambda tmp: pq.write_table(table, tmp))

        replaced = {m.sources[it.key].shard for it in items if it.key in m.sources}
        for it in items:
            m.sources[it.key] = SourceEntry(
                it.video_id, it.kind, it.fingerprint, it.recipe, shard, len(it.frame_idx), it.duplicates
            )
        m.shards[shard] = n
        m.next_shard += 1
        m.next_id += n
        empty = [s for s in replaced if not any(e.shard == s for e in m.sources.values())]
        for s in empty:
            del m.shards[s]
        self.write_manifest(settings)
        for s in empty:  # only after the manifest that forgets them is committed
            for p in self.shard_paths(s):
                p.unlink(missing_ok=True)
        return ids

    def write_manifest(self, settings: Optional[dict] = None, faiss_current: bool = False) -> None:
        m = self.manifest
        if settings:
            for k, v in settings.items():
                setattr(m, k, v)
        m.generation += 1
        if faiss_current:
            m.faiss_generation = m.generation
        m.updated = _now()
        m.versions = software_versions()
        text = json.dumps(m.to_json(), indent=1, sort_keys=False)
        atomic_write(self.root / MANIFEST, lambda tmp: tmp.write_text(text))

    # ------------------------------------------------------------------ reading
    def _live_mask(self, shard: str, sources: np.ndarray) -> np.ndarray:
        owner = {k: e.shard for k, e in self.manifest.sources.items()}
        return np.fromiter((owner.get(s) == shard for s in sources), dtype=bool, count=len(sources))

    def read_meta(self):
        """Live metadata rows of all shards as one pyarrow Table (ordered by shard, then row)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = []
        for shard in sorted(self.manifest.shards):
            t = pq.read_table(self.shard_paths(shard)[1])
            mask = self._live_mask(shard, np.asarray(t.column("source").to_pylist(), dtype=object))
            parts.append(t.filter(pa.array(mask)) if not mask.all() else t)
        if not parts:
            return _empty_meta()
        return pa.concat_tables(parts)

    def read_vectors(self, shards: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], vectors float32 [n, dim]) of the live rows of ``shards`` (default: all)."""
        import pyarrow.parquet as pq

        ids, vecs = [], []
        for shard in sorted(self.manifest.shards if shards is None else shards):
            emb_path, meta_path = self.shard_paths(shard)
            t = pq.read_table(meta_path, columns=["id", "source"])
            v = np.load(emb_path, mmap_mode="r")
            mask = self._live_mask(shard, np.asarray(t.column("source").to_pylist(), dtype=object))
            ids.append(t.column("id").to_numpy()[mask])
            vecs.append(np.asarray(v[mask], dtype=np.float32))
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.manifest.dim), np.float32)
        return np.concatenate(ids), np.concatenate(vecs)

    @property
    def faiss_path(self) -> Path:
        return self.root / FAISS_FILE

    def faiss_is_current(self) -> bool:
        m = self.manifest
        return self.faiss_path.is_file() and m.faiss_generation == m.generation


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
