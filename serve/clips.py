"""Preview clips: a short H.264 MP4 cut from a video the browser cannot play (MPEG transport and
program streams, WMV, RealMedia, DivX AVI, HEVC MKV, raw streams), made with FFmpeg's command.

The page first plays the indexed file itself (``/api/video/...``); when the browser refuses it, it
asks for ``/api/clip/<video_id>?start=S``: ``CLIP_S`` seconds from ``S`` (the hit's time less a
few seconds), scaled to at most ``CLIP_HEIGHT`` lines, with the sound when there is one. Times are
the index's (counted from the first video frame, as ``indexing.ffmpeg_cli`` counts them), so the
page seeks to ``pts_time - S``.

Clips are made one at a time (``MAX_RUNNING``), each within ``TIMEOUT_S``, and the last
``MAX_CACHED`` are kept in a temporary folder of this process (the index is never written).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from mergeseek.errors import NotFoundError

CLIP_S = 20.0
CLIP_HEIGHT = 480
SEEK_MARGIN_S = 10.0  # decoded and dropped before a clip's start (longer than a broadcast GOP)
MAX_CACHED = 16
MAX_RUNNING = 1
TIMEOUT_S = 120


class ClipMaker:
    """Makes and keeps preview clips (module doc); safe to call from many threads."""

    def __init__(self, max_cached: int = MAX_CACHED):
        self.max_cached = max_cached
        self._dir: Optional[str] = None
        self._done: "OrderedDict[tuple, Path]" = OrderedDict()
        self._lock = threading.Lock()
        self._running = threading.BoundedSemaphore(MAX_RUNNING)

    def clip(self, path: Path, sig: Optional[str], start: float) -> Path:
        """The MP4 of ``CLIP_S`` seconds of ``path`` from ``start`` (seconds from its first frame).

        Raises:
            NotFoundError: FFmpeg is not installed, or cannot cut a clip there (past the end, a
                file it cannot read); the reason in one line.
        """
        from mergeseek.indexing.formats import FFMPEG_HINT, ffmpeg_ready

        if not (math.isfinite(start) and start >= 0):
            raise NotFoundError(f"a clip start of {start!r} s is not valid")
        if not ffmpeg_ready():
            raise NotFoundError(f"this browser cannot play {path.name}, and previews of it need FFmpeg on the server "
                                f"({FFMPEG_HINT})")
        start = round(start, 1)
        key = (str(path), sig, start)
        with self._lock:
            done = self._done.get(key)
            if done is not None and done.exists():
                self._done.move_to_end(key)
                return done
        with self._running:  # one transcode at a time: a burst of clicks cannot start a process each
            with self._lock:
                done = self._done.get(key)
                if done is not None and done.exists():
                    return done
            out = self._make(path, start)
            with self._lock:
                self._done[key] = out
                while len(self._done) > self.max_cached:
                    _, old = self._done.popitem(last=False)
                    old.unlink(missing_ok=True)
            return out

    def _make(self, path: Path, start: float) -> Path:
        from mergeseek.indexing.decoders import last_line
        from mergeseek.indexing.ffmpeg_cli import LOCAL_ONLY, _url, start_times

        if self._dir is None:
            import atexit

            self._dir = tempfile.mkdtemp(prefix="mergeseek-clips-")
            atexit.register(self.close)
        try:  # -ss before -i counts from the file's start, which may come before its first video frame
            starts = start_times(path)
        except Exception:  # the clip is made from the file's start then; a fraction of a second off at most
            starts = {}
        video, first = starts.get("video"), starts.get("file")
        shift = max(0.0, video - first) if video is not None and first is not None else 0.0
        fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=self._dir)
        os.close(fd)
        # Seek in two steps: quickly to SEEK_MARGIN_S before the start, then decode up to it. A transport
        # or program stream has no index, and a seek straight to the start lands between keyframes:
        # nothing decodes until the next one (with one keyframe per clip, no picture at all).
        margin = min(start, SEEK_MARGIN_S)
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *LOCAL_ONLY,
               "-ss", f"{start - margin + shift:.3f}", "-i", _url(path), "-ss", f"{margin:.3f}",
               "-t", f"{CLIP_S:g}", "-map", "0:v:0", "-map", "0:a:0?",
               "-vf", f"scale=-2:'min({CLIP_HEIGHT},ih)'", "-c:v", "libx264", "-preset", "veryfast", "-crf", "28",
               "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "96k", "-ac", "2", "-movflags", "+faststart", "-f", "mp4",
               tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            Path(tmp).unlink(missing_ok=True)
            raise NotFoundError(f"a preview of {path.name} took over {TIMEOUT_S} s to make") from None
        if done.returncode != 0 or Path(tmp).stat().st_size == 0 or not _has_picture(Path(tmp)):
            Path(tmp).unlink(missing_ok=True)
            why = last_line(done.stderr, f"nothing to show from {start:g} s (past the end?)")
            raise NotFoundError(f"no preview of {path.name} from {start:g} s ({why})")
        return Path(tmp)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _has_picture(clip: Path) -> bool:
    """The clip has a video stream (a seek that lands between keyframes can leave only the sound)."""
    from mergeseek.errors import InputError
    from mergeseek.indexing.ffmpeg_cli import stream_info

    try:
        stream_info(clip)
        return True
    except InputError:
        return False
