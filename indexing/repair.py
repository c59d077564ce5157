"""Index maintenance: ``repair`` (damaged or lost files) and ``compact`` (drop dead rows).

Both take the writer's lock and follow the commit protocol of ``indexing.store``: new files are
journaled before they exist, ``manifest.json`` is switched atomically, and old files are removed
only after the manifest that forgets them is on disk, so a kill at any point leaves a readable index.
Nothing is ever deleted that the index did not write; a damaged file is moved to ``damaged/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from mergeseek.errors import DamagedIndexError, InputError, path_is_not
from mergeseek.indexing.layout import (
    DAMAGED_DIR, DELTA_FILE, FAISS_FILE, MANIFEST, _described_shards, read_manifest, rebuild_manifest, shard_files_on_disk,
    shard_problem,
)
from mergeseek.indexing.detect import carry_objects, drop_foreign_objects, sync_objects
from mergeseek.indexing.store import IndexStore
from mergeseek.indexing.text import carry_text, drop_foreign_text, remove_stale_text, sync_text_index
from mergeseek.runtime import fsync_dir, write_error

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What ``repair_index`` found and did (``damaged``: one dict per shard moved aside)."""

    index_dir: str
    manifest: str = "ok"  # ok | rebuilt from the shards (was missing) | rebuilt from the shards (was damaged)
    damaged: list = field(default_factory=list)
    unlisted: list = field(default_factory=list)  # shard-like files no manifest lists: left in place
    faiss: str = "ok"  # ok | rebuilt | empty
    vectors: int = 0
    sources: int = 0
    text: dict = field(default_factory=dict)  # text.sqlite brought in line with the text files (indexing.text)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        lines = [f"repair {self.index_dir}: manifest {self.manifest}; index.faiss {self.faiss}; "
                 f"{self.vectors} vectors of {self.sources} source(s)"]
        for d in self.damaged:
            lines.append(f"damaged {d['file']}: {d['reason']}; moved to {d['moved_to']}; "
                         f"{len(d['sources'])} source(s) dropped, re-indexed by the next `cli.py index` run: "
                         + ", ".join(d["video_ids"][:10]) + (" ..." if len(d["video_ids"]) > 10 else ""))
        for p in self.unlisted:
            lines.append(f"left in place (not listed by the manifest): {p}")
        return lines


def _move_aside(root: Path, path: Path) -> str:
    """Move ``path`` (inside the index) to ``damaged/`` under a free name; returns the new relative name."""
    rel = path.relative_to(root)
    target = root / DAMAGED_DIR / rel
    n = 0
    while target.exists():
        n += 1
        target = root / DAMAGED_DIR / rel.with_name(f"{rel.name}.{n}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
        fsync_dir(target.parent)
        fsync_dir(path.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    return target.relative_to(root).as_posix()


def repair_index(root: Union[str, Path], ngpu: int = 0) -> RepairReport:
    """Make an index readable again without losing anything that can be kept.

    * ``manifest.json`` missing or damaged: rebuilt from what the shards say about themselves
      (a damaged manifest is first moved to ``damaged/``).
    * A damaged or missing shard (checked whole: parquet read, ``.npy`` shape, size and checksum):
      its files are moved to ``damaged/`` and its sources dropped from the manifest, so the next
      ``cli.py index`` run over the same inputs encodes them again. Other shards are not touched.
    * ``index.faiss`` unreadable or holding rows that are gone: rebuilt from the shards; lacking
      live rows (those of ``index.delta.faiss``, or of a run killed before its FAISS step): they are
      added to it without training and the delta is removed (``folded``).
    """
    from mergeseek.indexing.faiss_index import build_index, load_index
    from mergeseek.indexing.writer import fold_into_main, save_main

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"index folder {root} {path_is_not(root, 'folder')}; nothing to repair")
    report = RepairReport(str(root))
    store = IndexStore.open_for_repair(root)
    try:
        try:
            m = read_manifest(root)
        except DamagedIndexError:
            moved = _move_aside(root, root / MANIFEST)
            log.warning("%s is damaged; moved to %s and rebuilt from the shards", root / MANIFEST, moved)
            m, report.manifest = None, "rebuilt from the shards (the damaged one is in damaged/)"
        if m is None:
            if not _described_shards(root):
                raise InputError(f"{root} has no {MANIFEST} and no shard that describes itself; "
                                 "it cannot be rebuilt: index the videos again into a new folder")
            m = rebuild_manifest(root)
            if report.manifest == "ok":
                report.manifest = "rebuilt from the shards (it was missing)"
        store.recover(m)
        for shard in store.shard_names():
            problem = shard_problem(root, shard, m.shards[shard], m.dim, deep=True)
            if problem is None:
                continue
            path, reason = problem
            dropped = {k: e for k, e in m.sources.items() if e.shard == shard}
            moved = [_move_aside(root, p) for p in store.shard_paths(shard) if p.is_file()]
            for k in dropped:
                del m.sources[k]
            del m.shards[shard]
            report.damaged.append({"shard": shard, "file": str(path), "reason": reason, "moved_to": ", ".join(moved),
                                   "sources": sorted(dropped), "video_ids": sorted(e.video_id for e in dropped.values())})
        listed = {p.relative_to(root).as_posix() for s in m.shards for p in store.shard_paths(s)}
        report.unlisted = [p.relative_to(root).as_posix() for p in shard_files_on_disk(root)
                           if p.relative_to(root).as_posix() not in listed]
        type_known = m.faiss_generation >= 0  # -1: a new --index-type waits for its build
        m.faiss_generation = -1
        store.write_manifest()
        ids, vecs = store.read_vectors()
        report.vectors, report.sources = len(ids), len(m.sources)
        report.faiss, index = _check_faiss(store, ids, load_index)
        if report.faiss.startswith("lacks") and type_known and len(ids):
            added = fold_into_main(store, ids, index)
            report.faiss = f"folded ({added} vector(s) of the delta or of an interrupted run added, no training)"
        elif report.faiss != "ok" and len(ids):
            save_main(store, build_index(vecs, ids, m.index_type, ngpu=ngpu, memory_budget=m.memory_budget))
            report.faiss = "rebuilt"
        elif len(ids):
            store.drop_delta()  # index.faiss holds every row: a delta beside it is redundant
            store.write_manifest(faiss_current=True)
        elif report.faiss != "ok":
            report.faiss = "empty (no vectors left)"
        # text.sqlite is derived like index.faiss: rebuilt from the per-shard text files that still belong
        remove_stale_text(root, set(m.shards))
        drop_foreign_text(store)
        report.text = sync_text_index(root, store.shard_names())
        drop_foreign_objects(store)
        sync_objects(store)  # the detector's rows of objects.parquet: those of the files still there
    finally:
        store.close()
    return report


def _check_faiss(store: IndexStore, ids: np.ndarray, load_index) -> tuple[str, object]:
    """(what index.faiss is against the live ``ids``, the loaded index or None): ok, lacks N rows
    (all it holds are live), or missing / damaged / stale."""
    import faiss

    if not store.faiss_path.is_file():
        return "missing", None
    try:
        index = load_index(store.faiss_path)
    except DamagedIndexError:
        return "damaged", None
    try:
        have = np.sort(faiss.vector_to_array(index.id_map))
    except AttributeError:  # not an IDMap: not written by mergeseek
        return "not an id-mapped index", None
    want = np.sort(ids)
    if np.array_equal(have, want):
        return "ok", index
    if len(np.unique(have)) == len(have) and np.isin(have, want).all():
        return f"lacks {len(want) - len(have)} rows", index
    return f"stale ({index.ntotal} vectors, the shards hold {len(ids)})", None


class CompactReport(dict):
    """What :func:`compact_index` did: counts before and after (a dict, with the report protocol's views)."""

    def to_dict(self) -> dict:
        return dict(self)

    def summary_lines(self) -> list[str]:
        before, after = self["before"], self["after"]
        return [f"compact {self['index_dir']}: {self['shards_rewritten']} shard(s) rewritten; dead rows "
                f"{before['dead_rows']} -> {after['dead_rows']}; {after['vectors']} vectors in "
                f"{after['shards']} shard(s); {self['faiss']}"]


def compact_index(root: Union[str, Path]) -> CompactReport:
    """Rewrite the shards that hold dead rows with their live rows only (ids unchanged).

    New shards are written first, then ``manifest.json`` switches to them, then the old shards
    are removed; a kill at any point leaves the old or the new index, both readable.
    index.faiss keeps matching (same ids, same vectors); a delta beside it (``index.delta.faiss``)
    is folded into it (no training). Returns counts before and after.
    """
    from mergeseek.indexing.writer import fold_into_main

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"index folder {root} {path_is_not(root, 'folder')}")
    m0 = read_manifest(root)
    if m0 is None:
        raise InputError(f"{root} has no {MANIFEST}; it is not a mergeseek index (`cli.py repair --index {root}` "
                         "rebuilds a lost manifest)")
    before = m0.counts()
    with IndexStore.open_for_write(root, m0.identity) as store:
        m = store.manifest
        was_current = store.faiss_is_current()
        old = [shard for shard in store.shard_names()
               if sum(e.count for e in m.sources.values() if e.shard == shard) != m.shards[shard]]
        for shard in old:
            new = store.rewrite_shard(shard)  # its live rows, if any, into a new shard
            if new is not None:  # with their on-screen text (indexing.text) and objects (indexing.detect), if any
                ids = store.read_shard(new, columns=["id"], live=False).column("id").to_numpy()
                carry_text(root, shard, new, ids)
                carry_objects(root, shard, new, ids)
        store.retire_shards(old, faiss_current=was_current)
        folded = None
        if was_current and store.has_delta():
            folded = fold_into_main(store, _live_ids(store))
        remove_stale_text(root, set(m.shards))
        drop_foreign_text(store)
        sync_text_index(root, store.shard_names())
        after = m.counts()
    faiss = FAISS_FILE + (" unchanged" if was_current else " stale (rebuilt by the next index run)")
    if folded is not None:
        faiss = f"{DELTA_FILE} ({folded} vectors) folded into {FAISS_FILE} (no training)"
    return CompactReport(index_dir=str(root), shards_rewritten=len(old), before=before, after=after, faiss=faiss)


def _live_ids(store: IndexStore) -> np.ndarray:
    from mergeseek.indexing.faiss_index import live_ids_by_shard

    by_shard = live_ids_by_shard(store)
    return np.concatenate(list(by_shard.values())) if by_shard else np.zeros(0, np.int64)


__all__ = ["CompactReport", "RepairReport", "compact_index", "repair_index"]
