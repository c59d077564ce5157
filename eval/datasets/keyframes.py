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
import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from errors import InputError
from eval.datasets.base import FileImages, Query, RetrievalSet, random_indices
from indexing.formats import KEYFRAME_DIR, KEYFRAME_MAP_DIR, list_images, read_keyframe_map

log = logging.getLogger(__name__)

QUERY_FILES = ("queries.jsonl", "queries.csv")


@dataclass(frozen=True)
class _Target:
    qid: str
    text: str
    video_id: str
    frames: tuple[int, ...] = ()
    frame_range: Optional[tuple[int, int]] = None


def load_keyframes(
    root: Path, queries: Optional[Path] = None, limit: Optional[int] = None, seed: int = 0, name: str = "keyframes"
) -> RetrievalSet:
    """Read a keyframe gallery and its queries; ``limit`` keeps a fixed random subset of queries.

    The gallery is always read whole (a smaller gallery would make retrieval easier).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"keyframe folder {root} does not exist; pass the folder with keyframes/ and map-keyframes/")
    paths, video_ids, frames = _read_gallery(root)
    qpath = Path(queries) if queries else next((root / f for f in QUERY_FILES if (root / f).is_file()), None)
    if qpath is None:
        raise InputError(f"no queries file for {root}; put queries.jsonl there or pass queries=PATH")
    targets = _read_queries(qpath)
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
        out.append(Query(qid=t.qid, text=t.text, relevant=tuple(sorted(rel)), video_id=t.video_id))
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
    )


# ---------------------------------------------------------------------------- gallery
def _read_gallery(root: Path) -> tuple[list[Path], list[str], list[int]]:
    kf = root / KEYFRAME_DIR
    if kf.is_dir():
        return _read_aic(kf, root / KEYFRAME_MAP_DIR)
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
    return paths, vids, frames


def _read_aic(kf: Path, maps: Path) -> tuple[list[Path], list[str], list[int]]:
    paths, vids, frames = [], [], []
    for d in sorted(p for p in kf.iterdir() if p.is_dir()):
        n_to_frame = _read_map(maps / f"{d.name}.csv") if maps.is_dir() else None
        for p in list_images(d):
            n = _stem_int(p)
            if n_to_frame is not None:
                if n not in n_to_frame:
                    raise InputError(f"{maps / (d.name + '.csv')} has no row n={n} for keyframe {p}; the map is incomplete")
                frame = n_to_frame[n]
            else:
                frame = n  # no map: the stem is taken as the frame index
            paths.append(p)
            vids.append(d.name)
            frames.append(frame)
    if not paths:
        raise InputError(f"no keyframe images under {kf}; expected {kf}/<video_id>/<n>.jpg")
    return paths, vids, frames


def _read_map(path: Path) -> dict[int, int]:
    if not path.is_file():
        raise InputError(f"keyframe map {path} does not exist; every keyframes/<video_id>/ needs map-keyframes/<video_id>.csv")
    # The shared reader (indexing.formats): BOM-tolerant; a bad row is warned about and left out,
    # so a keyframe that needed it is reported by _read_aic as missing from the map.
    return {n: row.frame_idx for n, row in read_keyframe_map(path).rows.items()}


def _stem_int(p: Path) -> int:
    try:
        return int(p.stem)
    except ValueError:
        raise InputError(f"keyframe {p} is not named by a number (<n>.jpg); rename it or use the AI Challenge layout") from None


# ---------------------------------------------------------------------------- queries
def _read_queries(path: Path) -> list[_Target]:
    if not path.is_file():
        raise InputError(f"queries file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{n} is not valid JSON ({exc.msg}); one object per line") from None
    if not rows:
        raise InputError(f"queries file {path} is empty")
    return [_target(r, i, path) for i, r in enumerate(rows, start=1)]


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
