"""Where frames come from: video files (decord), AI Challenge keyframe folders, plain image folders.

``discover`` turns the paths a user gave into ``MediaSource`` units (one per video file, per
``keyframes/<video_id>/`` folder, or per folder of images). A source is the unit of incremental
indexing: it has a fingerprint, and it is committed to the index whole or not at all.
``read_frames`` yields a source's frames in batches of ``Frame``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from errors import InputError
from indexing.sampling import SCENE_THUMB, Sampling, thumbnails, scene_indices

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
KEYFRAME_DIR = "keyframes"
KEYFRAME_MAP_DIR = "map-keyframes"


@dataclass(frozen=True)
class Frame:
    """One sampled frame. ``pts_time`` is seconds from the video's start (NaN when unknown)."""

    video_id: str
    frame_idx: int
    pts_time: float
    image: np.ndarray = field(repr=False)  # HxWx3 uint8 RGB
    path: str = ""


@dataclass(frozen=True)
class MediaSource:
    """One unit of indexing.

    Args:
        kind: ``video``, ``keyframes`` (AI Challenge layout) or ``images`` (a folder of images).
        path: the video file or the folder.
        video_id: the id shown in results (file stem or folder name).
        fingerprint: changes when the content changes (size and mtime of every file involved).
        map_csv: for ``keyframes``, the ``map-keyframes/<video_id>.csv`` file if present.
    """

    kind: str
    path: Path
    video_id: str
    fingerprint: str
    map_csv: Optional[Path] = None

    @property
    def key(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class BadInput:
    """A file or folder that could not be used, and why (listed in the end-of-run summary)."""

    path: str
    reason: str


def _file_sig(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _files_fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.name}:{_file_sig(f)}\n".encode())
    return h.hexdigest()[:16]


def _images_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=_natural_key)


def _natural_key(p: Path):
    # 2.jpg before 10.jpg; AI Challenge keyframes are numbered, sometimes without zero padding.
    stem = p.stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def discover(paths: Sequence[Path]) -> tuple[list[MediaSource], list[BadInput]]:
    """Find the sources under ``paths`` (files or folders). Raises when nothing usable exists."""
    sources: list[MediaSource] = []
    bad: list[BadInput] = []
    for raw in paths:
        root = Path(raw).expanduser().resolve()
        if not root.exists():
            bad.append(BadInput(str(raw), "does not exist"))
            continue
        if root.is_file():
            if root.suffix.lower() in VIDEO_EXTS:
                sources.append(MediaSource("video", root, root.stem, _file_sig(root)))
            elif root.suffix.lower() in IMAGE_EXTS:
                sources.append(MediaSource("images", root, root.stem, _files_fingerprint([root])))
            else:
                bad.append(BadInput(str(root), f"not a video ({', '.join(VIDEO_EXTS)}) or image file"))
            continue
        found = _walk(root)
        if not found:
            bad.append(BadInput(str(root), f"no videos ({', '.join(VIDEO_EXTS)}), keyframe folders or images inside"))
        sources.extend(found)
    if not sources:
        what = "; ".join(f"{b.path}: {b.reason}" for b in bad) or "no paths given"
        raise InputError(f"nothing to index ({what}); pass a folder of videos, a keyframes folder or an image folder")
    return _unique_ids(_dedupe_sources(sources)), bad


def _walk(root: Path) -> list[MediaSource]:
    out: list[MediaSource] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames.sort()
        if here.name.lower() == KEYFRAME_MAP_DIR:
            dirnames[:] = []
            continue
        if here.name.lower() == KEYFRAME_DIR:
            out.extend(_keyframe_sources(here))
            dirnames[:] = []  # each child is one video's keyframes, consumed above
            continue
        images = []
        for name in sorted(filenames):
            p = here / name
            ext = p.suffix.lower()
            if ext in VIDEO_EXTS:
                out.append(MediaSource("video", p, p.stem, _file_sig(p)))
            elif ext in IMAGE_EXTS:
                images.append(p)
        if images:
            images.sort(key=_natural_key)
            out.append(MediaSource("images", here, here.name, _files_fingerprint(images)))
    return out


def _keyframe_sources(kf_dir: Path) -> list[MediaSource]:
    out = []
    map_dir = next((d for d in kf_dir.parent.iterdir() if d.name.lower() == KEYFRAME_MAP_DIR and d.is_dir()), None)
    for vdir in sorted(d for d in kf_dir.iterdir() if d.is_dir()):
        images = _images_in(vdir)
        if not images:
            continue
        csv_path = map_dir / f"{vdir.name}.csv" if map_dir is not None else None
        files = images + ([csv_path] if csv_path is not None and csv_path.is_file() else [])
        out.append(
            MediaSource(
                "keyframes",
                vdir,
                vdir.name,
                _files_fingerprint(files),
                csv_path if csv_path is not None and csv_path.is_file() else None,
            )
        )
    return out


def _dedupe_sources(sources: list[MediaSource]) -> list[MediaSource]:
    seen, out = set(), []
    for s in sources:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


def _unique_ids(sources: list[MediaSource]) -> list[MediaSource]:
    """Two sources with one stem (a/x.mp4, b/x.mp4) get their parent folder prefixed."""
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.video_id] = counts.get(s.video_id, 0) + 1
    out = []
    for s in sources:
        if counts[s.video_id] > 1:
            vid = f"{s.path.parent.name}/{s.video_id}"
            s = MediaSource(s.kind, s.path, vid, s.fingerprint, s.map_csv)
        out.append(s)
    return out


# ---------------------------------------------------------------------------- reading frames
class SourceReader:
    """Yields a source's frames in batches; per-image problems are collected in ``skipped``.

    A video that cannot be opened or fails mid-way raises ``InputError`` (the caller drops the
    whole video); an unreadable image in a folder is skipped alone.
    """

    def __init__(self, source: MediaSource, sampling: Sampling, batch_size: int = 32):
        self.source = source
        self.sampling = sampling
        self.batch_size = batch_size
        self.skipped: list[BadInput] = []

    def batches(self) -> Iterator[list[Frame]]:
        if self.source.kind == "video":
            yield from self._video_batches()
        else:
            yield from self._image_batches()

    # ------------------------------------------------------------------ videos
    def _open(self, **kwargs):
        import decord

        path = self.source.path
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file (0 bytes); re-copy it or remove it")
        decord.logging.set_level(decord.logging.QUIET)  # ffmpeg's own chatter; we report one line per file
        try:
            return decord.VideoReader(str(path), ctx=decord.cpu(0), **kwargs)
        except Exception as exc:  # decord raises its own DECORDError or RuntimeError
            if "video stream" in str(exc):
                raise InputError(
                    f"{path}: no video stream that can be decoded (unsupported codec, or no video track); "
                    "re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4"
                ) from None
            detail = _short(exc)
            # decord's "Error reading <path>..." only repeats the path; its own log line says why.
            detail = "" if detail.startswith("Error reading") else f": {detail}"
            raise InputError(
                f"{path}: cannot be decoded as a video (not a video file, or truncated{detail}); "
                "check the file or re-encode it to H.264 mp4"
            ) from None

    def frame_indices(self) -> tuple[np.ndarray, object]:
        """(indices to keep, an open full-size reader)."""
        vr = self._open()
        n = len(vr)
        if n == 0:
            raise InputError(f"{self.source.path}: the video has no frames")
        if self.sampling.mode != "scene":
            return self.sampling.indices(n, float(vr.get_avg_fps())), vr
        small = self._open(width=SCENE_THUMB, height=SCENE_THUMB)
        chunks = (
            thumbnails(_decode(small, list(range(s, min(s + 256, n))), self.source.path))
            for s in range(0, n, 256)
        )
        return scene_indices(chunks, self.sampling.value), vr

    def _video_batches(self) -> Iterator[list[Frame]]:
        indices, vr = self.frame_indices()
        fps = float(vr.get_avg_fps())
        for s in range(0, len(indices), self.batch_size):
            chunk = [int(i) for i in indices[s : s + self.batch_size]]
            images = _decode(vr, chunk, self.source.path)
            times = _timestamps(vr, chunk, fps)
            yield [
                Frame(self.source.video_id, i, t, img, str(self.source.path))
                for i, t, img in zip(chunk, times, images)
            ]

    # ------------------------------------------------------------------ images / keyframes
    def _image_batches(self) -> Iterator[list[Frame]]:
        path = self.source.path
        files = [path] if path.is_file() else _images_in(path)
        meta = _read_keyframe_map(self.source.map_csv) if self.source.map_csv else {}
        batch: list[Frame] = []
        for pos, f in enumerate(files):
            img = self._load_image(f)
            if img is None:
                continue
            n = int(f.stem) if f.stem.isdigit() else None
            if self.source.kind == "keyframes" and n is not None and n in meta:
                frame_idx, pts = meta[n]
            else:
                # Without a map the keyframe number (or the position) is the best frame id we have.
                frame_idx, pts = (n if n is not None and self.source.kind == "keyframes" else pos), math.nan
            batch.append(Frame(self.source.video_id, frame_idx, pts, img, str(f)))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _load_image(self, f: Path) -> Optional[np.ndarray]:
        from PIL import Image

        try:
            if f.stat().st_size == 0:
                raise ValueError("empty file (0 bytes)")
            with Image.open(f) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL raises many types for bad images
            reason = f"unreadable image ({_short(exc)})"
            log.warning("skip %s: %s", f, reason)
            self.skipped.append(BadInput(str(f), reason))
            return None


def _decode(vr, indices: list[int], path: Path) -> np.ndarray:
    try:
        return vr.get_batch(indices).asnumpy()
    except Exception as exc:
        raise InputError(f"{path}: decoding failed at frames {indices[0]}..{indices[-1]} ({_short(exc)}); the file may be truncated") from None


def _timestamps(vr, indices: list[int], fps: float) -> list[float]:
    try:
        ts = np.asarray(vr.get_frame_timestamp(indices), dtype=np.float64)[:, 0]
    except Exception:
        ts = np.full(len(indices), np.nan)
    # Some containers carry no usable pts; fall back to index / average frame rate.
    bad = ~np.isfinite(ts) | (ts < 0)
    if bad.any() and fps > 0:
        ts[bad] = np.asarray(indices, dtype=np.float64)[bad] / fps
    return [float(t) for t in ts]


def _read_keyframe_map(csv_path: Path) -> dict[int, tuple[int, float]]:
    """``map-keyframes/<video_id>.csv`` (n, pts_time, fps, frame_idx) -> {n: (frame_idx, pts_time)}."""
    out: dict[int, tuple[int, float]] = {}
    try:
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                out[int(float(row["n"]))] = (int(float(row["frame_idx"])), float(row["pts_time"]))
    except (KeyError, ValueError, OSError) as exc:
        log.warning("ignoring keyframe map %s (%s); expected columns n,pts_time,fps,frame_idx", csv_path, _short(exc))
        return {}
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    return msg[:200]
