"""Preview clips (serve/clips.py, ``/api/clip/...``) of a video the browser cannot play: an H.264 MP4
that starts at the frame asked for, with the sound, made once, refused in one line where it cannot
be made. The source is a transport stream whose frames say their own number (flat grey at luma
20 + 2n), so a decoded frame of the clip names the source frame it is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_indexing_support import build_encoder, frame_means, shown_frame

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (Debian package) makes the clips")

NUMBERED = "nullsrc=s=64x48:r=25:d=4,geq=lum='20+2*N':cb=128:cr=128"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_torch_thread):
    from fastapi.testclient import TestClient

    from mergeseek.indexing import IndexOptions, Sampling, index_paths
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    root = tmp_path_factory.mktemp("clips")
    media = root / "media"
    media.mkdir()
    _ffmpeg("-f", "lavfi", "-i", NUMBERED, "-f", "lavfi", "-i", "sine=frequency=440:duration=4", "-map", "0:v", "-map",
            "1:a", "-c:v", "libx264", "-bf", "3", "-pix_fmt", "yuv420p", "-c:a", "aac", str(media / "news.ts"))
    index_paths([media], root / "ix", build_encoder(), IndexOptions(sampling=Sampling.parse("fps=1")))
    engine = Engine(CachedSearcher(root / "ix", build_encoder(), ngpu=0))
    with TestClient(create_app(engine)) as client:
        yield {"client": client, "engine": engine, "root": root}
    engine.clips.close()


def test_a_clip_starts_at_the_frame_asked_for_and_keeps_the_sound(served, tmp_path):
    from mergeseek.indexing.decoders import open_video
    from mergeseek.indexing.ffmpeg_cli import start_times

    res = served["client"].get("/api/clip/news?start=2.0")
    assert res.status_code == 200, repr(res.content) and res.headers["content-type"] == "video/mp4"
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(res.content)
    vr = open_video(clip, "decord")
    assert 45 <= len(vr) <= 50  # the 2 s left of the 4 s video, not the 20 s a clip may hold
    frames = vr.get_batch([0, 10, len(vr) - 1]).astype(float)
    want = frame_means(NUMBERED)
    shown = [shown_frame(want, f) for f in frames]
    assert abs(shown[0] - 50) <= 1 and abs(shown[1] - 60) <= 1 and shown[2] >= 97  # source frame = clip frame + 50
    starts = start_times(clip)
    assert starts["video"] is not None and starts["audio"] is not None  # the sound came along


def test_a_clip_is_made_once(served):
    client, clips = served["client"], served["engine"].clips
    first = client.get("/api/clip/news?start=1.0")
    made = dict(clips._done)
    again = client.get("/api/clip/news?start=1.0")
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert dict(clips._done) == made and len(made) >= 1


@pytest.mark.parametrize("query,status,text", [
    ("start=99", 404, "no preview of news.ts from 99"),
    ("start=-1", 422, "start"),
    ("start=nan", 422, "start"),
    ("start=later", 422, "start"),
])
def test_bad_starts_are_refused_in_one_line(served, query, status, text):
    res = served["client"].get(f"/api/clip/news?{query}")
    assert res.status_code == status and text in res.text and "\\n" not in res.json()["detail"]


def test_only_indexed_videos_have_clips(served):
    client = served["client"]
    assert client.get("/api/clip/nosuch?start=0").status_code == 404
    assert client.get("/api/clip/..%2F..%2Fetc%2Fpasswd?start=0").status_code == 404


def test_without_ffmpeg_the_reason_is_given(served, monkeypatch):
    from mergeseek.indexing import formats

    monkeypatch.setattr(formats, "_FFMPEG", [False])
    res = served["client"].get("/api/clip/news?start=0.5")
    assert res.status_code == 404 and "need FFmpeg on the server" in res.json()["detail"]


def test_a_changed_file_has_no_clip(served, tmp_path):
    """The clip is cut from the file that was indexed only: one replaced since (another size or
    time) is refused, as /api/video refuses it."""
    import os

    src = Path(served["root"]) / "media" / "news.ts"
    st = src.stat()
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        res = served["client"].get("/api/clip/news?start=0.2")
        assert res.status_code == 404 and "changed since it was indexed" in res.json()["detail"]
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
