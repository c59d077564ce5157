"""The page in a real headless Chromium (Debian's package, driven by Playwright), against uvicorn.

Skipped, with the reason, only where no Chromium is installed (`.ci/run` installs it with apt-get).
"""

from __future__ import annotations

import csv
import shutil
import socket
import tempfile
import threading
import time

import pytest
from test_indexing_support import build_encoder
from test_serve_api import build_served_index

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_torch_thread):
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    root = tmp_path_factory.mktemp("browser")
    ix = build_served_index(root)
    engine = Engine(CachedSearcher(ix, build_encoder(), ngpu=0))
    port = free_port()
    srv, thread = start_uvicorn(create_app(engine), port)
    yield {"base": f"http://127.0.0.1:{port}", "engine": engine, "root": root}
    srv.should_exit = True
    thread.join(timeout=10)


def start_uvicorn(app, port: int):
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread, once it has started."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return srv, thread


@pytest.fixture(scope="module")
def playwright():
    """One Playwright driver for the module (a second one inside it would fail: one event loop)."""
    with sync_api.sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser_page(server, playwright):
    pw = playwright
    with tempfile.TemporaryDirectory(prefix="mergeseek-chromium-") as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS,
                                                    accept_downloads=True, viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        seen = {"requests": [], "errors": []}
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: seen["errors"].append(str(e)))
        yield page, seen
        ctx.close()


def test_search_play_basket_and_export_in_chromium(server, browser_page, tmp_path):
    page, seen = browser_page
    base = server["base"]
    page.goto(f"{base}/?q=a%20test%20pattern")
    page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('#grid .card img')];
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")
    expected = server["engine"].searcher.search_text("a test pattern", k=50)
    ids = [int(x) for x in page.eval_on_selector_all("#grid .card", "cs => cs.map(c => c.dataset.id)")]
    assert ids == [h.id for h in expected]
    assert "result(s)" in page.inner_text("#status")
    assert page.input_value("#q") == "a test pattern"

    # click a result: its video plays from the hit's timestamp, with the neighbouring frames below
    pick = next(i for i, h in enumerate(expected) if h.pts_time >= 1.0)
    hit = expected[pick]
    page.locator("#grid .card").nth(pick).locator(".pics").click()
    page.wait_for_function("() => document.querySelector('#video').dataset.seeked === '1'")
    now = page.evaluate("() => document.querySelector('#video').currentTime")
    assert abs(now - hit.pts_time) < 0.5, (now, hit.pts_time)
    assert page.evaluate("() => document.querySelector('#video').currentSrc").endswith(f"/api/video/{hit.video_id}")
    page.wait_for_function("() => document.querySelectorAll('#strip img').length >= 2")
    strip = [int(x) for x in page.eval_on_selector_all("#strip img", "ims => ims.map(i => i.dataset.id)")]
    assert hit.id in strip and page.get_attribute("#strip img.cur", "data-id") == str(hit.id)

    # a still (image folder): shown as a picture, the video stops
    still = next(i for i, h in enumerate(expected) if h.video_id == "stills")
    page.locator("#grid .card").nth(still).locator(".pics").click()
    page.wait_for_function("() => getComputedStyle(document.querySelector('#still')).display === 'block'")
    assert page.evaluate("() => document.querySelector('#video').paused")
    assert page.get_attribute("#still", "src").endswith(f"/api/thumb/{expected[still].id}")
    page.locator("#grid .card").nth(pick).locator(".pics").click()

    # a basket of three, one removed, the other two swapped; then exported as the submission CSV
    page.evaluate("() => localStorage.clear()")
    page.click("#bclear")
    chosen = [expected[0], expected[pick], expected[-1]]
    for h in chosen:
        page.locator(f"#grid .card[data-id='{h.id}'] .add").click()
    assert page.locator("#basket li").count() == 3
    page.locator("#basket li").nth(2).locator(".remove").click()
    page.locator("#basket li").nth(0).locator(".down").click()
    order = [int(x) for x in page.eval_on_selector_all("#basket li", "ls => ls.map(l => l.dataset.key)")]
    assert order == [expected[pick].id, expected[0].id]
    page.fill("#queryId", "q-browser")
    with page.expect_download() as dl:
        page.click("#export")
    download = dl.value
    assert download.suggested_filename == "q-browser.csv"
    saved = tmp_path / "q-browser.csv"
    download.save_as(saved)
    rows = list(csv.reader(saved.open()))
    assert rows == [[h.video_id, str(h.frame_idx)] for h in (expected[pick], expected[0])]
    with page.expect_download() as dl:  # the current search's top 100, not the basket
        page.click("#exportResults")
    dl.value.save_as(tmp_path / "results.csv")
    assert dl.value.suggested_filename == "q-browser.csv"
    assert list(csv.reader((tmp_path / "results.csv").open())) == [[h.video_id, str(h.frame_idx)] for h in expected]

    # keyboard: arrows move the selection from the clicked result, b adds the selected one, Enter plays it
    page.locator("#q").blur()
    assert page.get_attribute("#grid .card.sel", "data-id") == str(hit.id)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    sel = expected[min(pick + 2, len(expected) - 1) - 1]
    assert page.get_attribute("#grid .card.sel", "data-id") == str(sel.id)
    page.keyboard.press("b")
    assert page.locator("#basket li").count() == 3
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#pinfo').textContent.includes('frame {sel.frame_idx}')")

    # nothing but this server was asked for anything
    assert all(u.startswith(base) or u.startswith(("blob:", "data:")) for u in seen["requests"]), seen["requests"]
    assert not seen["errors"], seen["errors"]


def test_errors_are_shown_on_the_page(server, browser_page):
    page, seen = browser_page
    page.goto(f"{server['base']}/?q=x&then=y&within=0")
    page.wait_for_function("() => document.querySelector('#status').className === 'error'")
    text = page.inner_text("#status")
    assert text.startswith("error:") and "within" in text
    assert page.locator("#grid .card").count() == 0
    seen["errors"].clear()  # the failed request's 422 is logged by Chromium itself


def test_image_query_by_upload_and_drop_more_like_this_and_then(server, browser_page, tmp_path):
    import decord
    from PIL import Image

    page, seen = browser_page
    engine = server["engine"]
    page.goto(server["base"] + "/")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('frames of 3 video(s)')")

    frame = decord.VideoReader(str(server["root"] / "videos" / "b.mp4"))[20].asnumpy()
    Image.fromarray(frame).save(tmp_path / "query.png")
    target = next(h for h in engine.searcher.search_image(tmp_path / "query.png", k=1))
    page.set_input_files("#imageFile", str(tmp_path / "query.png"))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('for image query.png')")
    assert page.get_attribute("#grid .card", "data-id") == str(target.id)

    # drag and drop: a real File in a DataTransfer, dropped on the page
    page.evaluate("""async (url) => {
        const blob = await (await fetch(url)).blob();
        const dt = new DataTransfer();
        dt.items.add(new File([blob], 'dropped.jpg', { type: 'image/jpeg' }));
        window.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", f"/api/thumb/{target.id}")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('for image dropped.jpg')")
    assert page.locator("#grid .card").count() > 0

    # more like this on the first result: the server's nearest frames, without that frame
    first = int(page.get_attribute("#grid .card", "data-id"))
    page.locator("#grid .card").first.locator(".like").click()
    page.wait_for_function(f"() => document.querySelector('#status').textContent.includes('frames like {first}')")
    ids = [int(x) for x in page.eval_on_selector_all("#grid .card", "cs => cs.map(c => c.dataset.id)")]
    assert ids == [h.id for h in engine.similar(first, k=50)] and first not in ids

    # a "then" query from the boxes: pair cards with two thumbnails each
    page.fill("#q", "colour bars")
    page.fill("#then", "a clock")
    page.fill("#within", "2")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('then \"a clock\"')")
    pairs = engine.search("colour bars", k=50, then="a clock", within=2)
    assert page.locator("#grid .card").count() == len(pairs) > 0
    assert page.locator("#grid .card").first.locator(".pics.pair img").count() == 2
    assert "then=a+clock" in page.url and "within=2" in page.url
    assert not seen["errors"], seen["errors"]


def test_the_page_passes_the_token_on(server, browser_page):
    import uvicorn

    from mergeseek.serve.app import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(server["engine"], token="t0ken-42"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        assert thread.is_alive()
        time.sleep(0.05)
    page = browser_page[0].context.new_page()
    try:
        page.set_default_timeout(30_000)
        assert page.goto(f"http://127.0.0.1:{port}/?q=a%20clock").status == 401
        page.goto(f"http://127.0.0.1:{port}/?q=a%20clock&token=t0ken-42")
        page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('#grid .card img')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")
        first_video = next(i for i, h in enumerate(server["engine"].search("a clock", k=50)) if h.video_id != "stills")
        page.locator("#grid .card").nth(first_video).locator(".pics").click()
        page.wait_for_function("() => document.querySelector('#video').dataset.seeked === '1'")
        assert "token=t0ken-42" in page.evaluate("() => document.querySelector('#video').currentSrc")
        assert "token=t0ken-42" in page.url
    finally:
        page.close()
        srv.should_exit = True
        thread.join(timeout=10)


def test_a_page_under_a_foreign_host_name_cannot_read_the_api(server, playwright):
    """DNS rebinding: Chromium resolves rebind.test to 127.0.0.1 (as an attacker's DNS would after
    the page loaded); the server, started as ``cli.py serve`` starts it, answers that name with 400,
    so neither the page nor a script on that origin reads the index. The bound address still works."""
    from mergeseek.serve import allowed_hosts
    from mergeseek.serve.app import create_app

    port = free_port()
    srv, thread = start_uvicorn(create_app(server["engine"], allowed_hosts=allowed_hosts("127.0.0.1")), port)
    try:
        with tempfile.TemporaryDirectory(prefix="mergeseek-chromium-") as profile:
            ctx = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True,
                args=LAUNCH_ARGS + ["--host-resolver-rules=MAP rebind.test 127.0.0.1"])
            page = ctx.new_page()
            page.set_default_timeout(30_000)
            resp = page.goto(f"http://rebind.test:{port}/")
            assert resp.status == 400 and "is not served here" in page.content()
            got = page.evaluate("""async () => { const r = await fetch('/api/search?q=x');
                                   return [r.status, await r.text()]; }""")
            assert got[0] == 400 and '"hits"' not in got[1]
            resp = page.goto(f"http://127.0.0.1:{port}/")
            assert resp.status == 200
            assert page.evaluate("async () => (await fetch('/api/health')).status") == 200
            ctx.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
