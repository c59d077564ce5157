"""Small JPEG thumbnails of indexed frames, made at index time so that serving never decodes video.

::

    index_dir/thumbs/part-00000.thumbs   one pack per shard: the JPEGs of that shard's rows

A pack is one file, written through a temporary name and ``os.replace`` after its shard is
committed (the same rule as the shards)::

    b"MSTHUMB1" | n: uint64 | ids: int64[n] | hashes: int64[n] | offsets: uint64[n + 1] | JPEG bytes

Each entry carries the frame's perceptual hash from the shard's metadata, so a pack left behind by
an index that was rebuilt (``--force`` starts shard names again at part-00000) is recognised as
stale and made again instead of showing another frame. A run killed between a shard and its pack
leaves a shard without a pack; :func:`ensure_thumbs` (run at the end of every ``index`` run and by
``cli.py thumbs``) decodes the missing frames again from their sources.
"""

from __future__ import annotations

import io
import logging
import mmap
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from mergeseek.errors import InputError
from mergeseek.runtime import atomic_write

log = logging.getLogger(__name__)

THUMB_DIR = "thumbs"
PACK_EXT = ".thumbs"
MAGIC = b"MSTHUMB1"
MAX_SIDE = 256  # pixels of the longer side: sharp in a grid of ~200 px tiles, ~8 KB a frame
QUALITY = 78
DECODE_CHUNK = 32
_PACK_NAME = re.compile(r"^(part-\d{5,})\.thumbs(\.tmp)?$")


def make_jpeg(image, max_side: int = MAX_SIDE, quality: int = QUALITY) -> bytes:
    """A thumbnail of ``image`` (HxWx3 uint8 RGB array or PIL image) as JPEG bytes."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pack_path(root: Path, shard: str) -> Path:
    return Path(root) / THUMB_DIR / f"{shard}{PACK_EXT}"


def write_pack(root: Path, shard: str, ids: np.ndarray, hashes: np.ndarray, jpegs: Sequence[bytes]) -> Path:
    """Write one shard's thumbnails (``ids[i]`` has perceptual hash ``hashes[i]`` and JPEG ``jpegs[i]``)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    hashes = np.ascontiguousarray(hashes, dtype=np.int64)
    if not (len(ids) == len(hashes) == len(jpegs)):
        raise ValueError(f"{len(ids)} ids, {len(hashes)} hashes and {len(jpegs)} thumbnails do not line up")
    sizes = np.fromiter((len(j) for j in jpegs), dtype=np.uint64, count=len(jpegs))
    offsets = np.zeros(len(jpegs) + 1, np.uint64)
    np.cumsum(sizes, out=offsets[1:])
    path = pack_path(root, shard)
    path.parent.mkdir(exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC)
            fh.write(np.uint64(len(ids)).tobytes())
            fh.write(ids.tobytes())
            fh.write(hashes.tobytes())
            fh.write(offsets.tobytes())
            for j in jpegs:
                fh.write(j)

    atomic_write(path, write)
    return path


@dataclass
class Pack:
    """One pack, memory-mapped read-only; ``get`` is safe from many threads."""

    path: Path
    ids: np.ndarray
    hashes: np.ndarray
    offsets: np.ndarray
    data_start: int
    _map: Optional[mmap.mmap] = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path) -> "Pack":
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < len(MAGIC) + 8:
                raise ValueError("too short")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if mm[: len(MAGIC)] != MAGIC:
            mm.close()
            raise ValueError("not a thumbnail pack")
        n = int(np.frombuffer(mm, np.uint64, 1, len(MAGIC))[0])
        head = len(MAGIC) + 8
        data_start = head + 16 * n + 8 * (n + 1)
        if data_start > size:
            mm.close()
            raise ValueError("truncated header")
        ids = np.frombuffer(mm, np.int64, n, head).copy()
        hashes = np.frombuffer(mm, np.int64, n, head + 8 * n).copy()
        offsets = np.frombuffer(mm, np.uint64, n + 1, head + 16 * n).astype(np.int64)
        if n and (offsets[-1] + data_start > size or np.any(np.diff(offsets) < 0)):
            mm.close()
            raise ValueError("truncated data")
        return cls(path, ids, hashes, offsets, data_start, mm)

    def entry(self, i: int) -> bytes:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self._map[self.data_start + a : self.data_start + b]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def open_pack(path: Path) -> Optional[Pack]:
    """The pack at ``path``, or None (with a warning) when it is missing or damaged."""
    if not path.is_file():
        return None
    try:
        return Pack.open(path)
    except (ValueError, OSError) as exc:
        log.warning("ignoring thumbnail pack %s (%s); run `cli.py thumbs --index %s` to make it again",
                    path, exc, path.parent.parent)
        return None


class ThumbReader:
    """Thumbnails of an index by id (read-only, thread-safe).

    Args:
        root: the index folder.
        shards: shard names the manifest lists.
        ids, hashes: the live rows (id and perceptual hash); entries whose hash disagrees with
            the row's are stale and not served.
    """

    def __init__(self, root: Path, shards: Sequence[str], ids: np.ndarray, hashes: np.ndarray):
        self.packs: list[Pack] = []
        ids, hashes = np.asarray(ids, np.int64), np.asarray(hashes, np.int64)
        order = np.argsort(ids, kind="stable")
        want_ids, want_hashes = ids[order], hashes[order]
        got_ids, got_pack, got_entry = [], [], []
        stale = 0
        for shard in sorted(shards):
            pack = open_pack(pack_path(root, shard))
            if pack is None:
                continue
            pos = np.minimum(np.searchsorted(want_ids, pack.ids), max(len(want_ids) - 1, 0))
            live = (want_ids[pos] == pack.ids) if len(want_ids) else np.zeros(len(pack.ids), bool)  # else a dead row
            ok = live & (want_hashes[pos] == pack.hashes) if len(want_ids) else live
            stale += int((live & ~ok).sum())
            got_ids.append(pack.ids[ok])
            got_pack.append(np.full(int(ok.sum()), len(self.packs), np.int32))
            got_entry.append(np.flatnonzero(ok).astype(np.int64))
            self.packs.append(pack)
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        ids_found = cat(got_ids, np.int64)
        o = np.argsort(ids_found, kind="stable")
        self._ids = ids_found[o]
        self._pack = cat(got_pack, np.int32)[o]
        self._entry = cat(got_entry, np.int64)[o]
        if stale:
            log.warning("%d thumbnail(s) in %s belong to an older build of the index and are not shown; "
                        "run `cli.py thumbs --index %s`", stale, root, root)

    def _find(self, id_: int) -> int:
        i = int(np.searchsorted(self._ids, id_))
        return i if i < len(self._ids) and self._ids[i] == id_ else -1

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: int) -> bool:
        return self._find(int(id_)) >= 0

    def get(self, id_: int) -> Optional[bytes]:
        i = self._find(int(id_))
        if i < 0:
            return None
        return self.packs[int(self._pack[i])].entry(int(self._entry[i]))

    def close(self) -> None:
        for p in self.packs:
            p.close()


# ---------------------------------------------------------------------------- writing at index time
class ThumbCollector:
    """Thumbnails made by the indexing reader, held until their source's shard is committed.

    The reader thread calls :meth:`add` (per source, in row order); the writer calls :meth:`write`
    right after ``IndexStore.commit`` with the committed items and their ids.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    def add(self, key: str, jpegs: Sequence[bytes]) -> None:
        with self._lock:
            self._by_key.setdefault(key, []).extend(jpegs)

    def drop(self, key: str) -> None:
        with self._lock:
            self._by_key.pop(key, None)

    def write(self, root: Path, shard: str, items: Sequence, ids: np.ndarray) -> bool:
        """Write the pack of ``shard`` from ``items`` (``EncodedSource`` in commit order); False if incomplete."""
        if len(ids) == 0:
            return False
        jpegs: list[bytes] = []
        complete = True
        with self._lock:
            for it in items:
                got = self._by_key.pop(it.key, None)
                n = len(it.frame_idx)
                if n == 0:
                    continue
                if got is None or len(got) != n:
                    complete = False
                jpegs.extend(got or [])
        if not complete or len(jpegs) != len(ids):
            log.info("thumbnails of %s are incomplete; they are made from the sources at the end of the run", shard)
            return False
        hashes = np.concatenate([np.asarray(it.hashes, np.int64) for it in items if len(it.frame_idx)])
        write_pack(root, shard, ids, hashes, jpegs)
        return True


# ---------------------------------------------------------------------------- existing indexes
@dataclass
class ThumbReport:
    """What :func:`ensure_thumbs` did."""

    index_dir: str
    shards: int = 0
    made: list = field(default_factory=list)  # shard names written now
    thumbnails: int = 0  # made now
    copied: int = 0  # of those, taken ready-made from ``known`` instead of decoded
    missing: list = field(default_factory=list)  # "path: reason" for frames that could not be decoded
    removed: int = 0  # packs of shards the index no longer has

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        line = (f"thumbnails in {self.index_dir}: {len(self.made)} of {self.shards} shard pack(s) made now "
                f"({self.thumbnails} thumbnails), {self.removed} stale pack(s) removed")
        return [line] + [f"not made: {m}" for m in self.missing]


def _shard_rows(store, shard: str):
    t = store.read_shard(shard, columns=["id", "video_id", "frame_idx", "path", "hash", "source"], live=False)
    return {c: t.column(c).to_numpy() if c in ("id", "frame_idx", "hash") else t.column(c).to_pylist()
            for c in t.column_names}


def _pack_is_current(path: Path, rows: dict) -> bool:
    pack = open_pack(path)
    if pack is None:
        return False
    try:
        known = dict(zip(rows["id"].tolist(), rows["hash"].tolist()))
        return all(known.get(i) == h for i, h in zip(pack.ids.tolist(), pack.hashes.tolist()))
    finally:
        pack.close()


def _decode_source(kind: str, key: str, frame_idx: np.ndarray, paths: list) -> list:
    """JPEG thumbnails of the given frames of one source (images: one file per row)."""
    return [j for chunk in iter_decoded(kind, key, frame_idx, paths, make_jpeg) for j in chunk]


def iter_decoded(kind: str, key: str, frame_idx: np.ndarray, paths: list, make: Callable) -> Iterator[list]:
    """``make(frame)`` of the given frames of one source again, ``DECODE_CHUNK`` frames at a time
    (a video: decoded at those frame numbers; keyframe and image folders: one file per row).
    ``make`` gets an HxWx3 uint8 RGB array."""
    if kind != "video":
        from mergeseek.indexing.formats import read_rgb

        for s in range(0, len(paths), DECODE_CHUNK):
            yield [make(read_rgb(p)) for p in paths[s : s + DECODE_CHUNK]]  # the pixels indexing encoded
        return
    from mergeseek.indexing.decoders import open_bounded

    vr = open_bounded(key)  # the frames indexing read: 1080p for larger video, torchcodec for a turned one
    idx = [int(i) for i in frame_idx]
    try:
        step = vr.frames_per_read(idx[0], DECODE_CHUNK) if idx else DECODE_CHUNK  # 8K frames: fewer at once
        for s in range(0, len(idx), step):
            yield [make(f) for f in vr.get_batch(idx[s : s + step])]
    finally:
        vr.close()


def ensure_thumbs(store, force: bool = False, known: Optional[Callable[[str], Optional[list]]] = None) -> ThumbReport:
    """Make the pack of every shard that has none (or a stale one) by decoding its frames again.

    ``store`` is an ``IndexStore`` opened for writing (its lock keeps other writers out). Frames
    whose source is gone or unreadable are listed in the report and left without a thumbnail.
    ``known(key)``: a source's thumbnails in frame order when they exist elsewhere (another
    index, for ``merge-index``), used instead of decoding when there is one for every row.
    """
    from mergeseek.indexing.store import read_manifest

    m = store.manifest
    report = ThumbReport(str(store.root), shards=len(m.shards))
    tdir = Path(store.root) / THUMB_DIR
    if tdir.is_dir():
        # A --force run writes a new generation while readers still use manifest.json: keep both.
        active = read_manifest(store.root)
        keep = set(m.shards) | set(active.shards if active is not None else ())
        for p in tdir.iterdir():
            # only our own names: temp files of a killed run, and packs of shards the index dropped
            mine = _PACK_NAME.match(p.name)
            if mine and (mine.group(2) or mine.group(1) not in keep):
                p.unlink()
                report.removed += 1
    owner = {k: e.shard for k, e in m.sources.items()}
    kinds = {k: e.kind for k, e in m.sources.items()}
    for shard in sorted(m.shards):
        rows = _shard_rows(store, shard)
        path = pack_path(store.root, shard)
        if not force and _pack_is_current(path, rows):
            continue
        live = [i for i, s in enumerate(rows["source"]) if owner.get(s) == shard]
        by_source: dict[str, list[int]] = {}
        for i in live:
            by_source.setdefault(rows["source"][i], []).append(i)
        ids, hashes, jpegs = [], [], []
        for key, idx in by_source.items():
            order = sorted(idx, key=lambda i: rows["frame_idx"][i])
            ready = known(key) if known is not None else None
            try:
                if ready is not None and len(ready) == len(order) and all(j is not None for j in ready):
                    got = ready
                    report.copied += len(got)
                else:
                    got = _decode_source(kinds[key], key, rows["frame_idx"][order], [rows["path"][i] for i in order])
            except Exception as exc:  # a moved, deleted or broken source: the rest still get thumbnails
                reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
                report.missing.append(f"{key}: {reason}")
                log.warning("no thumbnails for %s (%s)", key, reason)
                continue
            ids.extend(int(rows["id"][i]) for i in order)
            hashes.extend(int(rows["hash"][i]) for i in order)
            jpegs.extend(got)
        write_pack(store.root, shard, np.asarray(ids, np.int64), np.asarray(hashes, np.int64), jpegs)
        report.made.append(shard)
        report.thumbnails += len(jpegs)
    return report


def make_thumbs(index_dir, force: bool = False) -> ThumbReport:
    """``cli.py thumbs``: thumbnails for an index built before they existed (or ``force``: all again)."""
    from mergeseek.indexing.store import IndexStore, read_manifest

    root = Path(index_dir)
    m = read_manifest(root) if root.is_dir() else None
    if m is None:
        raise InputError(f"{root} is not a mergeseek index (no manifest.json); build one with `cli.py index VIDEOS --index {root}`")
    with IndexStore.open_for_write(root, m.identity) as store:
        return ensure_thumbs(store, force=force)
