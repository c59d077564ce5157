"""Which frames of a video to keep: fixed rate, every n-th, k uniform, or scene-change keyframes.

``Sampling`` is a frozen value parsed from ``fps=1``, ``every=10``, ``uniform=16``, ``scene=0.15``
or ``all``; ``str()`` round-trips so the index manifest records the exact setting. ``fps`` picks
frames by their timestamps (``Sampling.select``), so a variable-frame-rate video is sampled evenly
in time; ``every`` and ``uniform`` depend only on the frame count; scene detection needs pixels,
so it works on a stream of small colour thumbnails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import numpy as np

from mergeseek.errors import ConfigError

MODES = ("fps", "every", "uniform", "scene", "all")
MAX_FPS = 1000  # above any camera's rate but high-speed ones; fps=1e9 once tried to hold 1e9 sample times
_TARGETS_PER_CHUNK = 1 << 20  # sample times looked up at once (memory stays bounded for any video length)
DEFAULT_SCENE_THRESHOLD = 0.15
# Scene differences are measured on thumbnails this size: big enough to see a cut, small enough
# that decoding every frame of an hour of video stays cheap (decord rejects some sizes, e.g. 48).
SCENE_THUMB = 64


@dataclass(frozen=True)
class Sampling:
    """How frames are picked from a video.

    Args:
        mode: ``fps`` (``value`` frames per second of video time), ``every`` (every ``value``-th
            frame), ``uniform`` (``value`` frames spread evenly over the video), ``scene`` (a frame
            is kept when its mean absolute RGB difference from the last kept frame, on a 0..1
            scale, exceeds ``value``) or ``all``.
        value: the mode's parameter (see above); ignored for ``all``.
    """

    mode: str = "fps"
    value: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sampling mode {self.mode!r} is not valid; choose one of: {', '.join(MODES)}")
        if self.mode in ("every", "uniform") and (self.value < 1 or self.value != int(self.value)):
            raise ConfigError(f"sampling {self.mode}={self.value:g} is not valid; give an integer >= 1")
        if self.mode == "fps" and not (self.value > 0 and math.isfinite(self.value)):
            raise ConfigError(f"sampling fps={self.value:g} is not valid; give frames per second > 0")
        if self.mode == "fps" and self.value > MAX_FPS:
            raise ConfigError(f"sampling fps={self.value:g} is above {MAX_FPS}; to keep every frame use every=1 "
                              f"(--every 1)")
        if self.mode == "scene" and not (0 < self.value < 1):
            raise ConfigError(f"scene threshold {self.value:g} is not valid; give a fraction in (0, 1), e.g. 0.15")

    @classmethod
    def parse(cls, spec: Union[str, "Sampling", None]) -> "Sampling":
        """``fps=1``, ``every=10``, ``uniform=16``, ``scene=0.1``, ``scene`` (default threshold) or ``all``."""
        if spec is None:
            return cls()
        if isinstance(spec, Sampling):
            return spec
        text = spec.strip().lower()
        if text in ("all", "scene"):
            return cls(text, DEFAULT_SCENE_THRESHOLD if text == "scene" else 0.0)
        mode, sep, raw = text.partition("=")
        if not sep or mode not in MODES:
            raise ConfigError(f"sampling {spec!r} is not valid; use fps=1, every=10, uniform=16, scene=0.15 or all")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"sampling {spec!r} has a non-numeric value {raw!r}") from None
        return cls(mode, value)

    @classmethod
    def from_options(cls, fps: Optional[float] = None, every: Optional[int] = None, uniform: Optional[int] = None,
                     scene: Optional[float] = None, scenes: bool = False) -> "Sampling":
        """At most one of the CLI's ``--fps/--every/--uniform/--scene T`` (``--scenes``: scene at the
        default threshold); none given means ``fps=1``."""
        if scenes and scene is None:
            scene = DEFAULT_SCENE_THRESHOLD
        given = {k: v for k, v in (("fps", fps), ("every", every), ("uniform", uniform), ("scene", scene)) if v is not None}
        if len(given) > 1:
            raise ConfigError(
                f"choose one sampling option, not {' and '.join('--' + k for k in given)}: "
                "--fps N, --every N, --uniform K or --scene THRESHOLD"
            )
        if not given:
            return cls()
        (mode, value), = given.items()
        return cls(mode, float(value))

    def __str__(self) -> str:
        return "all" if self.mode == "all" else f"{self.mode}={self.value:g}"

    def indices(self, n_frames: int, video_fps: float) -> np.ndarray:
        """Frame indices for the rate-based modes (not ``scene``, which needs pixels)."""
        if self.mode == "scene":
            raise ValueError("scene sampling needs the frames; use SceneDetector")
        if n_frames <= 0:
            return np.zeros(0, np.int64)
        if self.mode == "all":
            return np.arange(n_frames, dtype=np.int64)
        if self.mode == "every":
            return np.arange(0, n_frames, int(self.value), dtype=np.int64)
        if self.mode == "uniform":
            k = int(self.value)
            if k >= n_frames:
                return np.arange(n_frames, dtype=np.int64)
            # The middle of each of k equal segments: no bias towards the (often black) first frame.
            return np.floor((np.arange(k) + 0.5) * n_frames / k).astype(np.int64)
        return fps_indices(n_frames, video_fps, self.value)

    def select(self, timestamps: np.ndarray, video_fps: float = 0.0) -> np.ndarray:
        """Frame indices for the rate-based modes given every frame's presentation time.

        ``fps`` picks, for each t = t0 + k/fps before the video's end, the frame whose timestamp
        is nearest to t (a variable-frame-rate video is sampled by time, not by its average
        rate); the other modes depend only on the frame count. Timestamps that are unknown or
        out of order fall back to the average rate.
        """
        ts = np.asarray(timestamps, dtype=np.float64)
        if self.mode != "fps" or len(ts) == 0:
            return self.indices(len(ts), video_fps)
        if not np.all(np.isfinite(ts)) or np.any(np.diff(ts) < 0):
            return fps_indices(len(ts), video_fps, self.value)
        return fps_indices_by_time(ts, self.value)


def fps_indices(n_frames: int, video_fps: float, fps: float) -> np.ndarray:
    """Frames nearest to t = 0, 1/fps, 2/fps, ... for every t before the video's end."""
    if not (video_fps > 0 and math.isfinite(video_fps)):
        raise ConfigError(f"video frame rate {video_fps!r} is unknown; use every=N or uniform=K sampling instead")
    if fps >= video_fps:  # a step of at most one frame reaches every frame
        return np.arange(max(0, n_frames), dtype=np.int64)
    duration = n_frames / video_fps
    # A tiny epsilon so that 10 s at 1 fps gives t = 0..9 (10 frames), not 11 through rounding.
    count = max(1, math.ceil(duration * fps - 1e-9))
    idx = np.rint(np.arange(count) * (video_fps / fps)).astype(np.int64)
    return np.unique(np.clip(idx, 0, n_frames - 1))


def fps_indices_by_time(timestamps: np.ndarray, fps: float) -> np.ndarray:
    """Frames nearest (by timestamp) to t = t0, t0 + 1/fps, ... for every t before the end.

    The end is the last frame's time plus one typical frame duration (the median gap), so a
    constant-rate video gives exactly what ``fps_indices`` gives. On a tie the earlier frame wins.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    n = len(ts)
    if n == 0:
        return np.zeros(0, np.int64)
    gap = float(np.median(np.diff(ts))) if n > 1 else 0.0
    t0, end = float(ts[0]), float(ts[-1]) + max(gap, 0.0)
    # Container timestamps are often float32 or rounded to the time base: a slack of 1e-4 periods
    # keeps 2.5000001 s at 2 fps from adding a target at the very end.
    count = max(1, math.ceil((end - t0) * fps - 1e-4))
    chosen = np.zeros(n, bool)
    for start in range(0, count, _TARGETS_PER_CHUNK):  # a long video at a high rate: bounded memory
        targets = t0 + np.arange(start, min(count, start + _TARGETS_PER_CHUNK)) / fps
        right = np.clip(np.searchsorted(ts, targets, side="left"), 0, n - 1)
        left = np.clip(right - 1, 0, n - 1)
        # 1e-9 s slack: a timestamp stored as 0.5000000001 still ties with 0.4999999999
        take_left = np.abs(targets - ts[left]) <= np.abs(ts[right] - targets) + 1e-9
        chosen[np.where(take_left, left, right)] = True
    return np.flatnonzero(chosen).astype(np.int64)


def thumbnails(frames: np.ndarray) -> np.ndarray:
    """[B,H,W,3] uint8 -> float32 in 0..1. Colour is kept: a red->blue cut can have equal grey levels."""
    return frames.astype(np.float32) / 255.0


class SceneDetector:
    """Keeps a frame when it differs from the last kept frame by more than ``threshold``.

    Comparing with the last *kept* frame (not the previous frame) means a slow pan eventually
    starts a new shot too, while a static shot contributes one frame however long it lasts.
    """

    def __init__(self, threshold: float = DEFAULT_SCENE_THRESHOLD):
        self.threshold = threshold
        self._last: np.ndarray | None = None

    def keep(self, thumbs: np.ndarray, first_index: int = 0) -> list[int]:
        """Indices (offset by ``first_index``) of the thumbnails in this chunk that start a shot."""
        kept = []
        for i, thumb in enumerate(thumbs):
            if self._last is None or float(np.abs(thumb - self._last).mean()) > self.threshold:
                kept.append(first_index + i)
                self._last = thumb
        return kept


def scene_indices(thumb_chunks: Iterable[np.ndarray], threshold: float) -> np.ndarray:
    """Scene-start frame indices over consecutive chunks of thumbnails."""
    det, kept, offset = SceneDetector(threshold), [], 0
    for chunk in thumb_chunks:
        kept.extend(det.keep(chunk, offset))
        offset += len(chunk)
    return np.asarray(kept, dtype=np.int64)
