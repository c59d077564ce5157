"""The one audio reader (``indexing.audio.read_audio``) refuses what is not sound, one line each.

No ffmpeg binary needed (test_asr.py covers real wav/flac/mp3/video tracks and a silent video):
the files here are written by hand, the decoder is the bundled library.
"""

from __future__ import annotations

import re
import wave

import numpy as np
import pytest

from mergeseek.errors import InputError
from mergeseek.indexing.audio import read_audio


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
