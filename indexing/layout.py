"""The on-disk format of an index folder: file names, ``manifest.json``, the shard pair and the
checks that read them without opening the index (see :mod:`mergeseek.indexing.store` for the
layout and the commit protocol; :class:`~mergeseek.indexing.store.IndexStore` is the only writer).

Every path of a shard file is made by :func:`shard_files`; no other module builds or globs them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergeseek.errors import DamagedIndexError, IndexMismatchError, InputError

log = logging.getLogger(__name__)

FORMAT = "mergeseek-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGING = "manifest.next.json"
FAISS_FILE = "index.faiss"
FAISS_NEXT = "index.next.faiss"  # a --force generation's index.faiss until the switch
DELTA_FILE = "index.delta.faiss"  # vectors appended since index.faiss was saved (exact IDMap2,Flat; indexing.writer)
FAISS_MAGIC = b"IxM2"  # FAISS's fourcc of IndexIDMap2, the first bytes of every index.faiss we write
LOCK_FILE = ".lock"
JOURNAL = ".journal"
DAMAGED_DIR = "damaged"
TMP_TAG = ".tmp"
SHARD_META_KEY = b"mergeseek"
_SHARD_NAME = re.compile(r"^part-\d{5,}$")
# What makes two indexes' vectors comparable; anything else (sampling, dedup) is per source.
IDENTITY_KEYS = ("model", "pretrained", "merge", "precision", "dim")


EMB_DIR, META_DIR = "emb", "meta"  # the two halves of every shard pair


def shard_files(root: Path, shard: str) -> tuple[Path, Path]:
    """The shard pair of ``shard``: (``emb/<shard>.npy``, ``meta/<shard>.parquet``) under ``root``."""
    root = Path(root)
    return root / EMB_DIR / f"{shard}.npy", root / META_DIR / f"{shard}.parquet"


def shard_files_on_disk(root: Path) -> list[Path]:
    """Every file under ``emb/`` and ``meta/`` named like a shard (``part-*``), listed or not, sorted."""
    root = Path(root)
    found: list[Path] = []
    for sub, ext in ((EMB_DIR, ".npy"), (META_DIR, ".parquet")):
        found += sorted((root / sub).glob(f"part-*{ext}")) if (root / sub).is_dir() else []
    return found


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
    delta_size: int = -1  # bytes of index.delta.faiss, part of the FAISS state of faiss_generation (-1: none)
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
                      ("faiss_generation", int), ("faiss_size", int), ("delta_size", int), ("memory_budget", int)):
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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:160]




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
    emb, meta = shard_files(root, shard)
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
    d = Path(root) / META_DIR
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
        if p.name in (EMB_DIR, META_DIR) and p.is_dir():
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
        ids = pq.read_table(shard_files(root, shard)[1], columns=["id"]).column("id").to_numpy()
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


