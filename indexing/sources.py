"""Where frames come from: video files, AI Challenge keyframe folders, plain image folders.

``discover`` turns the paths a user gave into ``MediaSource`` units (one per video file, per
``keyframes/<video_id>/`` folder, or per folder of images). A source is the unit of incremental
indexing: it has a fingerprint, and it is committed to the index whole or not at all.
``SourceReader`` yields a source's frames in batches of ``Frame``.

Nothing a user points at aborts the run: a broken or looping symbolic link, an unreadable file
or folder, a damaged image or a bad keyframe-map row is listed as a ``BadInput`` and skipped;
a video that decodes only in part is indexed in part and listed too.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from mergeseek.errors import InputError
from mergeseek.indexing.aic import ReleaseParts, find_release
from mergeseek.runtime import file_sig, first_by
from mergeseek.indexing.decoders import DEFAULT_BACKEND, open_bounded, open_video
from mergeseek.indexing.formats import (
    HEIF_EXTS,
    IMAGE_EXTS,
    KEYFRAME_DIR,
    KEYFRAME_MAP_DIR,
    MPEG_TS_EXTS,
    UNREAD_EXTS,
    VIDEO_EXTS,
    is_image,
    is_video,
    mp4_truncation,
    natural_key,
    not_media,
    read_keyframe_map,
    read_rgb,
    unread_media,
)
from mergeseek.indexing.sampling import SCENE_THUMB, Sampling, SceneDetector, thumbnails

log = logging.getLogger(__name__)

__all__ = ["BadInput", "Frame", "MediaSource", "SourceReader", "discover", "assign_ids", "IMAGE_EXTS", "VIDEO_EXTS"]


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

    # One constructor per kind: a source's key (its path) and fingerprint are made only here.
    @classmethod
    def video(cls, path: Path) -> "MediaSource":
        """A video file (fingerprint: its size and mtime)."""
        return cls("video", path, path.stem, file_sig(path))

    @classmethod
    def images(cls, path: Path, files: Sequence[Path]) -> "MediaSource":
        """A folder of images, or one image file (``files`` = [path]); fingerprint: every file's name, size, mtime."""
        return cls("images", path, path.stem if path.is_file() else path.name, _files_fingerprint(files))

    @classmethod
    def keyframes(cls, folder: Path, images: Sequence[Path], map_csv: Optional[Path] = None) -> "MediaSource":
        """One video's keyframe folder (AI Challenge layout), with its ``map-keyframes`` CSV when there is one."""
        return cls("keyframes", folder, folder.name, _files_fingerprint(list(images) + ([map_csv] if map_csv else [])),
                   map_csv)

    @classmethod
    def features(cls, npy: Path, video_id: str, keyframe_dir: Optional[Path], map_csv: Optional[Path]) -> "MediaSource":
        """A video's released CLIP features (``import-features``). Its key is the keyframe folder when there
        is one, so that indexing the keyframes later replaces these rows; fingerprint: the .npy and the map."""
        fingerprint = "|".join([file_sig(npy)] + ([file_sig(map_csv)] if map_csv is not None else []))
        return cls("keyframes", keyframe_dir if keyframe_dir is not None else npy, video_id, fingerprint, map_csv)


@dataclass(frozen=True)
class BadInput:
    """A file or folder that could not be used, and why (listed in the end-of-run summary)."""

    path: str
    reason: str


def _files_fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        h.update(f"{f.name}:{file_sig(f)}\n".encode())
    return h.hexdigest()[:16]


def _images_in(folder: Path, bad: Optional[list] = None) -> list[Path]:
    """Readable image files directly in ``folder``, natural order; broken links go to ``bad``."""
    files, _ = _scan(Path(folder), bad if bad is not None else [])
    return [p for p in files if is_image(p)]


def _link_problem(p: Path) -> Optional[str]:
    """Why the link ``p`` cannot be followed (None when it can)."""
    try:
        os.stat(p)
        return None
    except OSError as exc:
        target = os.readlink(p) if os.path.islink(p) else "?"
        if exc.errno == errno.ELOOP:
            return f"symbolic link loop ({p.name} -> {target} leads back to itself)"
        if exc.errno == errno.ENOENT:
            return f"broken symbolic link (its target {target} does not exist)"
        return f"symbolic link cannot be followed ({exc.strerror})"


def _os_problem(exc: OSError, what: str) -> str:
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: the {what} cannot be read; make it readable (chmod a+rX) or run as its owner"
    return f"the {what} cannot be read ({exc.strerror or exc})"


NOT_A_FILE = "not a regular file (a named pipe, socket or device); save the media to a file and index that"
MEDIA_SUFFIXES = frozenset(VIDEO_EXTS) | frozenset(IMAGE_EXTS) | frozenset(HEIF_EXTS) | frozenset(UNREAD_EXTS)


def _scan(folder: Path, bad: list) -> tuple[list[Path], list[Path]]:
    """(files, sub-folders) directly in ``folder``, each list in natural order.

    Links are followed; a broken or looping link, or an entry whose type cannot be read, is listed
    in ``bad``. A folder that cannot be listed is listed in ``bad`` and gives nothing.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        bad.append(BadInput(str(folder), _os_problem(exc, "folder")))
        return [], []
    files, dirs = [], []
    for e in entries:
        if not_media(e.name):
            continue
        p = Path(e.path)
        try:
            if e.is_dir():
                dirs.append(p)
            elif e.is_file():
                files.append(p)
            elif e.is_symlink():
                problem = _link_problem(p)
                if problem:
                    bad.append(BadInput(str(p), problem))
            elif Path(e.name).suffix.lower() in MEDIA_SUFFIXES:  # named like media, but not a file
                bad.append(BadInput(str(p), NOT_A_FILE))
        except OSError as exc:  # e.g. ELOOP: a link loop raises instead of answering False
            bad.append(BadInput(str(p), (_link_problem(p) if os.path.islink(p) else None) or _os_problem(exc, "entry")))
    return sorted(files, key=natural_key), sorted(dirs, key=natural_key)


def _signed(files: Sequence[Path], bad: list) -> list[Path]:
    """The files whose size and mtime can be read (a file removed mid-scan is listed, not fatal)."""
    out = []
    for f in files:
        try:
            f.stat()
            out.append(f)
        except OSError as exc:
            bad.append(BadInput(str(f), _link_problem(f) or _os_problem(exc, "file")))
    return out


def discover(paths: Sequence[Path], release_parts: Optional[dict] = None) -> tuple[list[MediaSource], list[BadInput]]:
    """Find the sources under ``paths`` (files or folders). Raises when nothing usable exists.

    A path in an AI Challenge release (archives side by side, see ``indexing.aic``) gives its
    keyframe folders with their maps; ``release_parts`` (``{"maps": DIR, ...}``) points at parts
    that live elsewhere. Ids are unique within the result (``assign_ids``).
    """
    sources: list[MediaSource] = []
    bad: list[BadInput] = []
    for raw in paths:
        given = Path(raw).expanduser()
        if os.path.islink(given) and _link_problem(given):
            bad.append(BadInput(str(raw), _link_problem(given)))
            continue
        try:
            root = given.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
            bad.append(BadInput(str(raw), f"cannot be resolved ({exc})"))
            continue
        if not root.exists():
            bad.append(BadInput(str(raw), "does not exist"))
            continue
        if not root.is_file() and not root.is_dir():
            bad.append(BadInput(str(raw), NOT_A_FILE))
            continue
        if root.is_file():
            if is_video(root):
                sources.append(MediaSource.video(root))
            elif is_image(root):
                sources.append(MediaSource.images(root, [root]))
            else:
                bad.append(BadInput(str(root), unread_media([root]) or f"not a video ({', '.join(VIDEO_EXTS)}) or image file"))
            continue
        found = release_sources_for_path(root, release_parts)
        if found is None:
            found = _walk(root, bad)
        if not found:
            bad.append(BadInput(str(root), f"no videos ({', '.join(VIDEO_EXTS)}), keyframe folders or images inside"))
        sources.extend(found)
    if not sources:
        what = "; ".join(f"{b.path}: {b.reason}" for b in bad) or "no paths given"
        raise InputError(f"nothing to index ({what}); pass a folder of videos, a keyframes folder or an image folder")
    return assign_ids(_dedupe_sources(sources)), bad


def release_sources_for_path(root: Path, overrides: dict | None = None) -> list | None:
    """The keyframe sources of ``root`` when it is (in) a release; None to walk it as plain folders.

    Plain ``keyframes/`` + ``map-keyframes/`` side by side (the older layout) is left to the
    generic walk unless part folders were given (``overrides``).
    """
    parts = find_release(root, overrides)
    if not parts.keyframes or not (parts.archive or any(v is not None for v in (overrides or {}).values())):
        return None
    found = release_sources(parts, root)
    if found and parts.videos:
        log.info("release %s: the videos in %s are kept for playback, not indexed (the keyframes are); "
                 "pass a videos folder on its own to index its frames", parts.root, ", ".join(p.name for p in parts.videos))
    return found or None


def release_sources(parts: ReleaseParts, under: Path) -> list:
    """One ``keyframes`` ``MediaSource`` per keyframe folder inside ``under``, its map matched by id.

    A folder without a map is still a source (``map_csv`` None); the caller warns about it.
    """
    out = []
    for vdir in parts.keyframe_dirs(under):
        images = _images_in(vdir)
        if images:
            out.append(MediaSource.keyframes(vdir, images, parts.map_for(vdir.name)))
    return out


def _walk(root: Path, bad: list) -> list[MediaSource]:
    """Every source under ``root``; linked folders are followed once (a link back up is a loop)."""
    out: list[MediaSource] = []
    seen: set = set()
    stack = [root]
    while stack:
        here = stack.pop()
        real = os.path.realpath(here)
        if real in seen:
            bad.append(BadInput(str(here), f"folder already visited as {real} (a symbolic link loop or a second link to it)"))
            continue
        seen.add(real)
        name = here.name.lower()
        if name == KEYFRAME_MAP_DIR:
            continue
        if name == KEYFRAME_DIR:
            out.extend(_keyframe_sources(here, bad))  # each child is one video's keyframes
            continue
        files, dirs = _scan(here, bad)
        files = _signed(files, bad)
        unread = unread_media(files)
        if unread:
            bad.append(BadInput(str(here), unread))
        out.extend(MediaSource.video(p) for p in files if is_video(p))
        images = [p for p in files if is_image(p)]
        if images:
            out.append(MediaSource.images(here, images))
        stack.extend(reversed(dirs))  # depth first, in natural order
    return out


def _keyframe_sources(kf_dir: Path, bad: list) -> list[MediaSource]:
    out = []
    _, siblings = _scan(kf_dir.parent, [])
    map_dir = next((d for d in siblings if d.name.lower() == KEYFRAME_MAP_DIR), None)
    _, vdirs = _scan(kf_dir, bad)
    for vdir in vdirs:
        images = _signed(_images_in(vdir, bad), bad)
        if not images:
            continue
        csv_path = map_dir / f"{vdir.name}.csv" if map_dir is not None else None
        has_map = csv_path is not None and csv_path.is_file()
        if map_dir is not None and not has_map:
            log.warning("%s has no map %s: frame numbers are the keyframe numbers, times unknown", vdir, csv_path)
        out.append(MediaSource.keyframes(vdir, images, csv_path if has_map else None))
    return out


def _dedupe_sources(sources: list[MediaSource]) -> list[MediaSource]:
    return first_by(sources, lambda s: s.key)


def assign_ids(sources: list[MediaSource], existing: Optional[dict] = None) -> list[MediaSource]:
    """Give every source a video id no other source has, in this run or in the index.

    The file stem (folder name for keyframes) is kept where it is unique: the AI Challenge CSV
    needs ``L01_V001``. ``existing`` maps the index's source keys to their ids: a source already
    in the index keeps its id, and a new source whose stem another source (in the index, or twice
    in this run) already has gets its parent folders prefixed (``a/clip``, then ``x/a/clip``...),
    or ``#2``, ``#3`` when even the full path does not tell them apart. Each renaming is logged.
    """
    existing = dict(existing or {})
    taken = {vid: key for key, vid in existing.items()}  # id -> the key that owns it
    counts: dict[str, int] = {}
    for s in sources:
        if s.key not in existing:
            counts[s.video_id] = counts.get(s.video_id, 0) + 1
    for s in sources:  # ids of sources the index already has are fixed first
        if s.key in existing:
            taken[existing[s.key]] = s.key
    out = []
    for s in sources:
        if s.key in existing:
            vid = existing[s.key]
        else:
            vid = s.video_id
            clash = counts[vid] > 1 or (vid in taken and taken[vid] != s.key)
            if clash:
                vid = _distinct_id(s, taken)
                owner = taken.get(s.video_id)
                where = f"the index already has {s.video_id!r} from {owner}" if owner else f"{s.video_id!r} names more than one source in this run"
                log.warning("video id %r given to %s (%s)", vid, s.path, where)
            taken[vid] = s.key
        if vid != s.video_id:
            s = MediaSource(s.kind, s.path, vid, s.fingerprint, s.map_csv)
        out.append(s)
    return out


def _distinct_id(s: MediaSource, taken: dict) -> str:
    parents = [p.name for p in s.path.parents if p.name]
    for depth in range(1, len(parents) + 1):
        vid = "/".join(list(reversed(parents[:depth])) + [s.video_id])
        if vid not in taken:
            return vid
    k = 2
    while f"{s.video_id}#{k}" in taken:
        k += 1
    return f"{s.video_id}#{k}"


# ---------------------------------------------------------------------------- reading frames
class SourceReader:
    """Yields a source's frames in batches; per-file problems are collected in ``skipped``.

    A video that cannot be opened, or whose first sampled frame cannot be decoded, raises
    ``InputError`` (the caller drops the whole video). A video that decodes only up to some frame
    gives the frames before it, and ``skipped`` says where decoding stopped. An unreadable image,
    or a keyframe missing from its map, is skipped alone.

    Args:
        decoder: video backend (``indexing.decoders.BACKENDS``).
    """

    def __init__(self, source: MediaSource, sampling: Sampling, batch_size: int = 32, decoder: str = DEFAULT_BACKEND,
                 map_fn: Optional[Callable] = None):
        self.source = source
        self.sampling = sampling
        self.batch_size = batch_size
        self.decoder = decoder
        # images of a folder decode batch by batch through this map (a thread pool's: PIL releases
        # the GIL while it decodes); results and skips stay in file order either way
        self.map_fn = map_fn or map
        self.skipped: list[BadInput] = []

    def batches(self) -> Iterator[list[Frame]]:
        if self.source.kind == "video":
            yield from self._video_batches()
        else:
            yield from self._image_batches()

    # ------------------------------------------------------------------ videos
    def _open(self, size: Optional[tuple[int, int]] = None):
        return open_video(self.source.path, self.decoder, size=size)

    def frame_indices(self) -> tuple[np.ndarray, object]:
        """(indices to keep, the open ``VideoReader``: full size, or a 1080-pixel short side for
        larger decord2 video, see ``decoders.MAX_SHORT_SIDE``)."""
        vr = open_bounded(self.source.path, self.decoder)
        if self.sampling.mode != "scene":
            return self.sampling.select(vr.timestamps, vr.avg_fps), vr
        small = self._open(size=(SCENE_THUMB, SCENE_THUMB))
        det, kept = SceneDetector(self.sampling.value), []
        for chunk, images in small.read(range(len(small)), 256):  # frames that fail to decode are left out
            kept.extend(chunk[p] for p in det.keep(thumbnails(images)))
        small.close()
        return np.asarray(kept, dtype=np.int64), vr

    def _video_batches(self) -> Iterator[list[Frame]]:
        indices, vr = self.frame_indices()
        path, done = self.source.path, 0
        for chunk, images in vr.read(indices, self.batch_size):
            done += len(chunk)
            yield [
                Frame(self.source.video_id, i, float(vr.timestamps[i]), img, str(path))
                for i, img in zip(chunk, images)
            ]
        vr.close()
        if vr.failed:
            first = vr.failed[0]
            what = (f"{len(vr.failed)} of {len(indices)} sampled frames could not be decoded, the first at frame "
                    f"{first} of {len(vr)} ({vr.fail_reason or 'no frame'})")
            if done == 0:
                if Path(path).suffix.lower() in MPEG_TS_EXTS:  # a whole transport stream that does not decode
                    raise InputError(f"{path}: {what}; decord and torchcodec cannot seek in some MPEG transport "
                                     f"streams (H.264 with B-frames): install FFmpeg (apt-get install ffmpeg), which "
                                     f"then reads them, or remux it without re-encoding, ffmpeg -i IN -c copy "
                                     f"OUT.mkv, and index the .mkv")
                raise InputError(f"{path}: {what}; the file is truncated or damaged, re-copy or re-encode it")
            reason = (f"partly indexed: {what}; {done} indexed (the file is truncated or damaged; re-copy it "
                      "and index again to add the rest)")
            log.warning("%s: %s", path, reason)
            self.skipped.append(BadInput(str(path), reason))
            return
        cut = mp4_truncation(path)  # a faststart MP4 cut short decodes up to the cut without an error
        if cut is not None:
            last = float(vr.timestamps[indices[-1]]) if len(indices) else 0.0
            said = f"; its header says {cut.duration_s:.1f} s, frames end at {last:.1f} s" if cut.duration_s else ""
            reason = (f"partly indexed: the file is cut short ({cut.size} of the {cut.needed} bytes its boxes declare"
                      f"{said}); {done} frames indexed (re-copy it and index again to add the rest)")
            log.warning("%s: %s", path, reason)
            self.skipped.append(BadInput(str(path), reason))

    # ------------------------------------------------------------------ images / keyframes
    def _image_batches(self) -> Iterator[list[Frame]]:
        path = self.source.path
        # link and folder problems were listed by discover(); listing them again would double them
        files = [path] if path.is_file() else _images_in(path)
        kmap = read_keyframe_map(self.source.map_csv) if self.source.map_csv else None
        if kmap is not None:
            self.skipped.extend(BadInput(p.split(": ", 1)[0], p.split(": ", 1)[-1]) for p in kmap.problems)
        batch: list[Frame] = []
        pending: list = []  # (file, frame_idx, pts) decoded together, one batch's worth at a time

        def decode() -> Iterator[list[Frame]]:
            nonlocal batch
            for (f, frame_idx, pts), (img, reason) in zip(pending, self.map_fn(_load_image, [p[0] for p in pending])):
                if img is None:
                    log.warning("skip %s: %s", f, reason)
                    self.skipped.append(BadInput(str(f), reason))
                    continue
                batch.append(Frame(self.source.video_id, frame_idx, pts, img, str(f)))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            pending.clear()

        for pos, f in enumerate(files):
            n = int(f.stem) if f.stem.isdigit() else None
            if kmap is not None:
                if n is None or n not in kmap:
                    why = "is not named by a number" if n is None else f"has no row n={n} in {self.source.map_csv}"
                    reason = f"keyframe {why}; skipped (its frame number is unknown: add the row to the map)"
                    log.warning("skip %s: %s", f, reason)
                    self.skipped.append(BadInput(str(f), reason))
                    continue
                frame_idx, pts = kmap[n].frame_idx, kmap[n].pts_time
            else:
                # Without a map the keyframe number (or the position) is the best frame id we have.
                frame_idx, pts = (n if n is not None and self.source.kind == "keyframes" else pos), math.nan
            pending.append((f, frame_idx, pts))
            if len(pending) == self.batch_size - len(batch):
                yield from decode()
        if pending:
            yield from decode()
        if batch:
            yield batch


def _load_image(f: Path) -> tuple[Optional[np.ndarray], str]:
    """(HxWx3 uint8 RGB, "") or (None, the reason it cannot be read) for one image file."""
    try:
        if f.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        return read_rgb(f), ""
    except PermissionError:
        return None, "permission denied; make the file readable (chmod a+r) or run as its owner"
    except Exception as exc:  # PIL raises many types for bad images
        return None, f"unreadable image ({_short(exc)})"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    return msg[:200]
