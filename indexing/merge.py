"""``cli.py merge-index A B ... --into C``: combine indexes built apart into one.

Indexes made on other machines, or by separate jobs over parts of an archive, become one index
with the usual commit protocol (``IndexStore.commit``), as if their sources had been indexed
into it in that order:

* the inputs must agree on model, weights, merge config, precision and dim (``IDENTITY_KEYS``);
  anything else is refused with one line before anything is written;
* sources are copied whole, input by input in the order given and, within an input, in the order
  they were committed there (= id order); rows keep their frame order, metadata (video_id,
  frame_idx, pts_time, path, hash, source) and vectors (bit for bit) and thumbnails;
* ids are given by the target as it commits, so they are unique and consecutive. **What "same"
  means for ids**: merging indexes that were each built by one run gives exactly the ids one
  ``index`` run over the inputs' sources in that order gives (``index A_PATHS B_PATHS``); in
  general, a row's new id is its rank in (input order, old id) after the target's existing rows;
* a source already in the target with the same fingerprint and recipe is skipped (merging again
  is a no-op); the same source in two inputs is taken from the first when both copies agree, and
  refused when they differ (two different files under one path: say which one to keep).

Only live rows are read (a re-indexed source's old rows are left behind), one shard at a time.
A merge killed half way resumes like an ``index`` run: committed sources are skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from mergeseek.errors import IndexMismatchError, InputError
from mergeseek.indexing import detect
from mergeseek.indexing.store import IDENTITY_KEYS, EncodedSource, IndexStore, read_manifest
from mergeseek.indexing.thumbs import ThumbReader

log = logging.getLogger(__name__)

COMMIT_ROWS = 65536  # rows per committed shard of the merged index


@dataclass
class MergeReport:
    into: str
    inputs: list = field(default_factory=list)
    sources_copied: int = 0
    vectors_copied: int = 0
    up_to_date: int = 0  # sources the target already held
    duplicates: list = field(default_factory=list)  # source keys found in more than one input (first copy kept)
    vectors_total: int = 0
    index_type: str = ""
    wall_s: float = 0.0
    thumbs_backfilled: int = 0  # thumbnails of an earlier, killed merge copied now
    thumbs_missing: list = field(default_factory=list)  # sources left without thumbnails (and why)
    renamed: dict = field(default_factory=dict)  # source key -> the video id it got instead of its input's
    sidecars: dict = field(default_factory=dict)  # release metadata carried over: videos.json entries, object rows

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    def summary_lines(self) -> list[str]:
        lines = [
            f"merged {len(self.inputs)} index(es) into {self.into}: {self.sources_copied} source(s) and "
            f"{self.vectors_copied} vectors copied, {self.up_to_date} already there; {self.vectors_total} vectors "
            f"in {self.into} ({self.index_type}); {self.wall_s:.1f}s",
        ]
        lines += [f"duplicate {k}: the same source is in several inputs; the first copy was kept" for k in self.duplicates]
        lines += [f"video id {v!r} given to {k} (another source of the merge has its id)" for k, v in self.renamed.items()]
        if self.thumbs_backfilled:
            lines.append(f"{self.thumbs_backfilled} thumbnail(s) an interrupted merge had not written were copied now")
        lines += [f"no thumbnails for {m}; run `cli.py thumbs --index {self.into}` where its media can be read"
                  for m in self.thumbs_missing]
        return lines


def merge_indexes(inputs: Sequence[Union[str, Path]], into: Union[str, Path], index_type: Optional[str] = None,
                  ngpu: int = -1, commit_rows: int = COMMIT_ROWS) -> MergeReport:
    """Copy the sources of ``inputs`` into ``into`` (created if missing) and build its FAISS index.

    Args:
        index_type: FAISS factory string of the merged index (IVF/PQ types are trained on the merged
            vectors); None keeps the target's type, or the first input's for a new target.

    Raises:
        InputError: no inputs, an input that is not an index, or the target among the inputs.
        IndexMismatchError: inputs (or the target) built with another model / weights / merge config /
            precision / dim, or one source with different contents in two inputs.
    """
    from mergeseek.indexing.writer import IndexWriter

    t0 = time.perf_counter()
    into = Path(into)
    roots = [Path(p) for p in inputs]
    if not roots:
        raise InputError("merge-index needs at least one input index: cli.py merge-index A B --into C")
    if any(r.resolve() == into.resolve() for r in roots):
        raise InputError(f"{into} is both an input and the target; merge into a new folder or leave it out of the inputs")
    stores = [IndexStore.open_for_read(r) for r in roots]
    first = stores[0]
    for s in stores[1:]:
        _check_same(first, s)
    target = read_manifest(into) if (into / "manifest.json").is_file() else None
    if target is not None:
        _check_same(first, _Named(into, target))
    plan, duplicates = _plan(stores)
    report = MergeReport(str(into), [str(r) for r in roots], duplicates=duplicates)
    with IndexWriter(into, first.manifest.identity, index_type=index_type or (None if target else first.manifest.index_type),
                     ngpu=ngpu, settings=_settings(stores), shard_rows=commit_rows) as writer:
        from mergeseek.indexing.text import CHANNELS, TEXT_DIR, TextChannel

        if any((s.root / TEXT_DIR).is_dir() for s in stores):
            for channel in CHANNELS:  # on-screen text and speech, carried from the inputs, never read again here
                writer.add_text_channel(TextChannel(channel))
        if (objects := detect.merge_channel(stores)) is not None:  # detected objects too (indexing.detect)
            writer.add_text_channel(objects)
        todo = [(s, k) for s, k in plan if not writer.is_current(k, s.manifest.sources[k].fingerprint, s.manifest.sources[k].recipe)]
        report.up_to_date = len(plan) - len(todo)
        video_ids = _video_ids(plan, writer.store)
        _copy(writer, todo, report, video_ids)
        writer.finish()
        report.sources_copied, report.vectors_copied = writer.stats.sources, writer.stats.rows
        # Thumbnails of shards committed by a run killed before their pack was written (a resumed
        # merge) come from the inputs too; what no input has is decoded from the sources, if found.
        report.thumbs_backfilled, report.thumbs_missing = _backfill_thumbs(writer.store, {k: st for st, k in plan})
        report.sidecars = _merge_sidecars(writer.root, plan, video_ids)
        from mergeseek.indexing.text import drop_foreign_text, remove_stale_text, sync_text_index

        drop_foreign_text(writer.store)
        remove_stale_text(writer.root, set(writer.manifest.shards))
        sync_text_index(writer.root, writer.store.shard_names())
        detect.drop_foreign_objects(writer.store)
        detect.sync_objects(writer.store)  # the detector's rows of objects.parquet: from the carried files
        report.vectors_total = writer.manifest.counts()["vectors"]
        report.index_type = writer.manifest.index_type
    report.wall_s = time.perf_counter() - t0
    return report


@dataclass
class _Named:
    root: Path
    manifest: object


def _check_same(a, b) -> None:
    diffs = [k for k in IDENTITY_KEYS if str(getattr(a.manifest, k)) != str(getattr(b.manifest, k))]
    if diffs:
        have = ", ".join(f"{k}={getattr(b.manifest, k)}" for k in diffs)
        want = ", ".join(f"{k}={getattr(a.manifest, k)}" for k in diffs)
        raise IndexMismatchError(
            f"cannot merge {b.root} with {a.root}: {b.root} was built with {have} but {a.root} with {want}; only "
            "indexes of the same model, weights, merge config, precision and dim can be merged (re-index one of them)"
        )


def _plan(stores: Sequence[IndexStore]) -> tuple[list, list]:
    """[(store, source key)] in merge order, and the keys that more than one input holds."""
    plan, seen, duplicates = [], {}, []
    for s in stores:
        first_id = _first_ids(s)
        for key in sorted(s.manifest.sources, key=lambda k: first_id.get(k, 1 << 62)):
            e = s.manifest.sources[key]
            if key in seen:
                other = seen[key].manifest.sources[key]
                if (other.fingerprint, other.recipe, other.count) != (e.fingerprint, e.recipe, e.count):
                    raise IndexMismatchError(
                        f"source {key} is in {seen[key].root} and in {s.root} with different contents "
                        f"(fingerprint {other.fingerprint} vs {e.fingerprint}, recipe {other.recipe!r} vs {e.recipe!r}); "
                        "re-index it in one of them, or leave one index out"
                    )
                duplicates.append(key)
                continue
            seen[key] = s
            plan.append((s, key))
    return plan, duplicates


def _first_ids(store: IndexStore) -> dict:
    meta = store.read_meta()
    keys = meta.column("source").to_pylist()
    ids = meta.column("id").to_numpy()
    first: dict = {}
    for k, i in zip(keys, ids.tolist()):
        if i < first.get(k, 1 << 62):
            first[k] = i
    return first


def _settings(stores: Sequence[IndexStore]) -> dict:
    """The manifest's informational sampling/dedup: the inputs' value, or all of them when they differ."""
    out = {}
    for k in ("sampling", "dedup"):
        vals = list(dict.fromkeys(str(getattr(s.manifest, k)) for s in stores))
        out[k] = vals[0] if len(vals) == 1 else " | ".join(vals)
    return out


def _natural_id(video_id: str) -> str:
    """The stem ``assign_ids`` started from: ``x/a/clip`` and ``clip#2`` both come from ``clip``."""
    return video_id.rsplit("/", 1)[-1].split("#", 1)[0] or video_id


def _video_ids(plan: list, out: IndexStore) -> dict:
    """Video id of every planned source by the rule of one ``index`` run (``sources.assign_ids``):
    two different sources never share an id (``m1/clip.mp4`` and ``m2/clip.mp4`` become
    ``m1/clip`` and ``m2/clip``), and a source the target already holds keeps its id."""
    from mergeseek.indexing.sources import MediaSource, assign_ids

    existing = {k: e.video_id for k, e in out.manifest.sources.items()}
    sources = [MediaSource(st.manifest.sources[k].kind, Path(k), _natural_id(st.manifest.sources[k].video_id),
                           st.manifest.sources[k].fingerprint) for st, k in plan]
    return {src.key: new.video_id for src, new in zip(sources, assign_ids(sources, existing))}


def _copy(writer, todo: list, report: MergeReport, video_ids: Optional[dict] = None) -> None:
    """Hand the planned sources to the writer in order, each with its thumbnails when the input has them all."""
    current: Optional[_Input] = None
    try:
        for store, key in todo:
            if current is None or current.store is not store:
                if current is not None:  # inputs are consumed one after another: free the previous one
                    current.close()
                current = _Input(store)
            enc, jpegs = current.source(key)
            vid = (video_ids or {}).get(str(Path(key)), enc.video_id)
            if vid != enc.video_id:
                report.renamed[key] = vid
                enc.video_id = vid
            # without a complete set, `cli.py thumbs --index INTO` makes them from the videos
            writer.add(enc, jpegs if all(j is not None for j in jpegs) else None)
            for channel, side in writer.text.items():  # text the input read (else `index --ocr/--asr` reads it)
                texts = current.texts(key, channel)
                if texts is not None:
                    side.add(key, texts)
            writer.commit_if_due()
        writer.flush()
    finally:
        if current is not None:
            current.close()


def _merge_sidecars(root: Path, plan: list, video_ids: dict) -> dict:
    """Carry the inputs' release metadata (``videos.json`` entries, ``objects.parquet`` rows) of the
    planned sources into the target under their target video ids. Runs on every merge, so a merge
    resumed after a kill writes what the interrupted run had not; an input's entry replaces the
    target's for the same video (the same source, copied again)."""
    import json

    import pyarrow.parquet as pq

    from mergeseek.indexing.aic import OBJECTS_FILE, VIDEOS_FILE, _merge_objects, load_video_meta
    from mergeseek.runtime import atomic_write

    by_input: dict = {}
    for st, key in plan:
        by_input.setdefault(st.root, (st, []))[1].append(key)
    meta = load_video_meta(root)
    rows: list = []
    touched: set = set()
    entries = 0
    for st, keys in by_input.values():
        src_meta = load_video_meta(st.root)
        objects = None
        if (st.root / OBJECTS_FILE).is_file():
            try:
                objects = pq.read_table(st.root / OBJECTS_FILE).to_pylist()
            except Exception as exc:  # a damaged side file loses its rows, never the merge
                log.warning("%s: %s is unreadable (%s); its object rows are not merged", st.root, OBJECTS_FILE, exc)
        for key in keys:
            old_id = st.manifest.sources[key].video_id
            new_id = video_ids.get(str(Path(key)), old_id)
            if old_id in src_meta:
                meta[new_id] = src_meta[old_id]
                entries += 1
            if objects is not None:
                mine = [r for r in objects if r.get("video_id") == old_id and not r.get("detector")]  # (release rows)
                if mine:
                    touched.add(new_id)
                    rows += [(new_id, r["n"], r["frame_idx"], r["entity"], r["score"], r["ymin"], r["xmin"], r["ymax"],
                              r["xmax"]) for r in mine]
    if entries:
        atomic_write(root / VIDEOS_FILE, json.dumps(dict(sorted(meta.items())), indent=1, ensure_ascii=False))
    n_obj = _merge_objects(root, rows, touched) if touched else 0
    return {"videos_with_metadata": entries, "objects": len(rows), "objects_total": n_obj}


def _backfill_thumbs(out: IndexStore, holder: dict) -> tuple[int, list]:
    """Write the pack of every target shard that has none (or a stale one): from the inputs'
    thumbnails (``holder``: source key -> the input it was copied from), else decoded again
    (``thumbs.ensure_thumbs``). Returns (thumbnails copied from inputs, sources left without)."""
    from mergeseek.indexing.thumbs import ensure_thumbs

    inputs: dict = {}

    def known(key: str) -> Optional[list]:
        store = holder.get(key)
        if store is None:
            return None
        if store.root not in inputs:
            inputs[store.root] = _Input(store)
        return inputs[store.root].thumbnails(key)  # id order = frame order, as copied

    try:
        report = ensure_thumbs(out, known=known)
    finally:
        for inp in inputs.values():
            inp.close()
    return report.copied, list(report.missing)


class _Input:
    """Live rows of one input index, handed out source by source (one shard's vectors in memory at a time)."""

    def __init__(self, store: IndexStore):
        self.store = store
        self.meta = store.read_meta().sort_by("id")
        self.ids = self.meta.column("id").to_numpy()
        positions: dict = {}
        for pos, k in enumerate(self.meta.column("source").to_pylist()):
            positions.setdefault(k, []).append(pos)
        self.positions = positions
        self.thumbs = ThumbReader(store.root, list(store.manifest.shards), self.ids, self.meta.column("hash").to_numpy())
        from mergeseek.indexing.text import CHANNELS, stored_text

        # channel -> id -> text (index --ocr, --asr)
        self.text = {c: stored_text(store.root, list(store.manifest.shards), c) for c in CHANNELS}
        self.text[detect.CHANNEL] = detect.stored_objects(store)  # index --detect

    def texts(self, key: str, channel: str = "ocr") -> Optional[list]:
        """``key``'s ``channel`` text in id order, or None when the input has not read all of it."""
        ids = self.ids[np.asarray(self.positions.get(key, []), dtype=np.int64)]
        got = [self.text.get(channel, {}).get(int(i)) for i in ids]
        return got if got and all(t is not None for t in got) else None

    def close(self) -> None:
        self.thumbs.close()

    def thumbnails(self, key: str) -> list:
        """``key``'s thumbnails in id (= frame) order; None where the input has none."""
        pos = np.asarray(self.positions.get(key, []), dtype=np.int64)
        return [self.thumbs.get(int(i)) for i in self.ids[pos]]

    def source(self, key: str) -> tuple[EncodedSource, list]:
        """``key``'s rows (id order = frame order) as an ``EncodedSource``, and their thumbnails (None: missing)."""
        store, e = self.store, self.store.manifest.sources[key]
        pos = np.asarray(self.positions.get(key, []), dtype=np.int64)
        if len(pos) != e.count:
            raise InputError(f"{store.root}: source {key} has {len(pos)} rows but its manifest says {e.count}; "
                             f"run `cli.py repair --index {store.root}` first")
        rows = self.meta.take(pos)
        row_ids = self.ids[pos]
        try:
            vectors = store.vectors_by_id(row_ids, e.shard)
        except InputError:
            raise InputError(f"{store.root}: vectors of source {key} are missing from shard {e.shard}; "
                             f"run `cli.py repair --index {store.root}` first") from None
        enc = EncodedSource(
            key=key, video_id=e.video_id, kind=e.kind, fingerprint=e.fingerprint, recipe=e.recipe,
            frame_idx=rows.column("frame_idx").to_numpy().astype(np.int64),
            pts_time=rows.column("pts_time").to_numpy().astype(np.float64),
            paths=rows.column("path").to_pylist(),
            hashes=rows.column("hash").to_numpy().astype(np.int64),
            vectors=vectors,
            duplicates=e.duplicates,
        )
        return enc, [self.thumbs.get(int(i)) for i in row_ids]
