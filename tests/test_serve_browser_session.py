"""Issue #29's page in headless Chromium: a stale basket after another index is served on the same
port, Back/Forward across searches, relevance feedback, an N=3 event query and dense mode.

Skipped, with the reason, only where no Chromium is installed (as test_serve_browser)."""

from __future__ import annotations

import json
import tempfile

import pytest
from test_indexing_support import build_encoder
from test_serve_browser import (  # noqa: F401  (fixtures)
    CHROMIUM,
    LAUNCH_ARGS,
    browser_page,
    free_port,
    playwright,
    server,
    start_uvicorn,
)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


def card_ids(page) -> list:
    return [int(x) for x in page.eval_on_selector_all("#grid .card", "cs => cs.map(c => c.dataset.id)")]


def search_box(page, text: str) -> None:
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_function("t => document.querySelector('#status').textContent.includes(t)", arg=f'for "{text}"')


def test_back_and_forward_rerun_each_search(server, browser_page):
    page, seen = browser_page
    engine = server["engine"]
    page.goto(server["base"] + "/")
    for q in ("a clock", "colour bars", "a test pattern"):
        search_box(page, q)
    assert "q=a+test+pattern" in page.url
    for q, step in (("colour bars", page.go_back), ("a clock", page.go_back), ("colour bars", page.go_forward)):
        step()
        page.wait_for_function("t => document.querySelector('#q').value === t && document.querySelector('#status')"
                               ".textContent.includes('for \"' + t + '\"')", arg=q)
        assert card_ids(page) == [h.id for h in engine.search(q, k=50)], q
    assert not seen["errors"], seen["errors"]


def test_feedback_marks_rerank_by_the_server_s_rule(server, browser_page):
    page, seen = browser_page
    engine = server["engine"]
    page.goto(server["base"] + "/?q=a%20test%20pattern")
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 5")
    ids = card_ids(page)
    page.locator("#grid .card").nth(3).locator(".fbLike").click()
    page.locator("#grid .card").nth(5).locator(".fbLike").click()
    page.locator("#grid .card").nth(0).locator(".meta").click()  # select it, then the key
    page.locator("#q").blur()
    page.keyboard.press("-")
    assert page.locator("#grid .card.liked").count() == 2 and page.locator("#grid .card.unliked").count() == 1
    page.keyboard.press("r")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('(2 relevant, 1 not)')")
    want = engine.query(["a test pattern"], like=[ids[3], ids[5]], unlike=[ids[0]], k=50)
    assert card_ids(page) == [h.id for h in want] and ids[0] not in card_ids(page)
    assert f"like={ids[3]}%2C{ids[5]}" in page.url and f"unlike={ids[0]}" in page.url
    assert not seen["errors"], seen["errors"]


def test_three_events_show_their_chain_and_rows_come_off(server, browser_page):
    page, seen = browser_page
    engine = server["engine"]
    page.goto(server["base"] + "/")
    page.fill("#q", "colour bars")
    page.fill("#then", "a clock")
    page.fill("#within", "1")
    page.click("#addEvent")
    page.fill("#events .evrow .ev", "a test pattern")
    page.fill("#events .evrow .evw", "1.5")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('then \"a test pattern\"')")
    chains = engine.query(["colour bars", "a clock", "a test pattern"], within=[1.0, 1.5], k=50)
    assert len(chains) > 0 and page.locator("#grid .card").count() == len(chains)
    first = page.locator("#grid .card").first
    assert first.locator(".pics.chain img").count() == 3
    assert first.locator(".time").inner_text().count("→") == 2
    assert page.url.count("then=") == 2 and "within=1&within=1.5" in page.url
    with page.expect_download() as dl:  # the chains shown, one row each: video_id,frame1,frame2,frame3
        page.click("#exportResults")
    rows = dl.value.path().read_text().splitlines()
    assert rows == [",".join([c.video_id, *(str(h.frame_idx) for h in c.hits)]) for c in chains][:100]
    page.click("#events .evrow .rmEvent")
    assert page.locator("#events .evrow").count() == 0
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelector('#grid .card .pics.pair') !== null")
    assert not seen["errors"], seen["errors"]


def test_dense_mode_shows_at_least_40_results_on_1400x900(server, browser_page):
    page, seen = browser_page
    engine = server["engine"]
    real = [engine.result_dict(h) for h in engine.search("a test pattern", k=20)]
    many = [dict(real[i % len(real)], id=real[i % len(real)]["id"]) for i in range(100)]  # 100 cards of real frames

    def fulfil(route):
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"kind": "frames", "query": "x", "took_ms": 1.0, "hits": many}))

    page.route("**/api/search?*", fulfil)
    try:
        page.goto(server["base"] + "/?q=x")
        page.wait_for_function("() => document.querySelectorAll('#grid .card').length === 100")
        visible = """() => [...document.querySelectorAll('#grid .card')].filter(c => { const r = c.getBoundingClientRect();
                     return r.top >= 0 && r.bottom <= innerHeight && r.right <= innerWidth; }).length"""
        page.evaluate("() => localStorage.setItem('mergeseek-dense', '')")
        page.locator("#q").blur()
        if page.is_checked("#dense"):
            page.keyboard.press("d")
        normal = page.evaluate(visible)
        page.keyboard.press("d")
        page.wait_for_function("() => document.body.classList.contains('dense')")
        dense = page.evaluate(visible)
        assert page.viewport_size == {"width": 1400, "height": 900}
        assert dense >= 40 > normal, (dense, normal)
        page.keyboard.press("d")
    finally:
        page.unroute("**/api/search?*")
    assert not seen["errors"], seen["errors"]


def test_a_basket_from_another_index_on_the_same_port_is_stale_and_never_exported(server, playwright, tmp_path):
    """The bug of issue #29: the basket kept ids per host:port and exported another index's frames."""
    from mergeseek.indexing import IndexOptions, index_paths
    from mergeseek.serve.app import create_app
    from mergeseek.serve.engine import CachedSearcher, Engine

    index_paths([server["root"] / "stills"], tmp_path / "ix_b", build_encoder(), IndexOptions())
    engine_b = Engine(CachedSearcher(tmp_path / "ix_b", build_encoder(), ngpu=0))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    srv, thread = start_uvicorn(create_app(server["engine"]), port)
    with tempfile.TemporaryDirectory(prefix="mergeseek-chromium-") as profile:
        ctx = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                            args=LAUNCH_ARGS, viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        posted = []
        page.on("request", lambda r: posted.append(r.url) if r.method == "POST" and "export" in r.url else None)
        try:
            page.goto(base + "/?q=a%20clock")
            page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 3")
            page.wait_for_function("() => document.querySelector('#basket') && document.querySelector('#bselect')")
            chosen = server["engine"].search("a clock", k=50)[:2]
            for h in chosen:
                page.locator(f"#grid .card[data-id='{h.id}'] .add").click()
            assert page.locator("#basket li").count() == 2
            rows_a = [[h.video_id, h.frame_idx] for h in chosen]
            srv.should_exit = True
            thread.join(timeout=10)
            srv, thread = start_uvicorn(create_app(engine_b), port)  # another index, the same host:port
            page.goto(base + "/")
            page.wait_for_function("() => document.querySelector('#bstale').classList.contains('on')")
            assert "Stale" in page.inner_text("#bstale") and page.locator("#basket li").count() == 2
            assert [json.loads(x) for x in page.eval_on_selector_all("#basket li", "ls => ls.map(l => l.dataset.rows)")] == \
                [[r] for r in rows_a]  # the rows as chosen on index A
            page.click("#export")
            page.wait_for_function("() => document.querySelector('#status').className === 'error'")
            assert "stale" in page.inner_text("#status") and posted == []  # nothing was sent to be exported
            page.click("#verify")
            page.wait_for_function("() => document.querySelectorAll('#verifyView tr').length === 2")
            cells = page.eval_on_selector_all("#verifyView tr", "trs => trs.map(t => [...t.cells].map(c => c.textContent))")
            assert [[c[2], c[3]] for c in cells] == [[v, str(f)] for v, f in rows_a] and all(c[5] == "stale" for c in cells)
            page.click("#bswitch")  # a basket for index B: empty, not stale
            assert page.locator("#basket li").count() == 0 and not page.is_visible("#bstale")
        finally:
            ctx.close()
            srv.should_exit = True
            thread.join(timeout=10)


def test_group_in_video_history_strip_and_stop_at_the_next_frame(server, browser_page):
    page, seen = browser_page
    engine = server["engine"]
    page.goto(server["base"] + "/?q=a%20test%20pattern")
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 5")
    # group by video: one header per video, each video's cards together, in first-appearance order
    page.check("#group")
    heads = page.eval_on_selector_all("#grid .vhead", "hs => hs.map(h => h.dataset.video)")
    videos = page.eval_on_selector_all("#grid .card", "cs => cs.map(c => c.dataset.video)")
    want = [h.video_id for h in engine.search("a test pattern", k=50)]
    assert heads == list(dict.fromkeys(want)) and videos == sorted(want, key=heads.index)
    page.uncheck("#group")
    # search in this video: every card of that video, a chip, the URL says so
    page.locator("#grid .card[data-video='a']").first.locator(".invideo").click()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('in video a')")
    assert set(page.eval_on_selector_all("#grid .card", "cs => cs.map(c => c.dataset.video)")) == {"a"}
    assert page.is_visible("#videoChip") and "video=a" in page.url
    # the query history lists both searches, newest first; a click runs one again
    items = page.eval_on_selector_all("#history li", "ls => ls.map(l => l.textContent)")
    assert items[0].endswith("in video a") and items[1] == '"a test pattern"'
    page.locator("#history li a").nth(1).click()
    page.wait_for_function("() => !document.querySelector('#status').textContent.includes('in video')"
                           " && document.querySelector('#status').textContent.includes('result(s)')")
    # a frame in the middle of video a: the strip is centred on it; playing pauses at the next indexed frame
    frames_a = sorted((h for h in engine.search("a test pattern", k=50) if h.video_id == "a"), key=lambda h: h.pts_time)
    mid = frames_a[len(frames_a) // 2]
    page.locator(f"#grid .card[data-id='{mid.id}'] .pics").click()
    page.wait_for_function("() => document.querySelector('#strip img.cur') !== null")
    page.wait_for_timeout(200)
    off = page.evaluate("""() => { const s = document.querySelector('#strip'), c = s.querySelector('img.cur');
        const sr = s.getBoundingClientRect(), cr = c.getBoundingClientRect();
        return [(cr.left + cr.right) / 2 - (sr.left + sr.right) / 2, cr.width, s.scrollWidth > s.clientWidth]; }""")
    assert off[2] and abs(off[0]) <= off[1] / 2 + 4, off  # scrollable, and the current frame in the middle
    nxt = next(h for h in frames_a if h.pts_time > mid.pts_time)
    assert float(page.get_attribute("#video", "data-stop-at")) == pytest.approx(nxt.pts_time)
    page.wait_for_function("() => { const v = document.querySelector('#video'); return v.dataset.seeked === '1' && "
                           "v.paused && v.currentTime >= parseFloat(v.dataset.stopAt) - 0.05; }", timeout=20_000)
    assert page.evaluate("() => document.querySelector('#video').currentTime") < nxt.pts_time + 0.5
    assert not seen["errors"], seen["errors"]


def test_one_basket_per_query_id(server, browser_page):
    page, seen = browser_page
    engine = server["engine"]
    page.goto(server["base"] + "/?q=a%20clock")
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 3")
    page.evaluate("() => localStorage.clear()")
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#grid .card').length > 3")
    hits = engine.search("a clock", k=50)
    page.fill("#queryId", "q1")
    page.locator("#queryId").blur()
    page.locator(f"#grid .card[data-id='{hits[0].id}'] .add").click()
    page.fill("#queryId", "q2")
    page.locator("#queryId").blur()
    assert page.locator("#basket li").count() == 0  # a new query id: its own basket
    for h in hits[1:3]:
        page.locator(f"#grid .card[data-id='{h.id}'] .add").click()
    assert page.locator("#basket li").count() == 2
    page.select_option("#bselect", "q1")
    assert page.input_value("#queryId") == "q1"
    assert [int(x) for x in page.eval_on_selector_all("#basket li", "ls => ls.map(l => l.dataset.key)")] == [hits[0].id]
    assert not seen["errors"], seen["errors"]


def test_a_basket_of_the_old_page_is_never_used(server, browser_page):
    """Before issue #29 the basket was frame ids alone ('mergeseek-basket'): it is reported once, kept
    aside, and never shown as this index's rows or exported."""
    page, seen = browser_page
    page.goto(server["base"] + "/")
    # the first load's start-up (after /api/health) moves an old basket aside: let it finish before
    # planting one, or on a slow machine it takes the planted basket away before the reload
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('frames of')")
    page.evaluate("""() => { localStorage.clear(); localStorage.setItem('mergeseek-basket',
        JSON.stringify([{key: 11, label: 'bikes @ 00:00:03.000'}])); }""")
    page.reload()
    page.wait_for_function("() => document.querySelector('#bstale').classList.contains('on')")
    assert "older basket of 1 frame id(s)" in page.inner_text("#bstale") and "bikes @ 00:00:03.000" in page.inner_text("#bstale")
    assert page.locator("#basket li").count() == 0
    assert page.evaluate("() => localStorage.getItem('mergeseek-basket')") is None
    page.reload()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('frames of')")
    assert not page.evaluate("() => document.querySelector('#bstale').classList.contains('on')")  # said once
    assert not seen["errors"], seen["errors"]
