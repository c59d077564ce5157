"""One audio reader: ``read_audio(path) -> float32 mono samples`` of an audio file or a video's sound.

Speech recognition (``indexing.asr``) and any later audio model read sound through this function
only. It decodes the whole first audio stream of ``path`` once, downmixed to mono and resampled
to ``sample_rate`` (16 kHz by default, what speech models expect), as float32 in [-1, 1]. Times
in the returned array count from the stream's first sample, taken as time 0 of the video (the
frames' ``pts_time``).

* wav, flac, mp3, ogg, m4a... and the audio track of any video FFmpeg reads;
* a video without an audio track gives an empty array (not an error: a silent clip has no speech);
* a missing, empty (0 bytes) or unreadable file, or a text file (which FFmpeg would open as an
  "ansi" video without sound), raises ``InputError`` naming the file.

The decoder is the video decoder's library (``indexing.decoders``): decord2 (``AudioReader``) by
default, torchcodec (``AudioDecoder``) as the other choice. Memory: the whole track is held at
once (an hour at 16 kHz is 230 MB of float32).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Union

import numpy as np

from mergeseek.errors import InputError
from mergeseek.indexing.decoders import DEFAULT_BACKEND, require_backend
from mergeseek.indexing.formats import FFMPEG_ONLY_EXTS, ffmpeg_ready, holds_text

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# What each backend says when a readable file has no audio stream (a silent video).
_NO_AUDIO = ("can't find audio stream", "best audio stream is unknown", "no audio stream")


def read_audio(path: Union[str, Path], sample_rate: int = SAMPLE_RATE, backend: str = DEFAULT_BACKEND) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono samples at ``sample_rate`` (empty when the
    file has no audio stream).

    Raises:
        InputError: ``path`` is missing, empty or not a media file the decoder can read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such audio or video file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes); nothing to listen to")
    if int(sample_rate) <= 0:
        raise InputError(f"{path}: sample rate {sample_rate} is not valid; give a positive rate such as 16000")
    require_backend(backend)
    if holds_text(path):  # FFmpeg reads text as an "ansi" art video, and follows a playlist named like media
        raise InputError(f"{path}: not an audio or video file that can be read (it holds text)")
    if backend == "ffmpeg" or (path.suffix.lower() in FFMPEG_ONLY_EXTS and ffmpeg_ready()):
        samples = _decode_ffmpeg(path, int(sample_rate))
    else:
        try:
            samples = _decode_decord(path, int(sample_rate)) if backend == "decord" else _decode_torchcodec(path, int(sample_rate))
        except Exception as exc:  # the decoders raise their own types (DECORDError, RuntimeError, ValueError)
            text = str(exc).strip()
            if any(s in text.lower() for s in _NO_AUDIO):
                log.debug("%s has no audio stream", path)
                return np.zeros(0, np.float32)
            reason = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text.splitlines()[-1])[:200] if text else type(exc).__name__
            error = InputError(f"{path}: not an audio or video file that can be read ({reason})")
            if not ffmpeg_ready():
                raise error from None
            try:  # what the library cannot read, FFmpeg's command may (as for video, decoders.open_video)
                samples = _decode_ffmpeg(path, int(sample_rate))
            except InputError:
                raise error from None
    samples = np.asarray(samples, np.float32).reshape(-1)
    samples = _align_to_first_frame(path, samples, int(sample_rate))
    return np.clip(np.nan_to_num(samples), -1.0, 1.0)


def _align_to_first_frame(path: Path, samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Samples placed on the video's clock: silence put before a sound track that starts after the
    first frame (a recorder that started its microphone late; the decoders return the track from
    its own first sample), and sound before the first frame dropped. The start times come from
    torchcodec's stream headers, else from ffprobe's; without either (or for a file without video)
    the track is taken to start with the first frame, as before."""
    offset = _audio_offset(path)
    if offset is None or len(samples) == 0:
        return samples
    shift = int(round(offset * sample_rate))
    if shift > 0:
        log.info("%s: the sound starts %.2f s after the first frame; aligned to the frames", path, offset)
        return np.concatenate([np.zeros(shift, samples.dtype), samples])
    return samples[-shift:] if shift < 0 else samples


def _audio_offset(path: Path) -> "float | None":
    """Seconds the first audio stream starts after the first video frame (None when unknown): from
    torchcodec's stream headers, else from ``ffprobe``'s when FFmpeg's tools are on PATH."""
    offset = _offset_torchcodec(path)
    if offset is None and ffmpeg_ready():
        from mergeseek.indexing.ffmpeg_cli import start_times

        try:
            starts = start_times(path)
        except InputError:
            starts = {}
        video, audio = starts.get("video"), starts.get("audio")
        offset = None if video is None or audio is None else audio - video
    if offset is None:
        return None
    return offset if abs(offset) >= 0.05 else 0.0  # codec priming (tens of ms) is left as it is


def _offset_torchcodec(path: Path) -> "float | None":
    import sys

    if "decord" in sys.modules and "torchcodec.decoders" not in sys.modules:
        return None  # torchcodec cannot start after decord (indexing.decoders._import)
    try:
        from torchcodec.decoders import AudioDecoder, VideoDecoder

        audio = AudioDecoder(str(path)).metadata.begin_stream_seconds
        video = VideoDecoder(str(path), seek_mode="approximate").metadata.begin_stream_seconds
    except Exception:  # torchcodec missing, or no video stream (an audio file): nothing to align to
        return None
    if audio is None or video is None:
        return None
    return float(audio) - float(video)


def _decode_decord(path: Path, sample_rate: int) -> np.ndarray:
    import decord

    return decord.AudioReader(str(path), sample_rate=sample_rate, mono=True)[:].asnumpy()


def _decode_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    from mergeseek.indexing.ffmpeg_cli import read_audio_ffmpeg

    return read_audio_ffmpeg(path, sample_rate)


def _decode_torchcodec(path: Path, sample_rate: int) -> np.ndarray:
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(str(path), sample_rate=sample_rate, num_channels=1).get_all_samples()
    return samples.data.numpy()


def pcm16(samples: np.ndarray) -> bytes:
    """``samples`` (float in [-1, 1]) as 16-bit little-endian PCM bytes (what speech engines read)."""
    return (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


__all__ = ["SAMPLE_RATE", "pcm16", "read_audio"]
