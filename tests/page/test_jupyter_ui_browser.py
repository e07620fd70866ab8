"""A session's own JupyterLab through the broker, in real headless Chromium.

MyST's "Launch Jupyter Server Window" opens the session's base URL with
``?token=``: from there the visitor creates a notebook in JupyterLab, runs a
cell and sees its output. Every response body and WebSocket frame the browser
received is kept, and the upstream token is in none of them.
"""

from __future__ import annotations

import asyncio

from playwright.async_api import Browser, Response, WebSocket

from broker.proxy.ui import COOKIE, NO_CREDENTIAL
from tests.conftest import MakeBroker
from tests.page.test_live_page import WAIT_MS, browser  # noqa: F401 (the fixture)


async def test_jupyterlab_runs_a_cell_and_never_sees_the_upstream_token(
        make_broker: MakeBroker, browser: Browser) -> None:  # noqa: F811
    broker = await make_broker(jupyter_ui=True, jupyter_ui_terminals=True)
    session = await broker.ready_session()
    sid, token = session["id"], session["token"]
    upstream_token = (await broker.manager.store.get(sid)).upstream_token
    base = f"{broker.url}/s/{sid}/"

    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    received: list[bytes] = []
    reads: list[asyncio.Task[None]] = []

    async def keep_body(response: Response) -> None:
        received.append(str(response.headers).encode())
        if 300 <= response.status < 400 or response.status == 204:
            return  # no body to read
        received.append(await response.body())

    def watch_socket(ws: WebSocket) -> None:
        ws.on("framereceived", lambda payload: received.append(
            payload if isinstance(payload, bytes) else payload.encode()))

    def on_response(response: Response) -> None:
        reads.append(asyncio.ensure_future(keep_body(response)))

    page.on("response", on_response)
    page.on("websocket", watch_socket)

    # The launch link: logged in by cookie, redirected to JupyterLab without the token.
    await page.goto(f"{base}?token={token}")
    await page.wait_for_selector(".jp-Launcher")
    assert page.url == f"{base}lab"
    cookie = next(c for c in await context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["path"] == f"/s/{sid}/"

    # A new notebook from the launcher, one cell run, its output shown.
    await page.click('.jp-LauncherCard[data-category="Notebook"]')
    # Typed once the kernel is connected and idle (a cell run before is not queued).
    await page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()
    editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    await editor.click()
    await page.keyboard.type("print(6 * 7)")
    await page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-OutputArea-output").first
    await output.wait_for()
    assert (await output.inner_text()).strip() == "42"
    # A script in an HTML output (trusted: this browser ran it) is not run in the
    # broker's origin: the UI's CSP allows scripts from the broker's files only.
    await page.keyboard.type("from IPython.display import HTML; HTML('<b id=\"marker\">m</b>"
                             "<script>document.title = \"ran\"</script>')")
    await page.keyboard.press("Shift+Enter")
    await page.locator("#marker").wait_for()
    assert await page.title() != "ran"
    # The notebook is a file of the session's server.
    listing = await page.evaluate(
        "async ([base, token]) => (await (await fetch(base + 'api/contents', "
        "{headers: {Authorization: 'token ' + token}})).json()).content.map(f => f.name)",
        [f"/s/{sid}/", token])
    assert "Untitled.ipynb" in listing

    page.remove_listener("response", on_response)  # every body read before the page goes
    await asyncio.gather(*reads)
    assert len(received) > 20  # the page, its scripts, settings, contents, kernel frames
    # The page config came with the broker's token in the upstream's place.
    assert any(b"jupyter-config-data" in body and token.encode() in body for body in received)
    leaked = [body[:200] for body in received if upstream_token.encode() in body]
    assert not leaked, leaked
    # A path that would leave the session's server: refused, whoever asks.
    response = await page.goto(f"{base}static/..%2F..%2Fapi/shutdown")
    assert response is not None and response.status == 400
    await context.close()

    # Another browser, the link without a token: refused with a message it can show.
    stranger = await browser.new_context()
    other = await stranger.new_page()
    other.set_default_timeout(WAIT_MS)
    response = await other.goto(f"{base}lab")
    assert response is not None and response.status == 401
    assert await other.inner_text("#reason") == NO_CREDENTIAL
    await stranger.close()

    # Terminals (BROKER_JUPYTER_UI_TERMINALS): one started and used through the broker.
    auth = {"Authorization": f"token {token}"}
    async with broker.http.post(f"{base}api/terminals", headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        name = (await resp.json())["name"]
    async with broker.http.ws_connect(f"{base}terminals/websocket/{name}",
                                      headers=auth) as ws:
        await ws.send_json(["stdin", "echo $((6 * 7))-$((1 + 1))\r"])
        seen = ""
        async with asyncio.timeout(WAIT_MS / 1000):
            while "42-2" not in seen:
                message = await ws.receive_json()
                if message[0] == "stdout":
                    seen += message[1]
