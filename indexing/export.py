"""Export an index's live rows in the layout embedding readers expect (clip-retrieval's).

::

    OUT/
      img_emb/img_emb_0.npy          float32 [n, dim], L2-normalised as stored
      metadata/metadata_0.parquet    one row per vector, same order: id, video_id, frame_idx, pts_time,
                                     path, and the columns clip-retrieval's back end returns by default:
                                     image_path (= path), caption ("VIDEO frame N at HH:MM:SS.mmm"), url ("")
      .mergeseek-export              what this export wrote (the files ``--overwrite`` may replace)

Only live rows are written: a source re-indexed once has dead rows in an older shard, and a
reader that loads the shards directly would see both copies. The rows come from the store's read
API (:meth:`IndexStore.read_meta`, :meth:`IndexStore.read_vectors`), which filters them out.

The folder is written under a temporary name beside OUT and switched into place in one atomic
step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, and a run killed between them
is repaired by the next export), so OUT is the previous export or the new one, never half of one
or none. ``--overwrite`` replaces only a folder that holds nothing but an export's files: a
folder with anything else in it (notes, plots) is refused and left untouched. Leftovers of killed
runs (``.OUT.tmp-*``, ``.OUT.old-*``) are cleaned at the next export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from mergeseek.errors import ConfigError, IndexMismatchError, InputError
from mergeseek.indexing.detect import export_columns

log = logging.getLogger(__name__)

FORMATS = ("clip-retrieval",)
COLUMNS = ("id", "video_id", "frame_idx", "pts_time", "path")
EMB_FILE = Path("img_emb") / "img_emb_0.npy"
META_FILE = Path("metadata") / "metadata_0.parquet"
MARKER = Path(".mergeseek-export")
OWN_FILES = (EMB_FILE, META_FILE, MARKER)


@dataclass(frozen=True)
class ExportReport:
    out: str
    format: str
    rows: int
    dim: int
    dead_rows_skipped: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary_lines(self) -> list[str]:
        return [f"exported {self.rows} vectors (dim {self.dim}) to {self.out} as {self.format}; "
                f"{self.dead_rows_skipped} dead row(s) of re-indexed sources left out"]


def export_index(index_dir: Union[str, Path], out: Union[str, Path], fmt: str = "clip-retrieval",
                 overwrite: bool = False) -> ExportReport:
    """Write the live rows of the index at ``index_dir`` to ``out`` in format ``fmt``.

    Args:
        index_dir: an index folder (``manifest.json``, ``meta/``, ``emb/``).
        out: the export folder; it must not exist unless ``overwrite``.
        fmt: ``clip-retrieval``.
        overwrite: replace an existing export folder (it must look like one).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mergeseek.indexing.store import IndexStore
    from mergeseek.runtime import fsync_dir

    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not known; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    index_dir = Path(index_dir)
    if out.resolve() == index_dir.resolve() or index_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"export folder {out} is inside the index {index_dir}; pass a folder outside it")
    _clean_leftovers(out)
    if out.exists() and not overwrite:
        raise InputError(f"export folder {out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists():
        _check_replaceable(out)

    store = IndexStore.open_for_read(index_dir)
    try:
        meta = store.read_meta()
        ids, vectors = store.read_vectors()
        total = sum(store.manifest.shards.values())
        dim = store.manifest.dim
    finally:
        store.close()
    meta_ids = np.asarray(meta.column("id").to_numpy(), dtype=np.int64)
    if len(meta_ids) != len(ids) or not np.array_equal(meta_ids, ids):
        # Both readers walk the same shards in the same order; align by id if that ever changes.
        pos = {int(i): k for k, i in enumerate(ids)}
        missing = [int(i) for i in meta_ids if int(i) not in pos]
        if missing or len(meta_ids) != len(ids):
            raise IndexMismatchError(f"index {index_dir}: metadata and vectors disagree ({len(meta_ids)} vs {len(ids)} "
                                     "live rows); run `cli.py repair --index DIR` first")
        vectors = vectors[[pos[int(i)] for i in meta_ids]]
    table = pa.table({**{c: meta.column(c) for c in COLUMNS}, **_clip_back_columns(meta), **_text_columns(store, meta_ids),
                      **export_columns(store.root, meta)})

    from mergeseek.runtime import write_error

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / EMB_FILE.parent).mkdir(parents=True)
        (tmp / META_FILE.parent).mkdir(parents=True)
        with open(tmp / EMB_FILE, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        pq.write_table(table, tmp / META_FILE)
        with open(tmp / META_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        with open(tmp / MARKER, "w", encoding="utf-8") as fh:
            json.dump({"format": fmt, "files": [str(p) for p in OWN_FILES]}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        for d in (tmp / EMB_FILE.parent, tmp / META_FILE.parent, tmp):
            fsync_dir(d)
        _swap_in(tmp, out)
        fsync_dir(out.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(str(out), fmt, len(table), int(dim), int(total - len(table)))
    log.info("%s", report.summary_lines()[0])
    return report


def _text_columns(store, ids: np.ndarray) -> dict:
    """``ocr_text`` / ``asr_text``: each row's on-screen text (``index --ocr``) and speech (``index --asr``;
    null where it was not read), each when the index has any."""
    import pyarrow as pa

    from mergeseek.indexing.text import CHANNELS, stored_text

    out = {}
    for channel in CHANNELS:
        text = stored_text(store.root, list(store.manifest.shards), channel)
        if text:
            out[f"{channel}_text"] = pa.array([text[int(i)].text if int(i) in text else None for i in ids], pa.string())
    return out


def _clip_back_columns(meta) -> dict:
    """image_path, caption and url: the columns clip-retrieval's back end returns by default."""
    import pyarrow as pa

    from mergeseek.retrieval.format import format_timestamp

    videos = meta.column("video_id").to_pylist()
    frames = meta.column("frame_idx").to_pylist()
    times = meta.column("pts_time").to_pylist()
    captions = [f"{v} frame {f}" + (f" at {format_timestamp(t)}" if t is not None and np.isfinite(t) else "")
                for v, f, t in zip(videos, frames, times)]
    return {"image_path": meta.column("path"), "caption": pa.array(captions, pa.string()),
            "url": pa.array([""] * len(videos), pa.string())}


def _check_replaceable(out: Path) -> None:
    """Refuse (one line, nothing touched) a folder that holds anything an export does not write."""
    if not out.is_dir() or out.is_symlink():
        raise InputError(f"{out} exists and is not an export folder; it is left alone, choose another --out")
    own = {str(p) for p in OWN_FILES} | {str(p.parent) for p in OWN_FILES if str(p.parent) != "."}
    others = sorted(str(p.relative_to(out)) for p in out.rglob("*") if str(p.relative_to(out)) not in own)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise InputError(f"{out} is not an export folder or holds files an export did not write ({shown}); it is "
                         "left alone: move those files out or choose another --out")
    if not (out / EMB_FILE).is_file():
        raise InputError(f"{out} exists and is not an export folder ({EMB_FILE} missing); it is left alone, "
                         "choose another --out")


def _clean_leftovers(out: Path) -> None:
    """Temporary folders of killed exports: a lost switch is undone (the previous export put back)."""
    parent = out.parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".{out.name}.old-*"):
        if not out.exists():
            os.replace(p, out)  # killed between the two renames: the previous export comes back
            log.warning("restored the previous export %s from a run killed while switching", out)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in place of ``out`` atomically; the old export is removed last."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # out is the new export now, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["COLUMNS", "EMB_FILE", "FORMATS", "META_FILE", "ExportReport", "export_index"]
