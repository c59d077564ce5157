"""Keyframe retrieval sets: a folder of keyframes plus a file of text queries with targets.

Gallery layouts:

* AI Challenge: ``<root>/keyframes/<video_id>/<n>.jpg`` and ``<root>/map-keyframes/<video_id>.csv``
  with columns ``n,pts_time,fps,frame_idx`` (``n`` is the keyframe's number, the file stem).
* Plain: ``<root>/<video_id>/<frame_idx>.jpg`` (the stem is the frame index), or a flat folder of
  images (each image is its own "video" with frame index 0).

Queries (JSONL objects or CSV rows):

* text: ``query`` (or ``text``); optional ``id``.
* target: ``video_id`` and one of ``frame_idx`` (one frame), ``frame_start`` + ``frame_end``
  (an inclusive range) or ``frames`` (a list, or ``"12;40;41"`` in CSV).

A target frame that is not a keyframe (the usual case with AI Challenge answers) is *snapped* to
the nearest keyframe of the same video, and the report says how many were snapped; a query whose
video has no keyframes is dropped with a note.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Optional

from mergeseek.errors import InputError
from mergeseek.eval.datasets.base import FileImages, Query, RetrievalSet, random_indices
from mergeseek.indexing.formats import KEYFRAME_DIR, KEYFRAME_MAP_DIR, list_images, read_keyframe_map

log = logging.getLogger(__name__)

QUERY_FILES = ("queries.jsonl", "queries.csv")


@dataclass(frozen=True)
class _Target:
    qid: str
    text: str
    video_id: str
    frames: tuple[int, ...] = ()
    frame_range: Optional[tuple[int, int]] = None
    aic: Optional[object] = None  # eval.aic_score.AicQuery


def load_keyframes(
    root: Path, queries: Optional[Path] = None, limit: Optional[int] = None, seed: int = 0, name: str = "keyframes",
    channels: Collection[str] = (),
) -> RetrievalSet:
    """Read a keyframe gallery and its queries; ``limit`` keeps a fixed random subset of queries.

    The gallery is always read whole (a smaller gallery would make retrieval easier). A query (or
    a TRAKE event) with ``ocr:`` / ``asr:`` parts needs the frames' text of those ``channels``
    (``cli.py eval --ocr / --asr / --text-from``, ``eval.channels``); without it the query file is
    refused in one line naming the flag to pass.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"keyframe folder {root} does not exist; pass the folder with keyframes/ and map-keyframes/")
    paths, video_ids, frames, times = _read_gallery(root)
    qpath = Path(queries) if queries else next((root / f for f in QUERY_FILES if (root / f).is_file()), None)
    if qpath is None:
        raise InputError(f"no queries file for {root}; put queries.jsonl there or pass queries=PATH")
    targets = _read_queries(qpath)
    from mergeseek.eval.channels import query_channels, refusal

    needs = {t.qid: {c for x in _texts(t) for c in query_channels(x)[1]} for t in targets}
    short = [q for q, need in needs.items() if need - set(channels)]
    if short:  # without the frames' text, "ocr: HÀ NỘI" could only be encoded as a description
        raise InputError(refusal(str(qpath), short, set().union(*(needs[q] for q in short)) - set(channels)))
    keep = random_indices(len(targets), limit, seed)
    targets = [targets[i] for i in keep]

    by_video: dict[str, list[tuple[int, int]]] = {}
    for i, (v, f) in enumerate(zip(video_ids, frames)):
        by_video.setdefault(v, []).append((f, i))
    for v in by_video:
        by_video[v].sort()
    out, snapped, dropped = [], 0, []
    for t in targets:
        rel, snap = _resolve(t, by_video.get(t.video_id, []))
        if not rel:
            dropped.append(t.qid)
            continue
        snapped += snap
        visual, said = query_channels(t.text)
        text = (visual or "") if said else t.text
        out.append(Query(qid=t.qid, text=text, relevant=tuple(sorted(rel)), video_id=t.video_id, aic=t.aic,
                         channels=tuple(sorted(said.items()))))
    notes = []
    if snapped:
        notes.append(f"{snapped} target frame(s) are not keyframes and were snapped to the nearest keyframe of their video")
    if dropped:
        notes.append(f"{len(dropped)} query(ies) dropped because their video has no keyframes: {', '.join(dropped[:5])}")
        log.warning(notes[-1])
    if not out:
        raise InputError(f"none of the {len(targets)} queries in {qpath} has a target video in the gallery {root}")
    return RetrievalSet(
        name=name,
        images=FileImages(tuple(paths)),
        queries=tuple(out),
        video_ids=tuple(video_ids),
        frame_idx=tuple(frames),
        source=f"{root} + {qpath}",
        notes=tuple(notes),
        pts_time=tuple(times),
    )


def _texts(t: _Target) -> list[str]:
    """The query's text and, for TRAKE, its events' texts."""
    events = list(getattr(t.aic, "events", ()) or ()) if t.aic is not None else []
    return [t.text or ""] + [e or "" for e in events]


# ---------------------------------------------------------------------------- gallery
def _read_gallery(root: Path) -> tuple[list[Path], list[str], list[int], list[float]]:
    kf = root / KEYFRAME_DIR
    if kf.is_dir():
        maps = root / KEYFRAME_MAP_DIR
        return _read_aic(kf, sorted(p for p in kf.iterdir() if p.is_dir()),
                         lambda v: maps / f"{v}.csv" if maps.is_dir() else None)
    from mergeseek.indexing.aic import find_release

    release = find_release(root)  # archives side by side: Keyframes_*/keyframes/, map-keyframes*/map-keyframes/
    if release.archive and release.keyframes:
        return _read_aic(root, release.keyframe_dirs(), lambda v: release.map_for(v) or (
            release.maps[0] / f"{v}.csv" if release.maps else None))
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, vids, frames = [], [], []
    if subdirs:
        for d in subdirs:
            for p in list_images(d):
                paths.append(p)
                vids.append(d.name)
                frames.append(_stem_int(p))
    else:
        for p in list_images(root):
            paths.append(p)
            vids.append(p.stem)
            frames.append(0)
    if not paths:
        raise InputError(f"no keyframe images under {root}; expected keyframes/<video_id>/<n>.jpg or <video_id>/<frame>.jpg")
    return paths, vids, frames, [math.nan] * len(paths)


def _read_aic(kf: Path, video_dirs: list, map_for) -> tuple[list[Path], list[str], list[int], list[float]]:
    paths, vids, frames, times = [], [], [], []
    for d in video_dirs:
        map_path = map_for(d.name)
        n_to_frame = _read_map(map_path) if map_path is not None else None
        for p in list_images(d):
            n = _stem_int(p)
            if n_to_frame is not None:
                if n not in n_to_frame:
                    raise InputError(f"{map_path} has no row n={n} for keyframe {p}; the map is incomplete")
                frame, t = n_to_frame[n]
            else:
                frame, t = n, math.nan  # no map: the stem is taken as the frame index
            paths.append(p)
            vids.append(d.name)
            frames.append(frame)
            times.append(t)
    if not paths:
        raise InputError(f"no keyframe images under {kf}; expected {kf}/<video_id>/<n>.jpg")
    return paths, vids, frames, times


def _read_map(path: Path) -> dict[int, tuple[int, float]]:
    if not path.is_file():
        raise InputError(f"keyframe map {path} does not exist; every keyframes/<video_id>/ needs map-keyframes/<video_id>.csv")
    # The shared reader (indexing.formats): BOM-tolerant; a bad row is warned about and left out,
    # so a keyframe that needed it is reported by _read_aic as missing from the map.
    return {n: (row.frame_idx, row.pts_time) for n, row in read_keyframe_map(path).rows.items()}


def _stem_int(p: Path) -> int:
    try:
        return int(p.stem)
    except ValueError:
        raise InputError(f"keyframe {p} is not named by a number (<n>.jpg); rename it or use the AI Challenge layout") from None


# ---------------------------------------------------------------------------- queries
def _read_queries(path: Path) -> list[_Target]:
    from mergeseek.retrieval.records import read_records

    records = read_records(path, "queries file", csv_tables=True)
    for r in records:
        if not isinstance(r.value, dict):
            raise InputError(f"{r.path}:{r.line} is a JSON {type(r.value).__name__}, not an object with text and a target")
    if not records:
        raise InputError(f"queries file {path} is empty")
    return [_with_aic(r.value, i, path) for i, r in enumerate(records, start=1)]


def _with_aic(row: dict, line: int, path: Path) -> _Target:
    """``_target`` plus the official-score ground truth (``eval.aic_score.aic_query_from_row``).

    Optional keys: ``task`` (``kis``, ``qa``/``vqa``, ``trake``; default kis), ``answer`` (QA),
    ``events`` (TRAKE: a list of ``{"text", "frame_start", "frame_end"}`` or ``{"text",
    "frame_idx"}``, optional per-event ``video_id``), ``within`` (TRAKE window in seconds, default
    60) and ``tolerance`` (TRAKE: frames added to each side of an event's range, default 0).
    A TRAKE query's frame-level metrics (R@K, MRR) use its first event.
    """
    from dataclasses import replace as _replace

    from mergeseek.eval.aic_score import aic_query_from_row

    aic = aic_query_from_row(row, f"{path} query {line}")
    if aic is not None and aic.truth.task == "trake":
        first = row["events"][0]
        target_keys = ("frame_start", "frame_end", "frame_idx", "frames", "span")
        row = {**{k: v for k, v in row.items() if k not in target_keys},
               **{k: v for k, v in first.items() if k in target_keys[:3]}}
        if "span" in first:
            row["frame_start"], row["frame_end"] = first["span"]
        row["video_id"] = aic.truth.spans[0].video_id
        if not (row.get("query") or row.get("text")):
            row["query"] = aic.events[0]
    elif row.get("span") not in (None, "") and row.get("frame_start") in (None, ""):
        row = {**row, "frame_start": row["span"][0], "frame_end": row["span"][1]}
    return _replace(_target(row, line, path), aic=aic)


def _target(row: dict, line: int, path: Path) -> _Target:
    text = row.get("query") or row.get("text")
    vid = row.get("video_id")
    if not text or not vid:
        raise InputError(f"{path} query {line} needs 'query' (or 'text') and 'video_id'; got keys {sorted(row)}")
    qid = str(row.get("id") or row.get("qid") or line)

    def present(k: str) -> bool:
        return row.get(k) not in (None, "")

    try:
        if present("frames"):
            raw = row["frames"]
            vals = raw if isinstance(raw, list) else [v for v in str(raw).replace(",", ";").replace(" ", ";").split(";") if v]
            return _Target(qid, str(text), str(vid), frames=tuple(int(float(v)) for v in vals))
        if present("frame_start") and present("frame_end"):
            lo, hi = int(float(row["frame_start"])), int(float(row["frame_end"]))
            if hi < lo:
                raise InputError(f"{path} query {qid}: frame_end {hi} < frame_start {lo}")
            return _Target(qid, str(text), str(vid), frame_range=(lo, hi))
        if present("frame_idx"):
            return _Target(qid, str(text), str(vid), frames=(int(float(row["frame_idx"])),))
    except ValueError:
        raise InputError(f"{path} query {qid}: frame numbers must be integers; got {row}") from None
    raise InputError(f"{path} query {qid} has no target frames: give frame_idx, frame_start+frame_end, or frames")


def _resolve(t: _Target, video: list[tuple[int, int]]) -> tuple[set[int], int]:
    """Gallery indices accepted for target ``t`` among (frame, index) of its video; and snaps made."""
    if not video:
        return set(), 0
    if t.frame_range is not None:
        lo, hi = t.frame_range
        inside = {i for f, i in video if lo <= f <= hi}
        if inside:
            return inside, 0
        # no keyframe inside the range: the keyframe nearest to its middle stands for it
        return {_nearest(video, (lo + hi) // 2)}, 1
    rel, snaps = set(), 0
    exact = {f: i for f, i in video}
    for f in t.frames:
        if f in exact:
            rel.add(exact[f])
        else:
            rel.add(_nearest(video, f))
            snaps += 1
    return rel, snaps


def _nearest(video: list[tuple[int, int]], frame: int) -> int:
    frames = [f for f, _ in video]
    pos = bisect.bisect_left(frames, frame)
    best = min((p for p in (pos - 1, pos) if 0 <= p < len(frames)), key=lambda p: abs(frames[p] - frame))
    return video[best][1]
