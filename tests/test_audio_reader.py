"""The one audio reader (``indexing.audio.read_audio``) refuses what is not sound, one line each.

The refusals need no ffmpeg binary (test_asr.py covers real wav/flac/mp3/video tracks and a silent
video): those files are written by hand, the decoder is the bundled library. The clock test makes
its clip with ffmpeg.
"""

from __future__ import annotations

import re
import wave

import numpy as np
import pytest

from mergeseek.errors import InputError
from mergeseek.indexing.audio import read_audio

try:  # torchcodec must load before decord does (indexing.decoders._import): at collection
    import torchcodec.decoders  # noqa: F401

    TORCHCODEC = True
except Exception:  # pragma: no cover - not installed here
    TORCHCODEC = False


def _refusal(path) -> str:
    with pytest.raises(InputError) as err:
        read_audio(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text  # one line, naming the file
    return text


def test_a_zero_length_file_is_refused_in_one_line(tmp_path):
    for name in ("clip.wav", "clip.flac", "clip.mp3", "clip"):
        (tmp_path / name).write_bytes(b"")
        assert "the file is empty (0 bytes)" in _refusal(tmp_path / name)


def test_a_non_audio_file_is_refused_in_one_line(tmp_path):
    # a page of text: FFmpeg's probe takes it for an "ansi" art video without sound, which the
    # reader would otherwise return as a silent clip (an empty array)
    (tmp_path / "notes.txt").write_text("not a sound, ein Ger\u00e4usch? \u00e2m thanh\n" * 200)
    (tmp_path / "line.txt").write_text("not a sound\n")
    (tmp_path / "fake.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "cut.wav").write_bytes(b"RIFF\x24\x10\x00\x00WAVEfmt ")  # a wav header cut short
    for name in ("notes.txt", "line.txt", "fake.wav", "cut.wav"):
        text = _refusal(tmp_path / name)
        assert re.search(r"not an audio or video file that can be read \(.+\)$", text), text


def test_a_missing_file_and_a_bad_rate_are_refused_in_one_line(tmp_path):
    assert "no such audio or video file" in _refusal(tmp_path / "missing.wav")
    with wave.open(str(tmp_path / "ok.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(8000) * 0.3) * 8000).astype("<i2").tobytes())
    with pytest.raises(InputError, match="sample rate 0 is not valid") as err:
        read_audio(tmp_path / "ok.wav", sample_rate=0)
    assert "\n" not in str(err.value)
    x = read_audio(tmp_path / "ok.wav")  # the same file with a valid rate reads: the refusals are not blanket ones
    assert x.dtype == np.float32 and abs(len(x) - 16000) < 400 and np.abs(x).max() > 0.1


def _envelope_onsets(samples: np.ndarray, rate: int = 16000) -> tuple:
    """(first, last) tenth of a second in which the sound is loud."""
    env = np.abs(samples[: len(samples) // (rate // 10) * (rate // 10)]).reshape(-1, rate // 10).max(1)
    loud = np.flatnonzero(env > 0.1)
    return loud[0] / 10, loud[-1] / 10


@pytest.mark.parametrize("backend", ["decord", "torchcodec", "ffmpeg"])
def test_a_sound_track_that_starts_late_is_placed_on_the_video_clock(tmp_path, backend):
    """A tone heard from 2.0 s to 4.0 s of a 5 s video, in a track that starts at 2.0 s: the
    samples put it at 2.0-4.0 s (speech found there lands on the frames shown then)."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (Debian package) makes the clip")
    if not TORCHCODEC:
        pytest.skip("the stream start times come from torchcodec's headers (pip install torchcodec)")
    path = tmp_path / "late.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=5",
                    "-itsoffset", "2", "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-map", "0:v", "-map", "1:a",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path)], check=True, timeout=60)
    first, last = _envelope_onsets(read_audio(path, backend=backend))
    assert 1.85 <= first <= 2.05 and 3.85 <= last <= 4.05
    aligned = tmp_path / "aligned.mp4"  # the same sound from the first frame: unchanged
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=3",
                    "-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-map", "0:v", "-map", "1:a",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(aligned)], check=True, timeout=60)
    first, last = _envelope_onsets(read_audio(aligned, backend=backend))
    assert first == 0.0 and 1.85 <= last <= 2.05


def _ffmpeg(*args: str) -> None:
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (Debian package) makes the clip")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=60)


def test_the_ffmpeg_reader_hears_what_the_library_hears(tmp_path):
    """``backend="ffmpeg"`` (FFmpeg's command through a pipe): the same samples as decord2's for a
    tone in an MP4, nothing for a video without sound, and text refused as by the library."""
    tone = tmp_path / "tone.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2", "-f", "lavfi", "-i",
            "sine=frequency=440:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(tone))
    lib, cli = read_audio(tone, backend="decord"), read_audio(tone, backend="ffmpeg")
    assert cli.dtype == np.float32 and abs(len(cli) - len(lib)) <= 160 and abs(len(cli) - 32000) <= 1600
    n = min(len(lib), len(cli))
    assert np.corrcoef(lib[:n], cli[:n])[0, 1] > 0.99
    silent = tmp_path / "silent.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(silent))
    assert len(read_audio(silent, backend="ffmpeg")) == 0
    (tmp_path / "notes.txt").write_text("not a sound\n" * 50)
    with pytest.raises(InputError, match="it holds text"):
        read_audio(tmp_path / "notes.txt", backend="ffmpeg")


def test_realmedia_sound_is_read_through_ffmpeg(tmp_path):
    """RealMedia, which neither library reads: its sound comes through FFmpeg's command whatever the
    chosen decoder (a 440 Hz tone, RealAudio 1.0 at 8 kHz)."""
    rm = tmp_path / "old.rm"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2", "-f", "lavfi", "-i",
            "sine=frequency=440:duration=2", "-c:v", "rv20", "-c:a", "real_144", "-ar", "8000", "-ac", "1", str(rm))
    x = read_audio(rm)  # the default decoder, decord2
    assert abs(len(x) - 32000) <= 1600 and np.abs(x).max() > 0.05
    spectrum = np.abs(np.fft.rfft(x[4000:20000]))
    assert abs(int(spectrum.argmax()) - 440) <= 5  # the tone's frequency (16,000 samples at 16 kHz: 1 Hz bins)


@pytest.mark.parametrize("container", [".mp4", ".ts"])
def test_without_torchcodec_the_start_times_come_from_ffprobe(tmp_path, monkeypatch, container):
    """The late sound track of the clock test, aligned from ffprobe's stream start times when
    torchcodec gives none (not installed, or started after decord): also in a transport stream,
    whose streams both start 1.4 s in."""
    from mergeseek.indexing import audio

    path = tmp_path / f"late{container}"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=5", "-itsoffset", "2", "-f", "lavfi", "-i",
            "sine=frequency=440:duration=2", "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-c:a", "aac", str(path))
    monkeypatch.setattr(audio, "_offset_torchcodec", lambda p: None)
    first, last = _envelope_onsets(read_audio(path, backend="ffmpeg"))
    assert 1.85 <= first <= 2.05 and 3.85 <= last <= 4.05
    from mergeseek.indexing import formats

    monkeypatch.setattr(formats, "_FFMPEG", [False])  # and with neither: the track from the first frame
    first, _ = _envelope_onsets(read_audio(path, backend="decord"))
    assert first <= 0.1
