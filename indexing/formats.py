"""One reader per on-disk format, shared by ``indexing/`` and ``eval/``.

* media file extensions (and the media types not read, reported) and the natural (numeric-aware)
  order of image files;
* the AI Challenge keyframe map ``map-keyframes/<video_id>.csv`` (columns ``n,pts_time,fps,frame_idx``);
* images decoded to 8-bit RGB as a viewer shows them: EXIF orientation applied, transparency over
  white, 16-bit and float images scaled (not clipped) to 0..255.

Readers here raise ``InputError`` only when a whole file is unusable; a bad row of a map is a
warning for that row, and the rest of the map is kept.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mergeseek.errors import InputError

log = logging.getLogger(__name__)

# Every container below decodes with the default decoder (decord2) here, checked with files made
# by ffmpeg (tests/test_media_types.py); .ogv (Theora) needs --decoder torchcodec, which the error
# for it says. ".ts" is also TypeScript's extension: such a file counts only with MPEG-TS packets.
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts",
              ".flv", ".f4v", ".wmv", ".asf", ".3gp", ".vob", ".mxf", ".divx", ".ogv")
IMAGE_EXTS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".avif", ".jp2")
MPEG_TS_EXTS = (".ts", ".m2ts", ".mts")  # transport streams: some do not decode here (docs/INDEXING.md)
HEIF_EXTS = (".heic", ".heif")  # iPhone photos: read when pillow-heif is installed
# Media this project does not decode: reported (one line per folder), never silently passed over.
UNREAD_EXTS = {
    **dict.fromkeys((".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf"), "camera raw"),
    ".psd": "Photoshop", ".svg": "vector", ".jxl": "JPEG XL", ".rm": "RealMedia", ".rmvb": "RealMedia",
    # CCTV and dashcam exports: no container, so no frame rate or times; neither decoder reads them
    **dict.fromkeys((".h264", ".264", ".h265", ".265", ".hevc"), "raw video stream"),
}
# ... of which these are read through FFmpeg's command-line tools when ffmpeg and ffprobe are on
# PATH (indexing/ffmpeg_cli.py), and reported otherwise
FFMPEG_ONLY_EXTS = frozenset(ext for ext, kind in UNREAD_EXTS.items() if kind in ("RealMedia", "raw video stream"))
FFMPEG_HINT = "apt-get install ffmpeg (or any FFmpeg build with ffmpeg and ffprobe on PATH)"
UNREAD_HINTS = {  # what to do, per kind (anything else: export as JPEG or PNG)
    "RealMedia": f"install FFmpeg to read RealMedia and raw streams ({FFMPEG_HINT})",
    "raw video stream": f"install FFmpeg to read RealMedia and raw streams ({FFMPEG_HINT})",
    "HEIC/HEIF": "pip install pillow-heif to read HEIC/HEIF photos",
}
KEYFRAME_DIR = "keyframes"
KEYFRAME_MAP_DIR = "map-keyframes"
KEYFRAME_MAP_COLUMNS = ("n", "pts_time", "fps", "frame_idx")


# ---------------------------------------------------------------------------- file order
def natural_key(p: Path) -> list:
    """Sort key that puts ``2.jpg`` before ``10.jpg`` (AI Challenge keyframes are not always zero-padded)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(p).name)]


def is_image(p: Path) -> bool:
    ext = Path(p).suffix.lower()
    return ext in IMAGE_EXTS or (ext in HEIF_EXTS and heif_ready())


def is_video(p: Path) -> bool:
    ext = Path(p).suffix.lower()
    if ext in FFMPEG_ONLY_EXTS:
        return ffmpeg_ready()
    return ext in VIDEO_EXTS and (ext != ".ts" or _mpeg_ts(Path(p)))


def holds_text(path: Path) -> bool:
    """The file starts as text (UTF-8, no control bytes but tab and line ends): no audio or video
    container does (they open with binary magic: RIFF, fLaC, ID3 / frame sync, OggS, ftyp, EBML)."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    try:
        chars = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the 4096 bytes is still text
        if exc.start < len(head) - 3:
            return False
        chars = head[: exc.start].decode("utf-8")
    return all(c >= " " or c in "\t\n\r" for c in chars)


_FFMPEG: list = []


def ffmpeg_ready() -> bool:
    """Whether FFmpeg's ``ffmpeg`` and ``ffprobe`` are on PATH (looked up once per process)."""
    if not _FFMPEG:
        import shutil

        _FFMPEG.append(shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None)
    return _FFMPEG[0]


def _mpeg_ts(p: Path) -> bool:
    """Whether a ``.ts`` file holds MPEG-TS packets (sync byte 0x47 every 188 bytes, or every 192
    with a 4-byte time code) rather than TypeScript. A file that cannot be read counts as video, so
    the reader reports it."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4 + 192 + 1)
    except OSError:
        return True
    synced = any(len(head) > at and head[at] == 0x47 and (len(head) <= at + step or head[at + step] == 0x47)
                 for at, step in ((0, 188), (4, 192)))
    return synced and any(b < 9 for b in head)  # packet headers and tables hold control bytes; source text does not


_HEIF: list = []


def heif_ready() -> bool:
    """Whether HEIC/HEIF photos can be read (pillow-heif installed; its opener registered once)."""
    if not _HEIF:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _HEIF.append(True)
        except Exception:  # not installed, or a build that does not load
            _HEIF.append(False)
    return _HEIF[0]


def unread_media(files) -> Optional[str]:
    """One line for the media files among ``files`` that are not read (None if there are none):
    their types, counts and what to do."""
    counts: dict = {}
    for f in files:
        ext = Path(f).suffix.lower()
        if (ext in UNREAD_EXTS and not (ext in FFMPEG_ONLY_EXTS and ffmpeg_ready())) or (ext in HEIF_EXTS and not heif_ready()):
            counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return None
    kind = {ext: UNREAD_EXTS.get(ext, "HEIC/HEIF") for ext in counts}
    listed = ", ".join(f"{n} {ext} ({kind[ext]})" for ext, n in sorted(counts.items()))
    other = "export camera raw, Photoshop, vector and JPEG XL files as JPEG or PNG"
    hints = list(dict.fromkeys(UNREAD_HINTS.get(k, other) for k in kind.values()))
    return f"{sum(counts.values())} file(s) skipped, types not read: {listed}; {'; '.join(hints)}"


# Folders that hold a system's or a program's own copies, never the user's media: a Synology NAS
# keeps thumbnails of every photo in @eaDir, macOS zips carry __MACOSX, Windows drives $RECYCLE.BIN.
SYSTEM_FOLDERS = frozenset({"@eadir", "__macosx", "$recycle.bin", "system volume information", "lost+found"})


def not_media(name: str) -> bool:
    """A hidden entry (``.git``, ``.Trash-1000``, macOS's ``._IMG_1.jpg`` resource-fork twins, which
    are not images) or a system folder inside a folder being indexed: passed over. A path given on
    the command line is indexed whatever its name."""
    return name.startswith(".") or name.lower() in SYSTEM_FOLDERS


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (broken symlinks left out), in natural order.

    Raises ``OSError`` (e.g. ``PermissionError``) when the folder itself cannot be listed.
    """
    return sorted((p for p in Path(folder).iterdir() if is_image(p) and not not_media(p.name) and p.is_file()),
                  key=natural_key)


# ---------------------------------------------------------------------------- keyframe maps
@dataclass(frozen=True)
class KeyframeRow:
    """One row of a keyframe map: keyframe ``n`` is frame ``frame_idx`` at ``pts_time`` seconds."""

    n: int
    frame_idx: int
    pts_time: float = math.nan
    fps: float = math.nan


@dataclass
class KeyframeMap:
    """A parsed keyframe map; ``problems`` holds one line per row that was skipped."""

    path: Path
    rows: dict = field(default_factory=dict)  # n -> KeyframeRow
    problems: list = field(default_factory=list)

    def __contains__(self, n: int) -> bool:
        return n in self.rows

    def __getitem__(self, n: int) -> KeyframeRow:
        return self.rows[n]

    def __len__(self) -> int:
        return len(self.rows)


def _number(text: Optional[str], kind, name: str):
    if text is None:
        raise ValueError(f"no {name} value (short row)")
    text = text.strip()
    if not text:
        raise ValueError(f"empty {name}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={text!r} is not a finite number")
    if kind is int:
        if value != int(value) or value < 0:
            raise ValueError(f"{name}={text!r} is not a whole number >= 0")
        return int(value)
    return value


def read_keyframe_map(path: Path) -> KeyframeMap:
    """Read ``map-keyframes/<video_id>.csv``.

    The file is read as ``utf-8-sig`` (maps saved by Excel start with a BOM, which would otherwise
    rename the first column to ``\\ufeffn``). Column names are matched case-insensitively. A row
    that is short, has a bad number or repeats an ``n`` is skipped with a warning naming its line.

    Raises:
        InputError: the file cannot be read, or has no ``n`` and ``frame_idx`` columns.
    """
    path = Path(path)
    out = KeyframeMap(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise InputError(f"keyframe map {path} is empty; expected columns {','.join(KEYFRAME_MAP_COLUMNS)}")
            cols = {name.strip().lower(): i for i, name in enumerate(header)}
            if "n" not in cols or "frame_idx" not in cols:
                raise InputError(
                    f"keyframe map {path} needs columns {','.join(KEYFRAME_MAP_COLUMNS)}; got {','.join(header)}"
                )

            def cell(row: list, name: str) -> Optional[str]:
                i = cols.get(name)
                return row[i] if i is not None and i < len(row) else None

            for row in reader:
                line = reader.line_num
                if not any(c.strip() for c in row):
                    continue  # blank line (a trailing newline saved by a spreadsheet)
                try:
                    n = _number(cell(row, "n"), int, "n")
                    frame_idx = _number(cell(row, "frame_idx"), int, "frame_idx")
                    pts = _number(cell(row, "pts_time"), float, "pts_time") if "pts_time" in cols else math.nan
                    fps = _number(cell(row, "fps"), float, "fps") if "fps" in cols and cell(row, "fps") else math.nan
                except ValueError as exc:
                    out.problems.append(f"{path}:{line}: {exc}; row skipped")
                    continue
                if n in out.rows:
                    out.problems.append(f"{path}:{line}: n={n} appears twice; the first row is kept")
                    continue
                out.rows[n] = KeyframeRow(n, frame_idx, pts, fps)
    except UnicodeDecodeError as exc:
        raise InputError(f"keyframe map {path} is not UTF-8 text ({exc.reason}); save it as CSV UTF-8") from None
    except PermissionError:
        raise InputError(f"keyframe map {path}: permission denied; make it readable (chmod a+r)") from None
    except OSError as exc:
        raise InputError(f"keyframe map {path} cannot be read ({exc.strerror or exc})") from None
    except csv.Error as exc:
        raise InputError(f"keyframe map {path} is not valid CSV ({exc})") from None
    for p in out.problems:
        log.warning("%s", p)
    return out


# ---------------------------------------------------------------------------- images
_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N")
_ORIENTATION = 0x0112  # the EXIF tag


def to_rgb8(im) -> np.ndarray:
    """A PIL image as an HxWx3 uint8 RGB array, as a viewer shows it.

    - Turned upright by its EXIF orientation tag (a phone photo taken sideways is stored sideways
      with a tag saying so; viewers and browsers honour it, so the encoder must see the same).
    - Transparency laid over white (``RGBA``, ``LA``, ``PA``, palette images with a transparent
      colour): ``convert("RGB")`` alone would show whatever colour the invisible pixels carry,
      often black.
    - PIL's ``convert("RGB")`` clips 16-bit grey (``I;16``), 32-bit integer (``I``) and float
      (``F``) images to 0..255, so a 16-bit PNG or TIFF comes out almost white; these are scaled by
      their range instead (16-bit: 0..65535; float: 0..1 when that is where the values lie). 16-bit
      colour files are already reduced to 8 bits by PIL itself (by scaling, not clipping).

    Every reader of a user's image goes through here (indexing, ``search --image``, the web app's
    upload, thumbnails), so the same file gives the same pixels on every path.
    """
    from PIL import Image, ImageOps

    try:
        if im.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose alone would copy every image
            im = ImageOps.exif_transpose(im)
    except Exception:  # a damaged EXIF block: keep the stored orientation
        pass
    if im.mode in _GREY16 or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max(initial=0.0)
        if im.mode in _GREY16 or (im.mode == "I" and top > 255):
            scale = 255.0 / 65535.0
        elif im.mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info) \
            or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def read_rgb(path) -> np.ndarray:
    """Decode an image file (a path or a binary file object) to HxWx3 uint8 RGB (see ``to_rgb8``)."""
    from PIL import Image

    if isinstance(path, (str, Path)) and Path(path).suffix.lower() in HEIF_EXTS:
        heif_ready()  # a worker process that did not run discovery registers the opener here
    with Image.open(path) as im:
        return to_rgb8(im)


# ---------------------------------------------------------------------------- cut-short MP4 / MOV files
ISO_BMFF_EXTS = (".mp4", ".mov", ".m4v", ".3gp", ".f4v")


@dataclass(frozen=True)
class Truncation:
    """An ISO BMFF (MP4 / MOV) file shorter than its own boxes say."""

    size: int  # bytes on disk
    needed: int  # bytes the top-level boxes declare
    duration_s: Optional[float]  # the movie's duration from its mvhd box (None when unread)


def mp4_truncation(path: Path) -> Optional[Truncation]:
    """Whether an MP4 / MOV file was cut short: its top-level boxes (``ftyp``, ``moov``, ``mdat``,
    ...) run past the end of the file. A faststart file (``moov`` first) cut short still opens and
    decodes up to the cut, so the decoder alone cannot tell; the box sizes can. None for a whole
    file, another format, or one whose boxes cannot be read (the decoder judges those)."""
    import struct

    path = Path(path)
    if path.suffix.lower() not in ISO_BMFF_EXTS:
        return None
    try:
        size = path.stat().st_size
        duration = None
        offset = 0
        with open(path, "rb") as fh:
            for _ in range(10_000):  # top-level boxes are few; a loop this long is not an MP4
                if offset + 8 > size:
                    break
                fh.seek(offset)
                head = fh.read(16)
                box_size, kind = struct.unpack(">I4s", head[:8])
                if box_size == 1 and len(head) == 16:
                    box_size = struct.unpack(">Q", head[8:16])[0]
                elif box_size == 0:  # runs to the end of the file
                    break
                if box_size < 8:
                    return None  # not a box: leave it to the decoder
                if kind == b"moov" and duration is None:
                    duration = _mvhd_duration(fh, offset, min(box_size, size - offset))
                offset += box_size
            else:
                return None
    except (OSError, struct.error):
        return None
    return Truncation(size, offset, duration) if offset > size else None


def _children(fh, start: int, end: int, only: Optional[bytes] = None):
    """(kind, body start, box end) of the boxes between ``start`` and ``end`` (those of kind
    ``only`` when given)."""
    import struct

    pos = start
    for _ in range(100_000):  # real files have a handful of boxes per level; garbage stops here
        if pos + 8 > end:
            return
        fh.seek(pos)
        head = fh.read(16)
        size, kind = struct.unpack(">I4s", head[:8])
        body = pos + 8
        if size == 1 and len(head) == 16:
            size, body = struct.unpack(">Q", head[8:16])[0], pos + 16
        elif size == 0:
            size = end - pos
        if size < 8:
            return
        if only is None or kind == only:
            yield kind, body, min(pos + size, end)
        pos += size


def video_rotation(path: Path) -> int:
    """Quarter turns (``np.rot90``'s k) that make an MP4 / MOV video's frames upright, from its video
    track's display matrix (``tkhd``): 1 for a phone video shot in portrait ("rotate 90"), 2 for
    upside down, 3 for "rotate 270"; 0 for none, another format, or a file that cannot be read."""
    import struct

    path = Path(path)
    if path.suffix.lower() not in ISO_BMFF_EXTS:
        return 0
    try:
        with open(path, "rb") as fh:
            for _, moov, moov_end in _children(fh, 0, path.stat().st_size, b"moov"):
                for _, trak, trak_end in _children(fh, moov, moov_end, b"trak"):
                    for _, tkhd, _ in _children(fh, trak, trak_end, b"tkhd"):
                        turns = _tkhd_turns(fh, tkhd)
                        if turns is not None:  # the video track (sound tracks have no size)
                            return turns
                return 0
    except (OSError, struct.error, IndexError):
        return 0
    return 0


def _tkhd_turns(fh, body: int) -> Optional[int]:
    """Quarter turns of a ``tkhd`` box's display matrix; None for a track without a picture size."""
    import struct

    fh.seek(body)
    version = fh.read(1)[0]
    fh.seek(body + 4 + (32 if version == 1 else 20) + 16)
    m = struct.unpack(">9i", fh.read(36))
    width, height = struct.unpack(">II", fh.read(8))
    if not (width and height):
        return None
    return int(round(-math.degrees(math.atan2(m[1], m[0])) / 90)) % 4


def _mvhd_duration(fh, moov_at: int, moov_size: int) -> Optional[float]:
    """Seconds from the ``mvhd`` box inside ``moov`` (None when absent or odd)."""
    import struct

    for _, body, _ in _children(fh, moov_at + 8, moov_at + moov_size, b"mvhd"):
        fh.seek(body)
        version = fh.read(1)[0]
        fh.read(3)
        if version == 1:
            _, _, scale, duration = struct.unpack(">QQIQ", fh.read(28))
        else:
            _, _, scale, duration = struct.unpack(">IIII", fh.read(16))
        return duration / scale if scale else None
    return None
