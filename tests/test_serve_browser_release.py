"""The page over an AI Challenge release (headless Chromium): video titles from the release's
metadata on the cards and the group headers, and the object filter (the classes of objects.parquet)
keeping only keyframes with that detection, as ``search --object`` does.

Skipped, with the reason, only where no Chromium is installed (as test_serve_browser)."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from test_aic_support import MEDIA
from test_search_session import indexes, stored  # noqa: F401 (the release indexes fixture)
from test_serve_browser import CHROMIUM, LAUNCH_ARGS, free_port, playwright, start_uvicorn  # noqa: F401

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


def test_titles_and_the_object_filter_on_the_page(indexes, playwright):  # noqa: F811
    from mergeseek.indexing.aic import objects_in_frames
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    rows = stored(indexes["a"])
    searcher = CachedSearcher(indexes["a"], ngpu=0)
    searcher.text_vector = lambda text: np.asarray(rows[sorted(rows)[0]][2], np.float32)[None]
    port = free_port()
    srv, thread = start_uvicorn(create_app(Engine(searcher)), port)
    with tempfile.TemporaryDirectory(prefix="mergeseek-chromium-") as profile:
        ctx = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                            args=LAUNCH_ARGS, viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(f"http://127.0.0.1:{port}/?q=a%20news%20anchor")
            page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 3")
            # titles: each card names its video with the release's title; so does each group header
            titles = dict(page.eval_on_selector_all("#grid .card .vid", "vs => vs.map(v => [v.textContent, v.title])"))
            assert titles["L21_V001"] == "L21_V001 · " + MEDIA["L21_V001"]["title"]
            assert titles.get("L21_V002") in (None, "L21_V002")  # no media-info: no title
            page.check("#group")
            heads = page.eval_on_selector_all("#grid .vhead", "hs => hs.map(h => h.textContent)")
            assert any(MEDIA["L21_V001"]["title"] in h for h in heads)
            page.uncheck("#group")
            # the object filter: the release's classes, and choosing one runs the search with it
            assert page.is_visible("#object")
            options = page.eval_on_selector_all("#object option", "os => os.map(o => o.value)")
            assert options == ["", "Dog", "Person"]
            page.select_option("#object", "Dog")
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('with a Dog')")
            page.wait_for_function("() => !document.querySelector('#status').textContent.includes('searching')")
            shown = page.eval_on_selector_all("#grid .card", "cs => cs.map(c => [c.dataset.video, c.dataset.id])")
            frame_of = {str(i): r[1] for i, r in rows.items()}
            assert {(v, frame_of[i]) for v, i in shown} == objects_in_frames(indexes["a"], "Dog") != set()
            assert "object=Dog" in page.url
            assert not errors, errors
        finally:
            ctx.close()
            srv.should_exit = True
            thread.join(timeout=10)
