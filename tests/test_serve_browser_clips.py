"""A video Chromium cannot play (an MPEG transport stream) plays in the page as preview clips cut by
the server (serve/clips.py), at the hit's time, and a hit outside the clip loads the next one."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest
from test_indexing_support import build_encoder
from test_serve_browser import CHROMIUM, LAUNCH_ARGS, free_port, playwright, start_uvicorn  # noqa: F401

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)"),
              pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (Debian package) makes the clips")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_torch_thread):
    from mergeseek.indexing import IndexOptions, Sampling, index_paths
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    root = tmp_path_factory.mktemp("clips-browser")
    media = root / "media"
    media.mkdir()
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=40",
                    "-c:v", "libx264", "-bf", "3", "-pix_fmt", "yuv420p", str(media / "broadcast.ts")], check=True, timeout=60)
    index_paths([media], root / "ix", build_encoder(), IndexOptions(sampling=Sampling.parse("fps=0.5")))
    engine = Engine(CachedSearcher(root / "ix", build_encoder(), ngpu=0))
    port = free_port()
    srv, thread = start_uvicorn(create_app(engine), port)
    yield {"base": f"http://127.0.0.1:{port}", "engine": engine}
    srv.should_exit = True
    thread.join(timeout=10)
    engine.clips.close()


def test_a_transport_stream_plays_as_preview_clips(server, playwright):  # noqa: F811
    with tempfile.TemporaryDirectory(prefix="mergeseek-chromium-") as profile:
        ctx = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                            args=LAUNCH_ARGS, viewport={"width": 1400, "height": 900})
        try:
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{server['base']}/?q=a%20test%20pattern")
            page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 0")
            hits = server["engine"].searcher.search_text("a test pattern", k=50)
            position = {h.id: i for i, h in enumerate(hits)}
            first = next(h for h in hits if 8 <= h.pts_time <= 12)
            later = next(h for h in hits if h.pts_time >= 30)

            def play(hit):
                page.locator("#grid .card").nth(position[hit.id]).locator(".pics").click()
                page.wait_for_function(f"""() => {{ const v = document.querySelector('#video');
                    return v.currentSrc.includes('/api/clip/') && v.dataset.seeked === '1'
                        && Math.abs(parseFloat(v.dataset.offset) + v.currentTime - {hit.pts_time}) < 0.5; }}""")
                return page.evaluate("() => { const v = document.querySelector('#video'); return [v.currentSrc, "
                                     "parseFloat(v.dataset.offset), v.currentTime, v.duration]; }")

            src, offset, now, duration = play(first)
            assert "/api/clip/broadcast?start=" in src and offset == pytest.approx(first.pts_time - 4, abs=0.11)
            assert 19 <= duration <= 21  # a clip of 20 s, not the 40 s file
            src2, offset2, _, _ = play(later)  # outside the first clip: the next one
            assert src2 != src and offset2 == pytest.approx(later.pts_time - 4, abs=0.11)
            assert "error" not in page.inner_text("#status")
        finally:
            ctx.close()
