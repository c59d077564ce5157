"""Decoding through FFmpeg's command-line tools (``ffprobe`` and ``ffmpeg`` on PATH).

The third video backend (``--decoder ffmpeg``), and the one that reads what the libraries cannot:

* raw H.264/H.265 streams (CCTV and dashcam exports: no container, so frames are timed at the
  stream's stated rate, 25 fps when it states none) and RealMedia (``.rm``, ``.rmvb``), which
  neither decord2 nor torchcodec reads;
* the containers where a library decoder returns other frames than the ones asked for, with no
  error (``decoders.WRONG_FRAMES``: MPEG program and transport streams, ASF/WMV), and an MP4
  trimmed without re-encoding when torchcodec is not there (``decoders.open_video``);
* any other video that the chosen decoder cannot open or cannot decode a first frame of (Theora
  for decord2, a phone video stored turned by 90 degrees when torchcodec is not installed):
  ``decoders.open_video`` falls back to this reader when ``ffmpeg`` is on PATH, with one log line.

Re-reads of a file (thumbnails, scene detection, the channels read later) go through
``open_video`` too, so they take the same path as indexing did.

How it reads: ``ffprobe`` lists the stream's packets (their presentation times, without decoding:
a frame's time is its packet's, counted from the first frame as the other backends count it), and
one ``ffmpeg`` process decodes the frames in order into a pipe of raw RGB. Reading forward
continues that process; a frame before the current one starts it again from the beginning, so
random access is slow (indexing reads forward; so do thumbnails and scene detection).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from mergeseek.errors import InputError
from mergeseek.indexing.decoders import DecodeError, VideoReader, _fill_missing, _finite, _from_first_frame, last_line
from mergeseek.indexing.formats import FFMPEG_HINT as INSTALL_HINT
from mergeseek.indexing.formats import ffmpeg_ready

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 600  # listing the packets of a multi-hour file reads all of it once
# A read of at most this many frames passes the frame numbers to ffmpeg's select filter (each
# term is about 16 bytes of one command-line argument, which Linux caps at 128 KiB); longer reads
# take every frame through the pipe and keep the ones asked for.
SELECT_MAX_FRAMES = 6000
RAW_STREAM_FPS = 25.0  # what FFmpeg's raw H.264/H.265 demuxers assume when the stream states no rate
# What FFmpeg opens as "video" but is not: text (drawn as ANSI art), one still image, a playlist.
NOT_VIDEO_FORMATS = ("tty", "image2", "_pipe", "hls", "concat")
# The input is a local file: no network protocol, whatever the file points to.
LOCAL_ONLY = ("-protocol_whitelist", "file")


@functools.lru_cache(maxsize=1)
def _passthrough_args() -> tuple:
    """Frames as decoded, none duplicated or dropped: ``-fps_mode passthrough`` (FFmpeg 5.1 and
    later), ``-vsync 0`` before."""
    try:
        head = subprocess.run(["ffmpeg", "-hide_banner", "-version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"version n?(\d+)\.(\d+)", head)
        if m and (int(m.group(1)), int(m.group(2))) < (5, 1):
            return ("-vsync", "0")
    except (OSError, subprocess.SubprocessError):
        pass
    return ("-fps_mode", "passthrough")


def _url(path: Path) -> str:
    """The file as FFmpeg must be given it: ``file:`` and the absolute path, so that a name such as
    ``concat:a.mp4`` or ``http:x.mp4`` is not taken for a protocol, nor ``-x.mp4`` for an option."""
    return "file:" + os.path.abspath(str(path))


def _probe(args: list, path: Path) -> str:
    try:
        done = subprocess.run(["ffprobe", "-v", "error", *LOCAL_ONLY, *args, "-i", _url(path)], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InputError(f"{path}: ffprobe took over {PROBE_TIMEOUT_S} s to list its frames; copy the file to a "
                         "local disk and index it again") from None
    except OSError as exc:
        raise InputError(f"{path}: ffprobe cannot run ({exc}); {INSTALL_HINT}") from None
    if done.returncode != 0:
        raise InputError(f"{path}: FFmpeg cannot read it ({last_line(done.stderr, 'no reason given')})")
    return done.stdout


def _rate(text: str) -> float:
    num, _, den = str(text).partition("/")
    try:
        return _finite(float(num) / float(den or 1))
    except (ValueError, ZeroDivisionError):
        return 0.0


def stream_info(path: Path) -> dict:
    """The first video stream: ``width``, ``height`` (as shown, turned where the file says it is
    displayed turned by 90 degrees), ``fps`` (0 when unknown), ``codec``, ``format``.

    Raises:
        InputError: FFmpeg cannot read the file, finds no video stream, or reads it as something
            that is not a video (text, a single image).
    """
    out = _probe(["-select_streams", "v:0", "-show_entries",
                  "stream=codec_name,width,height,avg_frame_rate,r_frame_rate:stream_side_data=rotation"
                  ":stream_tags=rotate:format=format_name", "-of", "json"], path)
    try:
        probe = json.loads(out)
    except ValueError:
        raise InputError(f"{path}: ffprobe's answer about it cannot be read") from None
    streams = probe.get("streams") or [{}]
    fields = streams[0]
    fmt, codec = str((probe.get("format") or {}).get("format_name", "")), str(fields.get("codec_name", ""))
    if codec in ("", "none", "unknown") or "width" not in fields:
        raise InputError(f"{path}: no video stream that FFmpeg can decode (no video track, or an unknown codec)")
    if codec == "ansi" or any(tag in fmt for tag in NOT_VIDEO_FORMATS):
        raise InputError(f"{path}: not a video (FFmpeg reads it as {fmt or codec})")
    try:
        width, height = int(fields["width"]), int(fields["height"])
    except (TypeError, ValueError):
        raise InputError(f"{path}: the video stream states no frame size") from None
    if width <= 0 or height <= 0:
        raise InputError(f"{path}: the video stream states no frame size")
    side = [d.get("rotation") for d in fields.get("side_data_list") or [] if isinstance(d, dict)]
    try:
        turn = float(next((r for r in side if r is not None), None) or (fields.get("tags") or {}).get("rotate") or 0)
    except (TypeError, ValueError):
        turn = 0.0
    if round(turn) % 180 == 90:
        width, height = height, width
    fps = _rate(fields.get("avg_frame_rate", "")) or _rate(fields.get("r_frame_rate", ""))
    return {"width": width, "height": height, "fps": fps, "codec": codec, "format": fmt}


def packet_times(path: Path) -> np.ndarray:
    """Presentation time of every video packet, in seconds, in presentation order; all NaN when
    not every packet has one (the reader then times frame i at i / frame rate).

    A raw stream has no times. MPEG program streams (.mpg, .vob) give a pts to some packets only,
    and the decode times FFmpeg guesses for the others skip and repeat values (measured on a clip
    made here), so neither is used: such streams are constant-rate in practice (DVD, broadcast).
    Packets flagged to be discarded (the frames before an MP4 edit point, which FFmpeg decodes but
    does not output) are left out, so the count is that of the frames ``ffmpeg`` gives."""
    out = _probe(["-select_streams", "v:0", "-show_entries", "packet=pts_time,flags", "-of", "csv=p=0"], path)
    times = []
    for line in out.splitlines():
        cells = line.strip().split(",")
        if not line.strip().strip(",") or (len(cells) > 1 and "D" in cells[1]):
            continue  # a blank line, or a packet the container says to decode but not show (before an edit point)
        times.append(_seconds(cells[0]))
    ts = np.asarray(times, dtype=np.float64)
    return np.sort(ts) if not np.isnan(ts).any() else np.full(len(ts), np.nan)


def _seconds(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:  # "N/A"
        return float("nan")


class FfmpegReader(VideoReader):
    """A video read through ``ffprobe`` and an ``ffmpeg`` pipe (module doc)."""

    backend = "ffmpeg"

    def __init__(self, path: Path, size: Optional[tuple[int, int]] = None):
        super().__init__(path, size)
        if not ffmpeg_ready():
            raise InputError(f"{self.path}: the ffmpeg decoder needs ffmpeg and ffprobe on PATH; {INSTALL_HINT}")
        info = stream_info(self.path)
        self.info = info
        ts = packet_times(self.path)
        self.raw = info["format"] in ("h264", "hevc")  # a raw stream: no container, no times
        self.avg_fps = info["fps"] or (RAW_STREAM_FPS if self.raw else 0.0)
        if self.raw:
            log.warning("%s: a raw video stream has no times; its frames are timed at %.3g fps (the rate it states, "
                        "or FFmpeg's 25). If that is wrong, re-encode it at its rate: ffmpeg -r RATE -i IN OUT.mp4",
                        self.path, self.avg_fps)
        # ffprobe prints microseconds: rounding there keeps 0.08 from reading 0.07999999999999996
        self.timestamps = np.round(_fill_missing(_from_first_frame(ts), self.avg_fps), 6)
        self.out_size = tuple(size) if size is not None else (info["width"], info["height"])
        self._shape = (self.out_size[1], self.out_size[0], 3)
        self._stream: Optional[Iterator[np.ndarray]] = None
        self._pos = 0  # index of the next frame the stream gives
        self._last: Optional[np.ndarray] = None  # frame _pos - 1
        self._end: Optional[int] = None  # where decoding stopped early, and why
        self._end_reason = ""

    # ------------------------------------------------------------------ decoding
    def _command(self, select: Optional[list] = None) -> list:
        w, h = self.out_size
        chain = f"scale={w}:{h}"
        if select:  # frame numbers n count decoded frames in presentation order, as our indices do
            chain = "select='" + "+".join(f"eq(n,{i})" for i in select) + "'," + chain
        return ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", *LOCAL_ONLY, "-i", _url(self.path), "-map", "0:v:0",
                *_passthrough_args(), "-vf", chain, "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]

    def _sequential(self, select: Optional[list] = None) -> Iterator[np.ndarray]:
        w, h = self.out_size
        need = w * h * 3
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty decoder cannot block us
            proc = subprocess.Popen(self._command(select), stdout=subprocess.PIPE, stderr=err,
                                    stdin=subprocess.DEVNULL)
            try:
                while True:
                    buf = proc.stdout.read(need)
                    if len(buf) < need:
                        break
                    yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
                code = proc.wait()
                if code != 0:
                    err.seek(0)
                    raise DecodeError(last_line(err.read().decode("utf-8", "replace"), f"ffmpeg exited with status {code}"))
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()

    def read(self, indices, batch_size: int = 32):
        """``VideoReader.read``, with one ffmpeg process that passes on only the frames asked for
        (its ``select`` filter) when they are a part of the video: the frames skipped never cross
        the pipe. Frames the stream does not reach are recorded in ``failed``, as for every reader."""
        idx = [int(i) for i in indices]
        wanted = sorted(set(idx))
        if (not idx or idx != wanted or len(idx) >= len(self) or idx[0] < 0 or idx[-1] >= len(self)
                or len(idx) > SELECT_MAX_FRAMES):
            yield from super().read(indices, batch_size)
            return
        self._close_stream()
        step = self.frames_per_read(idx[0], batch_size)
        got = 0
        stream = self._sequential(select=idx)
        try:
            chunk, frames = [], []
            for frame in stream:
                chunk.append(idx[got])
                frames.append(frame)
                got += 1
                if len(chunk) == step:
                    yield chunk, np.stack(frames)
                    chunk, frames = [], []
                if got == len(idx):
                    break
            if chunk:
                yield chunk, np.stack(frames)
        except DecodeError as exc:
            self.fail_reason = self.fail_reason or str(exc)
        finally:
            stream.close()
        if got < len(idx):
            self.failed.extend(idx[got:])
            self.fail_reason = self.fail_reason or "the stream ends early"

    def _frame(self, index: int) -> np.ndarray:
        if self._end is not None and index >= self._end:
            raise DecodeError(self._end_reason)
        if self._last is not None and index == self._pos - 1:
            return self._last
        if self._stream is None or index < self._pos:
            self._close_stream()
            self._stream, self._pos = self._sequential(), 0
        try:
            while self._pos <= index:
                self._last = next(self._stream)
                self._pos += 1
        except StopIteration:
            self._end, self._end_reason = self._pos, "the stream ends early"
        except DecodeError as exc:
            self._end, self._end_reason = self._pos, str(exc)
        if self._end is not None and index >= self._end:
            self._close_stream()
            raise DecodeError(self._end_reason)
        return self._last

    def _get_batch(self, indices: list[int]) -> np.ndarray:
        return np.stack([self._frame(i).copy() for i in indices])

    def _one(self, index: int) -> Optional[np.ndarray]:
        # random access and the sequential decoder are the same thing here: no second try
        try:
            return self._frame(index).copy()
        except DecodeError as exc:
            if not self.fail_reason:
                self.fail_reason = str(exc)
            return None

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()  # kills the ffmpeg process (the generator's finally)
        self._stream, self._last, self._pos = None, None, 0

    def scale_to(self, size: tuple[int, int]) -> None:
        """Decode at ``size`` (width, height) from now on (FFmpeg scales; full-size frames never
        reach Python)."""
        self._close_stream()
        self.size = self.out_size = tuple(size)
        self._shape = (self.out_size[1], self.out_size[0], 3)
        self._end = None

    def close(self) -> None:
        self._close_stream()
        super().close()


def start_times(path: Path) -> dict:
    """Start times in seconds from one ``ffprobe``: ``video`` and ``audio`` (the first stream of
    each) and ``file`` (the container's, which ``-ss`` counts from); None where there is none."""
    out = _probe(["-show_entries", "stream=codec_type,start_time:format=start_time", "-of", "json"], path)
    try:
        probe = json.loads(out)
    except ValueError:
        return {"video": None, "audio": None, "file": None}

    def seconds(entry: dict) -> Optional[float]:
        t = _seconds(str(entry.get("start_time", "N/A")))
        return None if np.isnan(t) else t

    found = {"file": seconds(probe.get("format") or {})}
    for st in probe.get("streams") or []:
        kind = st.get("codec_type")
        if kind in ("video", "audio") and kind not in found:
            found[kind] = seconds(st)
    return {"video": found.get("video"), "audio": found.get("audio"), "file": found["file"]}


def read_audio_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    """The first audio stream as float32 mono samples at ``sample_rate`` (empty without one)."""
    if not ffmpeg_ready():
        raise InputError(f"{path}: the ffmpeg decoder needs ffmpeg and ffprobe on PATH; {INSTALL_HINT}")
    has_audio = _probe(["-select_streams", "a:0", "-show_entries", "stream=index", "-of", "csv=p=0"], path).strip()
    if not has_audio:
        return np.zeros(0, np.float32)
    with tempfile.TemporaryFile() as err:
        done = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", *LOCAL_ONLY, "-i", _url(path), "-map", "0:a:0",
                               "-ac", "1", "-ar", str(int(sample_rate)), "-f", "f32le", "pipe:1"],
                              stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            err.seek(0)
            why = last_line(err.read().decode("utf-8", "replace"), "no reason given")
            raise InputError(f"{path}: FFmpeg cannot decode its sound ({why})")
    return np.frombuffer(done.stdout, "<f4").astype(np.float32)


__all__ = ["FfmpegReader", "ffmpeg_ready", "packet_times", "read_audio_ffmpeg", "start_times", "stream_info"]
