"""bench/decoders.py compares the frame a decoder returns with the source's frame of that number:
a right frame scores the re-encoding error only, a wrong one far more (the figures in
docs/BENCHMARKS.md "1c" are its output)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mergeseek.bench.decoders import frames

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (Debian package) makes the clips")


def test_frames_tells_a_right_frame_from_a_wrong_one(tmp_path, monkeypatch):
    source = tmp_path / "moving.mp4"  # a pattern that moves: every frame differs from the others
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=3",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(source)], check=True, timeout=60)
    table = frames(str(source), 3.0, [0, 30, 60], only=[".mkv", ".mpg"])
    assert max(table[".mkv", "ffmpeg"]) < 5 and max(table[".mkv", "decord"]) < 5
    assert max(table[".mpg", "ffmpeg"]) < 8
    from mergeseek.bench import decoders as bench

    real = bench._reader

    class Late:  # a decoder that hands back the frame 10 after the one asked for
        def __init__(self, path, backend):
            self.inner = real(path, backend)

        def get_batch(self, at):
            return self.inner.get_batch([i + 10 for i in at])

    monkeypatch.setattr(bench, "_reader", Late)
    late = frames(str(source), 3.0, [0, 30, 60], only=[".mkv"])
    assert min(late[".mkv", "ffmpeg"]) > 3 * max(table[".mkv", "ffmpeg"])
