"""The live page at / in real headless Chromium, against the real CLI broker and kernel.

The system's Chromium (Debian ``chromium``, installed by
scripts/setup-test-deps.sh) driven by playwright; never a downloaded browser.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from broker.proxy.ui import NOT_OFFERED
from tests.brokerproc import broker_process
from tests.conftest import MakeBroker

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
#: Bounds every wait on the page (a local spawn takes a few seconds).
WAIT_MS = 45_000
STORE_KEY = "session-broker-page"

# A 2x1 PNG built in the kernel, so the page has a real image/png output to show.
PNG_CELL = """\
import struct, zlib
from IPython.display import Image, display
def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
raw = zlib.compress(b"\\x00\\xff\\x00\\x00\\x00\\x00\\xff")
png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
display(Image(data=png))
"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("chromium is not installed: run scripts/setup-test-deps.sh (make test does)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        await browser.close()


async def _open(browser: Browser, url: str) -> Page:
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(url)
    await page.wait_for_selector("body[data-ready]")
    return page


async def _run(page: Page, code: str) -> None:
    """Type the code, press Run, wait until the run is over (done or refused)."""
    await page.fill("#code", code)
    await page.click("#run")
    await page.wait_for_function("""() => {
        const status = document.getElementById("run-status").textContent;
        return !document.getElementById("run").disabled && (status.startsWith("Done")
            || status.startsWith("Finished") || !document.getElementById("problem").hidden);
    }""")


async def test_run_reload_and_a_refusal_in_chromium(browser: Browser, tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_MAX_SESSIONS": "1"}) as broker:
        page = await _open(browser, f"{broker.url}/")
        assert await page.inner_text("h1") == "Jupyter session broker"
        assert "1 live sessions" not in await page.inner_text("#limits")  # per visitor: 3
        assert "3 live sessions at once" in await page.inner_text("#limits")

        await _run(page, "print(6*7)\nanswer = 41")
        assert await page.is_hidden("#problem"), await page.inner_text("#problem")
        assert await page.text_content("#output pre.stdout") == "42\n"
        # The spawn was followed on the events stream to its end.
        assert await page.text_content("#progress-text") == "Your session is ready."
        saved = await page.evaluate(f"JSON.parse(localStorage.getItem('{STORE_KEY}'))")
        assert set(saved) == {"id", "token"}
        assert f"Your session {saved['id']} is ready" in await page.inner_text("#session")

        # A reload comes back to the same session, kernel state included.
        await page.reload()
        await page.wait_for_selector("body[data-ready]")
        assert await page.inner_text("#run-status") == f"Reconnected to your session {saved['id']}."
        await _run(page, "print(answer + 1)")
        assert await page.text_content("#output pre.stdout") == "42\n"
        assert await page.evaluate(f"JSON.parse(localStorage.getItem('{STORE_KEY}'))") == saved

        # Another visitor (fresh storage) while the broker is full: the broker's message.
        other = await browser.new_context()
        stranger = await other.new_page()
        stranger.set_default_timeout(WAIT_MS)
        await stranger.goto(f"{broker.url}/")
        await stranger.wait_for_selector("body[data-ready]")
        await _run(stranger, "print(1)")
        assert await stranger.inner_text("#problem") == "The broker is at capacity; try again soon."
        assert await stranger.inner_text("#output") == ""
        await other.close()

        # Rich outputs: an image as image/png, HTML reduced to inert markup.
        await _run(page, PNG_CELL)
        width = await page.eval_on_selector("#output img", "img => img.naturalWidth")
        assert width == 2
        await _run(page, "from IPython.display import HTML, display\n"
                         "display(HTML('<b>bold</b><img src=x onerror=\"document.title=1\">"
                         "<script>document.title=2</script><a href=\"javascript:1\">x</a>'))")
        html = await page.inner_html("#output .html")
        assert html == "<b>bold</b><img>x", html
        assert await page.title() == "Jupyter session broker"


async def test_the_page_can_be_turned_off_or_replaced(make_broker: MakeBroker,
                                                       tmp_path: Path) -> None:
    off = await make_broker(page="off")
    async with off.http.get(f"{off.url}/") as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "not_found"
    own = tmp_path / "own-page"
    own.mkdir()
    (own / "index.html").write_text("<p>our own page</p>")
    (own / "app.js").write_text("console.log(1)")
    replaced = await make_broker(page=str(own))
    async with replaced.http.get(f"{replaced.url}/") as resp:
        assert resp.status == 200 and await resp.text() == "<p>our own page</p>"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    async with replaced.http.get(f"{replaced.url}/page/app.js") as resp:
        assert resp.status == 200 and await resp.text() == "console.log(1)"
    async with replaced.http.get(f"{replaced.url}/page/limits.json") as resp:
        assert (await resp.json())["max_sessions_per_visitor"] == 0


async def test_a_sessions_jupyter_ui_is_a_page_saying_it_is_not_offered(
        make_broker: MakeBroker) -> None:
    """MyST's "Launch Jupyter Server Window" opens base_url + lab (was: a JSON 404)."""
    broker = await make_broker()
    browser_accept = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for path in ("", "lab", "lab/tree/notebook.ipynb", "tree", "tree/sub/dir"):
        async with broker.http.get(f"{broker.url}/s/0123456789abcdef/{path}?token=x",
                                   headers=browser_accept) as resp:
            assert resp.status == 404
            assert resp.content_type == "text/html"
            page = await resp.text()
            assert "<h1>Jupyter UI not offered here</h1>" in page
            assert "does not offer the Jupyter user interface" in page
    async with broker.http.get(f"{broker.url}/s/0123456789abcdef/lab") as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "not_proxied", "reason": "not_proxied",
                                     "message": NOT_OFFERED}
