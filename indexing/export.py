"""Export an index's live rows in the layout embedding readers expect (clip-retrieval's).

::

    OUT/
      img_emb/img_emb_0.npy          float32 [n, dim], L2-normalised as stored
      metadata/metadata_0.parquet    one row per vector, same order: id, video_id, frame_idx, pts_time, path

Only live rows are written: a source re-indexed once has dead rows in an older shard, and a
reader that loads the shards directly would see both copies. The rows come from the store's read
API (:meth:`IndexStore.read_meta`, :meth:`IndexStore.read_vectors`), which filters them out.
The folder is written under a temporary name beside OUT and renamed into place, so OUT is either
the previous export or the new one, never half of one.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from mergeseek.errors import ConfigError, IndexMismatchError, InputError

log = logging.getLogger(__name__)

FORMATS = ("clip-retrieval",)
COLUMNS = ("id", "video_id", "frame_idx", "pts_time", "path")
EMB_FILE = Path("img_emb") / "img_emb_0.npy"
META_FILE = Path("metadata") / "metadata_0.parquet"


@dataclass(frozen=True)
class ExportReport:
    out: str
    format: str
    rows: int
    dim: int
    dead_rows_skipped: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        return (f"exported {self.rows} vectors (dim {self.dim}) to {self.out} as {self.format}; "
                f"{self.dead_rows_skipped} dead row(s) of re-indexed sources left out")


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
    if out.exists() and not overwrite:
        raise InputError(f"export folder {out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not (out / EMB_FILE).is_file():
        raise InputError(f"{out} exists and is not an export folder ({EMB_FILE} missing); it is left alone, "
                         "choose another --out")

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
    table = pa.table({c: meta.column(c) for c in COLUMNS})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / EMB_FILE.parent).mkdir(parents=True)
        (tmp / META_FILE.parent).mkdir(parents=True)
        with open(tmp / EMB_FILE, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        pq.write_table(table, tmp / META_FILE)
        with open(tmp / META_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        for d in (tmp / EMB_FILE.parent, tmp / META_FILE.parent, tmp):
            fsync_dir(d)
        _swap_in(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(str(out), fmt, len(table), int(dim), int(total - len(table)))
    log.info(report.summary())
    return report


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an old export is moved aside first, removed last."""
    if not out.exists():
        os.replace(tmp, out)
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
