"""Video decoding behind one small interface: ``open_video(path, backend) -> VideoReader``.

A ``VideoReader`` knows its frame count and the presentation time of every frame (from the
container's packets, without decoding), decodes a batch of frames by index, and falls back to
decoding from the start when random access fails (some VP9/WebM files have no usable seek
index; a truncated file cannot seek past its cut). Frames are indexed in presentation order.

Backends:

* ``decord`` (default): the decord2 package (the maintained fork; ``import decord``).
* ``torchcodec``: PyTorch's decoder (``pip install 'mergeseek[torchcodec]'``; needs FFmpeg's
  shared libraries, e.g. ``apt-get install ffmpeg``).
* ``ffmpeg``: FFmpeg's command-line tools through a pipe (:mod:`indexing.ffmpeg_cli`; ``ffmpeg`` and
  ``ffprobe`` on PATH). Slow at random access, and the only reader of RealMedia and raw H.264/H.265
  streams. When ``ffmpeg`` is on PATH it is also the fallback for a file the chosen decoder cannot
  open or cannot decode a first frame of (``open_video``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from mergeseek.errors import ConfigError, InputError
from mergeseek.indexing.formats import FFMPEG_HINT, FFMPEG_ONLY_EXTS, ffmpeg_ready, holds_text, video_rotation

log = logging.getLogger(__name__)

BACKENDS = ("decord", "torchcodec", "ffmpeg")
DEFAULT_BACKEND = "decord"
INSTALL_HINT = {
    "decord": "pip install decord2",
    "torchcodec": "pip install torchcodec (and FFmpeg's shared libraries: apt-get install ffmpeg)",
    "ffmpeg": FFMPEG_HINT,
}


# A damaged stretch this long ends the attempts: each failed frame costs a seek and a decode.
READ_BYTES = 256 << 20  # decoded frames held by one read: bounds memory whatever the resolution
# Video above 1080p is decoded at a 1080-pixel short side by decord2 (its scaler): its queue of decoded
# frames held 5.2 GB for an 8K clip at full size, 1.1 GB scaled (and decoding took half the time);
# the encoder (224 px), thumbnails (256 px) and OCR need no more.
MAX_SHORT_SIDE = 1080
MAX_FAILURES_IN_A_ROW = 16
# Containers without a seek index where a library decoder returns other frames than the ones asked
# for, with no error (python -m mergeseek.bench.decoders frames; docs/BENCHMARKS.md "1c"): decord2 on
# MPEG-2 in program streams (.mpg, .mpeg, .vob) and transport streams, H.264 with B-frames in
# transport streams and WMV2 in ASF; torchcodec on H.264 with B-frames in transport streams (and it
# cannot seek in the MPEG-2 ones). With these decoders such files are read through FFmpeg's command
# when it is on PATH, and a warning says so otherwise.
_MPEG_STREAMS = frozenset({".mpg", ".mpeg", ".vob", ".ts", ".m2ts", ".mts"})
WRONG_FRAMES = {"decord": _MPEG_STREAMS | {".wmv", ".asf"}, "torchcodec": _MPEG_STREAMS}


class DecodeError(Exception):
    """Raised by a backend when frames cannot be decoded (handled inside this module)."""


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"decoder {backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
    return backend


def require_backend(backend: str) -> str:
    """``check_backend`` and make sure its library loads (before any model is loaded)."""
    _import(check_backend(backend))
    return backend


def available_backends() -> list[str]:
    """Backends whose library imports here."""
    out = []
    for b in BACKENDS:
        try:
            _import(b)
            out.append(b)
        except InputError:
            pass
    return out


def _import(backend: str):
    import importlib.util
    import sys

    if backend == "ffmpeg":
        if not ffmpeg_ready():
            raise InputError(f"video decoder 'ffmpeg' needs ffmpeg and ffprobe on PATH; {FFMPEG_HINT}")
        return None
    try:
        if backend == "decord":
            if "decord" not in sys.modules and importlib.util.find_spec("torch") is not None:
                # decord2 preloads the nvidia-* pip libraries (NVBLAS among them) with RTLD_GLOBAL;
                # a torch imported after that sends its matrix products to NVBLAS and crashes.
                import torch  # noqa: F401
            if "decord" not in sys.modules and importlib.util.find_spec("faiss") is not None:
                # the same for FAISS: imported after decord, its k-means (IVF training) calls NVBLAS's
                # sgemm, which has no CPU BLAS behind it here, and the process dies (decord2 3.4.0)
                import faiss  # noqa: F401
            if "decord" not in sys.modules and importlib.util.find_spec("torchcodec") is not None:
                # decord loads its bundled FFmpeg with RTLD_GLOBAL; torchcodec, started after that,
                # binds the system FFmpeg to those symbols and crashes. Loaded first, both work.
                try:
                    import torchcodec.decoders  # noqa: F401
                except Exception:  # a broken torchcodec must not stop decord
                    pass
            import decord

            return decord
        if "decord" in sys.modules and "torchcodec.decoders" not in sys.modules:
            raise InputError(
                "torchcodec cannot start in a process that already loaded decord (decord's bundled FFmpeg "
                "libraries would crash it); use one decoder per process, e.g. a fresh `cli.py index --decoder torchcodec`"
            )
        import torchcodec.decoders

        return torchcodec
    except InputError:
        raise
    except Exception as exc:  # ImportError, or an OSError/RuntimeError when FFmpeg's libraries are missing
        raise InputError(f"video decoder {backend!r} cannot be loaded ({_short(exc)}); {INSTALL_HINT[backend]}") from None


class VideoReader:
    """One open video.

    Attributes:
        path: the file.
        backend: which decoder reads it.
        timestamps: presentation time in seconds of every frame (float64, ``len(self)`` values;
            NaN where the container has none).
        avg_fps: the container's average frame rate (0 when unknown).
        fell_back: True once a batch failed and frames were decoded one by one.
        failed: the frame indices ``read`` could not decode in any way (ascending).
        fail_reason: the decoder's message for the first of them.
    """

    backend = ""

    def __init__(self, path: Path, size: Optional[tuple[int, int]] = None):
        self.path = Path(path)
        self.size = size  # (width, height) to resize decoded frames to, or None
        self.timestamps = np.zeros(0)
        self.avg_fps = 0.0
        self.fell_back = False
        self.failed: list[int] = []
        self.fail_reason = ""
        self._seq_end: Optional[int] = None  # where the sequential decoder gave up, and why
        self._seq_reason = ""
        self._seq: Optional[Iterator[np.ndarray]] = None
        self._seq_pos = 0
        self._shape: Optional[tuple] = None  # one decoded frame's (H, W, 3) (frame_shape)

    def __len__(self) -> int:
        return len(self.timestamps)

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    # ------------------------------------------------------------------ backend hooks
    def _get_batch(self, indices: list[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sequential(self) -> Iterator[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ public
    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` as [B,H,W,3] uint8 RGB by random access (raises ``DecodeError``)."""
        idx = [int(i) for i in indices]
        if any(i < 0 or i >= len(self) for i in idx):
            raise DecodeError(f"frame indices {idx} outside 0..{len(self) - 1}")
        if not idx:
            return np.zeros((0, 1, 1, 3), np.uint8)
        return self._get_batch(idx)

    def read(self, indices: Sequence[int], batch_size: int = 32) -> Iterator[tuple[list[int], np.ndarray]]:
        """Decode ``indices`` (ascending) in batches of (indices, frames).

        Random access by batch first. Once a batch fails, each frame is tried alone by random
        access, then by decoding from the start of the file (a WebM without its seek index); a
        frame that fails both ways (a truncated file) is left out and recorded in ``failed``.
        After ``MAX_FAILURES_IN_A_ROW`` such frames the rest are given up without trying.
        """
        idx = [int(i) for i in indices]
        in_a_row = 0
        step = self.frames_per_read(idx[0], batch_size) if idx else batch_size
        for s in range(0, len(idx), step):
            chunk = idx[s : s + step]
            if not self.fell_back:
                try:
                    yield chunk, self.get_batch(chunk)
                    continue
                except DecodeError as exc:
                    log.info("%s: batch decoding failed at frames %d..%d (%s); decoding frame by frame",
                             self.path, chunk[0], chunk[-1], exc)
                    self.fell_back = True
            got, images = [], []
            for i in chunk:
                img = self._one(i) if in_a_row < MAX_FAILURES_IN_A_ROW else None
                if img is None:
                    self.failed.append(i)
                    in_a_row += 1
                else:
                    got.append(i)
                    images.append(img)
                    in_a_row = 0
            if images:
                yield got, np.stack(images)

    def frame_shape(self, first: int = 0) -> Optional[tuple]:
        """(H, W, 3) of the decoded frames, from decoding frame ``first`` once; None if it fails."""
        if self._shape is None:
            try:
                self._shape = tuple(int(d) for d in self.get_batch([first]).shape[1:])
            except DecodeError:  # the reads that follow say what is wrong
                return None
        return self._shape

    def frames_per_read(self, first: int, batch_size: int) -> int:
        """How many frames to decode at once: ``batch_size``, fewer when that many frames would hold
        more than ``READ_BYTES`` (a batch of 32 frames of 8K video is 3.2 GB before any copy)."""
        shape = self.frame_shape(first)
        if shape is None:
            return batch_size
        return max(1, min(int(batch_size), READ_BYTES // max(1, int(np.prod(shape)))))

    def _one(self, index: int) -> Optional[np.ndarray]:
        """Frame ``index`` by random access, else from the sequential decoder; None if neither works."""
        try:
            return self.get_batch([index])[0]
        except DecodeError as exc:
            reason = str(exc)
        frame = self._next_at(index)
        if frame is None and not self.fail_reason:
            self.fail_reason = self._seq_reason or reason
        return frame

    def _next_at(self, index: int) -> Optional[np.ndarray]:
        """Frame ``index`` from the sequential decoder (restarted from frame 0 when it is behind)."""
        if self._seq_end is not None and index >= self._seq_end:
            return None
        if self._seq is None or self._seq_pos > index:
            self._seq, self._seq_pos = self._sequential(), 0
        try:
            while True:
                frame = next(self._seq)
                self._seq_pos += 1
                if self._seq_pos - 1 == index:
                    return frame
        except StopIteration:
            self._seq_end, self._seq_reason = self._seq_pos, "the stream ends early"
        except Exception as exc:  # the backends raise RuntimeError or their own error types
            self._seq_end, self._seq_reason = self._seq_pos, _short(exc)
        self._seq = None
        return None

    def close(self) -> None:
        self._seq = None


# ---------------------------------------------------------------------------- decord
class DecordReader(VideoReader):
    backend = "decord"

    def __init__(self, path: Path, size: Optional[tuple[int, int]] = None):
        super().__init__(path, size)
        decord = _import("decord")
        decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's chatter; we report one line per file
        self._decord = decord
        self._vr = self._open(num_threads=0)
        n = len(self._vr)
        try:
            ts = np.asarray(self._vr.get_frame_timestamp(list(range(n))), dtype=np.float64).reshape(n, -1)[:, 0]
        except Exception:
            ts = np.full(n, np.nan)
        self.avg_fps = _finite(self._vr.get_avg_fps())
        # Frames before an MP4/MOV edit point (a video trimmed without re-encoding: the frames from
        # the keyframe before the cut are stored, to be decoded but not shown) get negative times
        # here, and decord2 then counts, times and seeks such a file wrongly (open_video reads it
        # with another decoder).
        self.before_edit = int(np.sum(ts < -1e-6))
        self.timestamps = _fill_missing(ts, self.avg_fps)

    def _open(self, num_threads: int):
        kw = {} if self.size is None else {"width": self.size[0], "height": self.size[1]}
        return self._decord.VideoReader(str(self.path), ctx=self._decord.cpu(0), num_threads=num_threads, **kw)

    def _get_batch(self, indices: list[int]) -> np.ndarray:
        try:
            return _rgb_frames(self._vr.get_batch(indices).asnumpy())
        except Exception as exc:
            # After an error decord's threaded decoder stays broken: later frames fail too.
            self._vr = self._open(num_threads=0)
            raise DecodeError(_short(exc)) from None

    def _sequential(self) -> Iterator[np.ndarray]:
        # decord's frame-threaded decoder loses packets on some VP9 streams; one thread does not.
        vr = self._open(num_threads=1)
        for _ in range(len(vr)):
            yield _rgb_frames(vr.next().asnumpy()[None])[0]


# ---------------------------------------------------------------------------- torchcodec
class TorchcodecReader(VideoReader):
    backend = "torchcodec"

    def __init__(self, path: Path, size: Optional[tuple[int, int]] = None, device: str = "cpu"):
        super().__init__(path, size)
        _import("torchcodec")
        self._device = device
        self._dec = self._decoder("exact")
        md = self._dec.metadata
        self.avg_fps = _finite(md.average_fps)
        self.timestamps = _fill_missing(_from_first_frame(self._scan_pts(len(self._dec))), self.avg_fps)

    def _scan_pts(self, n: int) -> np.ndarray:
        # The demuxer's frame index gives every frame's pts without decoding; it lives in
        # torchcodec's block API, so an older torchcodec falls back to the header's rate.
        try:
            from torchcodec.decoders._blocks import Demuxer

            pts = Demuxer(str(self.path)).streams[0].scan().pts_seconds.double().numpy()
            if len(pts) == n:
                return np.sort(pts)
        except Exception as exc:
            log.debug("%s: torchcodec frame index unavailable (%s)", self.path, exc)
        return np.full(n, np.nan)

    def _decoder(self, seek_mode: str):
        from torchcodec.decoders import VideoDecoder

        kw = {}
        if self.size is not None:  # scaled by FFmpeg inside the decoder: full-size frames never exist
            from torchcodec.transforms import Resize

            kw["transforms"] = [Resize((self.size[1], self.size[0]))]
        return VideoDecoder(str(self.path), seek_mode=seek_mode, dimension_order="NHWC", device=self._device, **kw)

    def _to_numpy(self, data) -> np.ndarray:
        return data.cpu().numpy()

    def _get_batch(self, indices: list[int]) -> np.ndarray:
        try:
            return self._to_numpy(self._dec.get_frames_at(indices).data)
        except Exception as exc:
            raise DecodeError(_short(exc)) from None

    def _sequential(self) -> Iterator[np.ndarray]:
        dec = self._decoder("approximate")
        n, step = len(self), 64
        for s in range(0, n, step):  # consecutive ranges: the decoder continues without seeking
            batch = self._to_numpy(dec.get_frames_in_range(s, min(n, s + step)).data)
            yield from batch


# ---------------------------------------------------------------------------- open
def open_video(path: Path, backend: str = DEFAULT_BACKEND, size: Optional[tuple[int, int]] = None) -> VideoReader:
    """Open ``path`` with ``backend``; ``size=(width, height)`` resizes decoded frames.

    Raises:
        InputError: one line naming the file and why it cannot be read (empty, permission
            denied, no video stream, not a video), and what to do.
        ConfigError: an unknown backend.
    """
    check_backend(backend)
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file (0 bytes); re-copy it or remove it")
        with open(path, "rb"):
            pass
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the file readable (chmod a+r) or run as its owner") from None
    except FileNotFoundError:
        raise InputError(f"{path}: does not exist (a broken link, or removed during the run)") from None
    if holds_text(path):  # an HLS playlist or an ffconcat list named like a video: FFmpeg would follow it
        raise InputError(f"{path}: cannot be decoded as a video: it holds text (a playlist or a list of files?); "
                         "index the video files themselves")
    suffix = path.suffix.lower()
    if planned_backend(path, backend) == "ffmpeg":
        return _ffmpeg_reader(path, size)
    if suffix in WRONG_FRAMES.get(backend, ()):
        log.warning("%s: %s decodes the wrong frames of some %s files (measured here, docs/INDEXING.md); install FFmpeg "
                    "(%s), which then reads them, or remux: ffmpeg -i IN -c copy OUT.mkv", path, backend, suffix,
                    FFMPEG_HINT)
    _import(backend)  # a decoder that does not load is the run's problem, not the file's: no fallback
    try:
        cls = DecordReader if backend == "decord" else TorchcodecReader
        if backend == "decord" and video_rotation(path) in (1, 3):
            cls = _reader_for_portrait(path)
        try:
            reader = cls(path, size)
        except InputError:
            raise
        except Exception as exc:  # decord raises DECORDError/RuntimeError; torchcodec RuntimeError/ValueError
            raise _open_error(path, backend, exc) from None
        if len(reader) == 0:
            raise InputError(f"{path}: the video has no frames")
        if getattr(reader, "before_edit", 0):
            reader = _instead_of_decord_for_edits(reader, size)
        if ffmpeg_ready() and reader.frame_shape(0) is None:
            raise InputError(f"{path}: {backend} cannot decode its first frame")
        return reader
    except InputError as exc:
        if not ffmpeg_ready():
            raise
        try:
            reader = _ffmpeg_reader(path, size)
            reader.get_batch([0])  # it decodes: else the first decoder's reason says more
        except (InputError, DecodeError):
            raise exc from None
        log.info("%s: read through the ffmpeg command (%s)", path, exc)
        return reader


def planned_backend(path: Path, backend: str) -> str:
    """The decoder ``open_video`` will read ``path`` with when nothing fails: FFmpeg's command for what
    only it reads, and for what the chosen library decodes wrongly when ``ffmpeg`` is on PATH (by the
    name alone: no file is opened). Part of an index's recipe, so that a source read one way is read
    again when it would now be read the other."""
    suffix = Path(path).suffix.lower()
    if backend == "ffmpeg" or suffix in FFMPEG_ONLY_EXTS:
        return "ffmpeg"
    if suffix in WRONG_FRAMES.get(backend, ()) and ffmpeg_ready():
        return "ffmpeg"
    return backend


def reader_tag(path: Path, backend: str) -> str:
    """``;reader=ffmpeg`` for an index recipe when ``path`` is read through FFmpeg's command instead of
    ``backend``, else empty: an index built before (decord2's wrong frames of a transport stream) reads
    such a source again on its next run."""
    return ";reader=ffmpeg" if planned_backend(path, backend) != backend else ""


def _ffmpeg_reader(path: Path, size: Optional[tuple[int, int]]) -> VideoReader:
    from mergeseek.indexing.ffmpeg_cli import FfmpegReader

    if not ffmpeg_ready():
        raise InputError(f"{path}: reading it needs FFmpeg's command-line tools; {FFMPEG_HINT}")
    reader = FfmpegReader(path, size)
    if len(reader) == 0:
        raise InputError(f"{path}: the video has no frames")
    return reader


def open_bounded(path: Path, backend: str = DEFAULT_BACKEND) -> VideoReader:
    """``open_video`` at full size, or for decord2 and ffmpeg video above 1080p at a 1080-pixel short
    side (``MAX_SHORT_SIDE``): what indexing reads, and what re-reading a source later must read too."""
    vr = open_video(path, backend)
    size = bounded_size(vr.frame_shape(0)) if vr.backend in ("decord", "ffmpeg") else None
    if size is None:
        return vr
    if vr.backend == "ffmpeg":
        vr.scale_to(size)
        return vr
    vr.close()
    vr = open_video(path, backend, size=size)
    vr._shape = (size[1], size[0], 3)  # known: frames_per_read needs no second probe
    return vr


def bounded_size(shape: Optional[tuple], short_side: int = MAX_SHORT_SIDE) -> Optional[tuple[int, int]]:
    """(width, height) to decode frames of ``shape`` (H, W, ...) at so that the short side is
    ``short_side`` (even sizes, aspect kept), or None when they are no larger than that already."""
    if shape is None or min(shape[0], shape[1]) <= short_side:
        return None
    h, w = int(shape[0]), int(shape[1])
    scale = short_side / min(h, w)
    return max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)


def _instead_of_decord_for_edits(reader: VideoReader, size: Optional[tuple[int, int]]) -> VideoReader:
    """A reader for a video trimmed without re-encoding (``DecordReader.before_edit`` frames stored
    before its edit point). decord2 counts those frames, gives them and the frames after them wrong
    times, and returns other frames by random access; torchcodec and FFmpeg's command show the edit
    (measured: tests/test_media_types.py). torchcodec when it loads, else FFmpeg's command when it is on
    PATH, else decord2 with a warning."""
    path, hidden = reader.path, reader.before_edit
    try:
        _import("torchcodec")
        other: Optional[VideoReader] = TorchcodecReader(path, size)
    except Exception:
        other = None
    if other is None and ffmpeg_ready():
        try:
            other = _ffmpeg_reader(path, size)
        except InputError:
            other = None
    if other is None:
        log.warning("%s: trimmed without re-encoding (%d frames stored before its edit point), which decord2 counts "
                    "and times wrongly; pip install torchcodec or install FFmpeg (%s), which read it right, or "
                    "re-encode it: ffmpeg -i IN OUT.mp4", path, hidden, FFMPEG_HINT)
        return reader
    log.info("%s: trimmed without re-encoding (%d frames before its edit point); read with %s", path, hidden,
             other.backend)
    reader.close()
    return other


def _reader_for_portrait(path: Path) -> type:
    """torchcodec for a video stored turned by 90 degrees (a phone video shot in portrait): decord2
    turns such frames into garbage (4 channels, or a size error); torchcodec turns them upright."""
    try:
        _import("torchcodec")
    except InputError as exc:
        raise InputError(
            f"{path}: the video is stored turned by 90 degrees (a phone video shot in portrait), which decord2 "
            f"decodes wrongly; pip install torchcodec (then used for such files by itself), or turn it upright: "
            f"ffmpeg -i IN -c:a copy OUT.mp4 ({exc})"
        ) from None
    log.info("%s: stored turned by 90 degrees; decoded with torchcodec (decord2 decodes such video wrongly)", path)
    return TorchcodecReader


def _open_error(path: Path, backend: str, exc: BaseException) -> InputError:
    text = str(exc)
    if "video stream" in text.lower() or "no stream" in text.lower():
        return InputError(
            f"{path}: no video stream that can be decoded (unsupported codec, or no video track); "
            "re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4"
        )
    if "broken metadata" in text or "duration" in text:
        other = "torchcodec" if backend == "decord" else "decord"
        return InputError(
            f"{path}: {backend} cannot read its length (no duration or frame count in the container); "
            f"try --decoder {other}, or remux it: ffmpeg -i IN -c copy OUT.mkv"
        )
    detail = _short(exc)
    # decord's "Error reading <path>..." only repeats the path; its own log line says why.
    detail = "" if detail.startswith("Error reading") else f": {detail}"
    return InputError(
        f"{path}: cannot be decoded as a video (not a video file, or truncated{detail}); "
        "check the file or re-encode it to H.264 mp4"
    )


# ---------------------------------------------------------------------------- helpers
def _finite(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


def _rgb_frames(frames: np.ndarray) -> np.ndarray:
    """decord's frames, refused when they are not [B, H, W, 3]: what it returns for a video turned
    by 90 degrees in a container whose rotation ``video_rotation`` cannot read (4 channels)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DecodeError(f"decord2 returned frames of shape {tuple(frames.shape[1:])}, not H x W x 3 (a video "
                          f"stored turned by 90 degrees? index it with --decoder torchcodec)")
    return frames


def _from_first_frame(ts: np.ndarray) -> np.ndarray:
    """Presentation times counted from the first frame, as decord2 gives them: a stream that starts
    at 1.4 s (MPEG-TS's usual offset) or after an edit offset reads 0.0 at its first frame with
    either decoder, so a video indexed twice gets the same times."""
    ts = np.asarray(ts, dtype=np.float64)
    finite = ts[np.isfinite(ts)]
    return ts - finite.min() if len(finite) and finite.min() != 0 else ts


def _fill_missing(ts: np.ndarray, fps: float) -> np.ndarray:
    """Frames without a usable pts (NaN, negative) get index / average rate when the rate is known."""
    ts = np.asarray(ts, dtype=np.float64).copy()
    bad = ~np.isfinite(ts) | (ts < 0)
    if bad.any() and fps > 0:
        ts[bad] = np.flatnonzero(bad) / fps
    return ts


def last_line(text: str, otherwise: str) -> str:
    """The last non-empty line of a decoder's message (its reason), cut to 200 characters."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else otherwise


def _short(exc: BaseException) -> str:
    return last_line(str(exc), type(exc).__name__)
