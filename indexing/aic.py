"""The HCMC AI Challenge release layout: archives extracted side by side under one root.

::

    ROOT/
      Keyframes_L21/keyframes/L21_V001/001.jpg ...        keyframes (what is indexed)
      Videos_L21_a/L21_V001.mp4 ...                        the videos (played from results)
      map-keyframes-aic25-b1/map-keyframes/L21_V001.csv    n,pts_time,fps,frame_idx (n is 1-based;
                                                           frame_idx is the real frame, the one submitted)
      media-info-aic25-b1/media-info/L21_V001.json         title, description, keywords, publish_date, watch_url
      objects-aic25-b1/objects/L21_V001/001.json           detections of keyframe n = 1
      clip-features-32-aic25-b1/clip-features-32/L21_V001.npy  ViT-B/32 float16, row i = keyframe n = i + 1

Every part is matched to a keyframe folder by video id (the folder / file stem). Parts that live
elsewhere are given with ``--maps DIR``, ``--media-info DIR``, ``--videos DIR``, ``--objects DIR``,
``--features DIR`` (``ReleaseParts.with_overrides``).

Besides the index, a release gives per-video metadata written beside it (never in the store's
``emb/`` or ``meta/``): ``videos.json`` (media-info and the video file, for results and playback)
and ``objects.parquet`` (detections at or above ``OBJECT_MIN_SCORE``, for filtering).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mergeseek.errors import InputError

log = logging.getLogger(__name__)

# part name -> (archive folder prefixes, inner folder name); prefixes are compared lower-case.
PARTS = {
    "keyframes": (("keyframes",), "keyframes"),
    "maps": (("map-keyframes",), "map-keyframes"),
    "media_info": (("media-info",), "media-info"),
    "objects": (("objects",), "objects"),
    "features": (("clip-features",), "clip-features-32"),
    "videos": (("videos",), None),
}
OVERRIDE_FLAGS = {"maps": "--maps", "media_info": "--media-info", "videos": "--videos", "objects": "--objects",
                  "features": "--features"}
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
VIDEOS_FILE = "videos.json"
OBJECTS_FILE = "objects.parquet"
OBJECT_MIN_SCORE = 0.5
MEDIA_KEYS = ("title", "description", "keywords", "publish_date", "watch_url", "author", "channel_id",
              "channel_url", "length", "thumbnail_url")
_UP_LEVELS = 4  # how far above a given path the release root may be


@dataclass(frozen=True)
class ReleaseParts:
    """Where each part of a release lives (folders holding the per-video files directly).

    Args:
        root: the release root (None when only overrides were given).
        keyframes: folders whose children are ``<video_id>/`` keyframe folders.
        maps, media_info, objects, features: folders of ``<video_id>.csv`` / ``.json`` /
            ``<video_id>/`` / ``.npy``.
        videos: folders holding ``<video_id>.mp4`` (searched two levels deep).
    """

    root: Path | None = None
    keyframes: tuple[Path, ...] = ()
    maps: tuple[Path, ...] = ()
    media_info: tuple[Path, ...] = ()
    objects: tuple[Path, ...] = ()
    features: tuple[Path, ...] = ()
    videos: tuple[Path, ...] = ()
    archive: bool = False  # found as archives side by side (Keyframes_*/keyframes/, map-keyframes-*/...)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_release(self) -> bool:
        return bool(self.keyframes or self.features)

    def with_overrides(self, overrides: dict | None) -> ReleaseParts:
        """Replace parts by user-given folders (``{"maps": Path, ...}``); each must exist."""
        if not overrides:
            return self
        changes = {}
        for part, path in overrides.items():
            if path is None:
                continue
            if part not in OVERRIDE_FLAGS:
                raise InputError(f"unknown release part {part!r}; valid: {', '.join(OVERRIDE_FLAGS)}")
            p = Path(path).expanduser().resolve()
            if not p.is_dir():
                raise InputError(f"{OVERRIDE_FLAGS[part]} {path}: no such folder; pass the folder holding the "
                                 f"per-video files (or the archive folder above it)")
            changes[part] = _inner_dirs(p, part)
        return replace(self, _cache={}, **changes)

    # ------------------------------------------------------------------ per-video files
    def _file(self, part: str, video_id: str, suffix: str, folder: bool = False) -> Path | None:
        """The first ``<dir>/<video_id><suffix>`` of the right kind (file, or folder) over the
        part's directories; one of the wrong kind does not hide a later one."""
        for d in getattr(self, part):
            p = d / f"{video_id}{suffix}"
            if (p.is_dir() if folder else p.is_file()):
                return p
        return None

    def map_for(self, video_id: str) -> Path | None:
        return self._file("maps", video_id, ".csv")

    def media_info_for(self, video_id: str) -> Path | None:
        return self._file("media_info", video_id, ".json")

    def objects_for(self, video_id: str) -> Path | None:
        return self._file("objects", video_id, "", folder=True)

    def features_for(self, video_id: str) -> Path | None:
        return self._file("features", video_id, ".npy")

    def video_for(self, video_id: str) -> Path | None:
        if "videos" not in self._cache:
            found: dict = {}
            for d in self.videos:
                for p in _video_files(d):
                    found.setdefault(p.stem, p)
            self._cache["videos"] = found
        return self._cache["videos"].get(video_id)

    def keyframe_dirs(self, under: Path | None = None) -> list[Path]:
        """Every ``keyframes/<video_id>/`` folder (only those inside ``under`` when given)."""
        out = []
        for kf in self.keyframes:
            for d in sorted(p for p in kf.iterdir() if p.is_dir()):
                if under is None or _is_within(d, under) or _is_within(under, d):
                    out.append(d)
        return out

    def keyframe_dir_for(self, video_id: str) -> Path | None:
        """The ``keyframes/<video_id>/`` folder of a video (first archive that has it), None if none."""
        if "keyframe_dirs" not in self._cache:
            found: dict = {}
            for d in self.keyframe_dirs():
                found.setdefault(d.name, d)
            self._cache["keyframe_dirs"] = found
        return self._cache["keyframe_dirs"].get(video_id)


# ---------------------------------------------------------------------------- discovery
def find_release(path: Path, overrides: dict | None = None) -> ReleaseParts:
    """The release that ``path`` belongs to (``path`` is its root or anything under it).

    Returns a ``ReleaseParts`` whose ``is_release`` is False when ``path`` is not in a release
    (then only the overrides are filled in).
    """
    path = Path(path).expanduser().resolve()
    start = path if path.is_dir() else path.parent
    plain = None
    for cand in [start, *list(start.parents)[:_UP_LEVELS]]:
        if cand != start and not _names_a_part(start.relative_to(cand).parts[0]):
            continue  # only climb out of a release's own archive folders
        parts = _parts_at(cand)
        if parts.archive:
            return parts.with_overrides(overrides)
        if parts.is_release and plain is None:
            plain = parts  # a bare keyframes/ folder: used unless a release of archives lies above
    return (plain or ReleaseParts()).with_overrides(overrides)


def _names_a_part(name: str) -> bool:
    low = name.lower()
    return any(low.startswith(prefixes) for prefixes, _ in PARTS.values())


def _parts_at(root: Path) -> ReleaseParts:
    """Parts found directly under ``root`` (archive folders side by side)."""
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return ReleaseParts()
    found: dict = {k: [] for k in PARTS}
    archive = False
    for child in children:
        low = child.name.lower()
        for part, (prefixes, inner) in PARTS.items():
            if not low.startswith(prefixes):
                continue
            if part in ("keyframes", "maps", "features") and low not in ("keyframes", "map-keyframes"):
                archive = archive or bool(_inner_dirs(child, part, strict=True))
            if part == "keyframes" and low == "keyframes":
                # a bare keyframes/ folder next to map-keyframes/ (the older, single-archive layout)
                found[part].append(child)
            elif part == "maps" and low == "map-keyframes" or part == "videos":
                found[part].append(child)
            else:
                found[part].extend(_inner_dirs(child, part, strict=True))
    if not found["keyframes"] and not found["features"]:
        return ReleaseParts()
    return ReleaseParts(root=root, archive=archive, **{k: tuple(v) for k, v in found.items()})


def _inner_dirs(folder: Path, part: str, strict: bool = False) -> tuple[Path, ...]:
    """The folder(s) of per-video files for ``part`` inside an archive folder (or the folder itself)."""
    inner = PARTS[part][1]
    if part == "videos":
        return (folder,)
    sub = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == inner] if inner else []
    if not sub and part == "features":  # clip-features-32/, clip-features-16/, ...
        sub = [p for p in folder.iterdir() if p.is_dir() and p.name.lower().startswith("clip-features")]
    if sub:
        return tuple(sorted(sub))
    return () if strict else (folder,)


def _video_files(folder: Path, depth: int = 2) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if len(here.relative_to(folder).parts) >= depth:
            dirnames[:] = []
        for name in sorted(filenames):
            if Path(name).suffix.lower() in VIDEO_EXTS:
                yield here / name


def _playable(video: Path, root: Path) -> tuple[str, str] | None:
    """(path, size-mtime signature) of a release video the web app may play, or None (one warning).

    Release videos are recorded, not decoded, so nothing else looks at them: a link whose target
    leaves the release (a downloaded archive can hold ``L01_V001.mp4 -> /etc/passwd``), a broken
    link or anything but a regular file is not recorded. The web app serves the file only while
    it still has the signature recorded here (``serve.engine.Catalog.video``).
    """
    from mergeseek.runtime import regular_file_sig

    try:
        real, sig = regular_file_sig(video)
    except (OSError, ValueError) as exc:
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "not a regular file"
        log.warning("release video %s cannot be played (%s); it is not recorded for playback", video, why)
        return None
    if real != Path(os.path.abspath(video)) and not _is_within(real, Path(os.path.realpath(root))):
        log.warning("release video %s is a link to %s, outside the release %s; it is not recorded for playback",
                    video, real, root)
        return None
    return str(video), sig


def _is_within(p: Path, parent: Path) -> bool:
    try:
        p.relative_to(parent)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------- per-video metadata
def read_media_info(path: Path) -> dict:
    """The fields of a ``media-info/<video_id>.json`` kept in ``videos.json`` (unknown keys dropped)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring media info %s (%s); expected a JSON object with title, watch_url, ...", path, exc)
        return {}
    if not isinstance(raw, dict):
        log.warning("ignoring media info %s: not a JSON object", path)
        return {}
    out = {k: raw[k] for k in MEDIA_KEYS if k in raw}
    if isinstance(out.get("keywords"), str):
        out["keywords"] = [k.strip() for k in out["keywords"].split(",") if k.strip()]
    return out


def video_metadata(parts: ReleaseParts, video_ids: Sequence[str]) -> dict:
    """``{video_id: {title, ..., watch_url, video_path, media_info_path, map_path}}`` for ``video_ids``."""
    out = {}
    for vid in video_ids:
        base = vid.rsplit("/", 1)[-1]
        entry: dict = {}
        mi = parts.media_info_for(base)
        if mi is not None:
            entry.update(read_media_info(mi))
            entry["media_info_path"] = str(mi)
        video = parts.video_for(base)
        checked = _playable(video, parts.root) if video is not None else None
        if checked is not None:
            entry["video_path"], entry["video_sig"] = checked
        mp = parts.map_for(base)
        if mp is not None:
            entry["map_path"] = str(mp)
        if entry:
            out[vid] = entry
    return out


def read_objects(folder: Path, video_id: str, min_score: float = OBJECT_MIN_SCORE,
                 frame_of: dict | None = None) -> list[tuple]:
    """Detections of ``objects/<video_id>/<n>.json`` with score >= ``min_score``.

    Rows: (video_id, n, frame_idx, entity, score, ymin, xmin, ymax, xmax); ``frame_idx`` is the
    real frame from ``frame_of`` ({n: frame_idx}, the video's map), -1 when unknown. Scores and
    boxes may be strings in the organisers' files.
    """
    frame_of = frame_of or {}
    rows = []
    for f in sorted(Path(folder).glob("*.json")):
        if not f.stem.isdigit():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8-sig"))
            names = d.get("detection_class_entities") or d.get("detection_class_names") or []
            scores = [float(s) for s in d.get("detection_scores", [])]
            boxes = d.get("detection_boxes", [])
        except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            log.warning("ignoring detections %s (%s)", f, exc)
            continue
        for i, (name, score) in enumerate(zip(names, scores)):
            if score < min_score:
                continue
            box = [float(x) for x in boxes[i]] if i < len(boxes) and len(boxes[i]) == 4 else [math.nan] * 4
            n = int(f.stem)
            rows.append((video_id, n, int(frame_of.get(n, -1)), str(name), score, *box))
    return rows


def write_sidecars(index_dir: Path, parts_by_video: dict, min_score: float = OBJECT_MIN_SCORE) -> dict:
    """Merge the metadata of these videos into ``index_dir/videos.json`` and ``objects.parquet``.

    Args:
        parts_by_video: ``{video_id: ReleaseParts}`` (each video's release).

    Returns: counts ``{"videos_with_metadata": n, "objects": rows}``.
    """
    from mergeseek.runtime import atomic_write

    index_dir = Path(index_dir)
    meta = load_video_meta(index_dir)
    objects: list[tuple] = []
    touched = set()
    for vid, parts in parts_by_video.items():
        new = video_metadata(parts, [vid])
        if new:
            meta[vid] = new[vid]
        folder = parts.objects_for(vid.rsplit("/", 1)[-1])
        if folder is not None:
            objects.extend(read_objects(folder, vid, min_score, _frames_of(parts, vid)))
            touched.add(vid)
    if meta:
        text = json.dumps(dict(sorted(meta.items())), indent=1, ensure_ascii=False)
        atomic_write(index_dir / VIDEOS_FILE, text)  # UTF-8; file and folder fsynced
    n_obj = _merge_objects(index_dir, objects, touched) if touched else 0
    return {"videos_with_metadata": len(meta), "objects": n_obj}


def _frames_of(parts: ReleaseParts, video_id: str) -> dict:
    from mergeseek.indexing.formats import read_keyframe_map

    mp = parts.map_for(video_id.rsplit("/", 1)[-1])
    if mp is None:
        return {}
    try:
        return {n: r.frame_idx for n, r in read_keyframe_map(mp).rows.items()}
    except InputError as exc:
        log.warning("%s", exc)
        return {}


def objects_in_frames(index_dir: Path, entity: str, min_score: float | None = None) -> set:
    """(video_id, frame_idx) of the keyframes with a detection of ``entity`` (case-insensitive), for filtering hits.

    Every stored row already passed the score it was stored with (``OBJECT_MIN_SCORE`` for a release's
    files, ``--detect-min-score`` for a detector's), so by default every row counts; ``min_score``
    filters further."""
    import pyarrow.parquet as pq

    path = Path(index_dir) / OBJECTS_FILE
    if not path.is_file():
        raise InputError(f"{index_dir} has no {OBJECTS_FILE}; index an AI Challenge release with its objects*/ folder "
                         "(or pass --objects DIR), or run `cli.py index ... --detect SPEC` on it (docs/INDEXING.md), "
                         "to filter by detected objects")
    t = pq.read_table(path, columns=["video_id", "frame_idx", "entity", "score"]).to_pylist()
    want = entity.strip().casefold()
    return {(r["video_id"], r["frame_idx"]) for r in t
            if r["entity"].casefold() == want and (min_score is None or r["score"] >= min_score)}


def object_names(index_dir: Path) -> list[str]:
    """The distinct object names of ``index_dir``'s objects.parquet (sorted; empty without the file)."""
    import pyarrow.parquet as pq

    path = Path(index_dir) / OBJECTS_FILE
    if not path.is_file():
        return []
    return sorted(set(pq.read_table(path, columns=["entity"]).column("entity").to_pylist()))


OBJECT_COLUMNS = ("video_id", "n", "frame_idx", "entity", "score", "ymin", "xmin", "ymax", "xmax", "detector")


def _merge_objects(index_dir: Path, rows: list, touched: set, replace_detector: bool = False) -> int:
    """Write ``objects.parquet`` with ``rows`` added: the release's rows (9 values, ``detector`` "") of
    ``touched`` videos replace theirs; detector rows (``indexing.detect``, the spec last) are kept,
    unless ``replace_detector`` (then ``rows`` are all of them). Returns the rows in the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mergeseek.runtime import atomic_write

    rows = [tuple(r) + ("",) * (len(OBJECT_COLUMNS) - len(r)) for r in rows]
    schema = pa.schema([("video_id", pa.string()), ("n", pa.int64()), ("frame_idx", pa.int64()), ("entity", pa.string()),
                        ("score", pa.float64()), ("ymin", pa.float64()), ("xmin", pa.float64()),
                        ("ymax", pa.float64()), ("xmax", pa.float64()), ("detector", pa.string())])
    new = pa.table({c: list(v) for c, v in zip(OBJECT_COLUMNS, zip(*rows))} if rows else {c: [] for c in OBJECT_COLUMNS},
                   schema=schema)
    path = index_dir / OBJECTS_FILE
    if path.is_file():
        old = pq.read_table(path)
        if "detector" not in old.column_names:  # written before detector rows existed: all the release's
            old = old.append_column("detector", pa.array([""] * old.num_rows, pa.string()))
        det = old.column("detector").to_pylist()
        keep = np.asarray([(not replace_detector) if d else v not in touched
                           for v, d in zip(old.column("video_id").to_pylist(), det)], dtype=bool)
        new = pa.concat_tables([old.select(list(OBJECT_COLUMNS)).cast(schema).filter(pa.array(keep)), new])
    atomic_write(path, lambda tmp: pq.write_table(new, tmp))
    return new.num_rows


def load_video_meta(index_dir: Path) -> dict:
    """``videos.json`` of an index ({} when absent)."""
    path = Path(index_dir) / VIDEOS_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s (%s); re-run `cli.py index` to rewrite it", path, exc)
        return {}
    return d if isinstance(d, dict) else {}


def write_release_metadata(index_dir: Path, sources: Sequence, overrides: dict | None = None,
                           video_ids: set | None = None) -> dict:
    """``write_sidecars`` for the keyframe ``sources`` that belong to a release (or have overrides).

    Args:
        video_ids: only these videos (default: every keyframe source given).
    """
    by_video: dict = {}
    releases: dict = {}
    for s in sources:
        if s.kind != "keyframes" or (video_ids is not None and s.video_id not in video_ids):
            continue
        kf = Path(s.path).parent
        if kf not in releases:
            releases[kf] = find_release(kf, overrides)
        parts = releases[kf]
        if parts.is_release or overrides:
            by_video[s.video_id] = parts
    if not by_video:
        return {}
    return write_sidecars(Path(index_dir), by_video)


def unmapped_warning(video_id: str, path: Path) -> str:
    return (f"NO KEYFRAME MAP for {video_id} ({path}): frame_idx will only be the keyframe number and the time is "
            f"unknown, so submissions from it are wrong; put map-keyframes/{video_id}.csv beside the keyframes "
            f"archive or pass --maps DIR")
