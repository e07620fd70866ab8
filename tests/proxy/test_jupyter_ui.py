"""The session's own Jupyter UI through the broker (BROKER_JUPYTER_UI), without a browser.

A real broker, a real ``jupyter server`` with JupyterLab: the cookie login,
the rewritten page config, and the refusals. The Chromium test
(tests/page/test_jupyter_ui_browser.py) runs a notebook through the same path.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest
from yarl import URL

from broker.paths import check_ui_remainder
from broker.proxy.ui import COOKIE, NO_CREDENTIAL, rewrite_page
from broker.settings import Settings
from tests.conftest import BrokerHarness, MakeBroker

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
_CONFIG = re.compile(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                     re.DOTALL)


def page_config(page: str) -> dict[str, Any]:
    match = _CONFIG.search(page)
    assert match, page[:500]
    return dict(json.loads(match.group(1)))


@pytest.fixture
async def ui_broker(make_broker: MakeBroker) -> BrokerHarness:
    return await make_broker(jupyter_ui=True)


async def test_the_launch_link_logs_in_the_page_has_no_upstream_token_and_refusals(
        ui_broker: BrokerHarness) -> None:
    session = await ui_broker.ready_session()
    sid, token = session["id"], session["token"]
    stored = await ui_broker.manager.store.get(sid)
    upstream_token = stored.upstream_token
    base = f"{ui_broker.url}/s/{sid}/"
    # What MyST's "Launch Jupyter Server Window" opens: the base URL with ?token=.
    async with ui_broker.http.get(f"{base}?token={token}", headers=HTML,
                                  allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"/s/{sid}/lab"
        cookie = resp.cookies[COOKIE]
        assert cookie.value == token
        assert cookie["path"] == f"/s/{sid}/"
        assert cookie["httponly"] and cookie["samesite"] == "Lax"
        assert upstream_token not in str(resp.headers)
    # A deeper link keeps its path and other parameters, minus the token.
    async with ui_broker.http.get(f"{base}lab/tree/a.ipynb?reset&token={token}",
                                  headers=HTML, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"/s/{sid}/lab/tree/a.ipynb?reset="

    # The cookie alone opens the page.
    cookies = {COOKIE: token}
    async with ui_broker.http.get(f"{base}lab", headers=HTML, cookies=cookies) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/html"
        assert resp.headers["Content-Security-Policy"].startswith("frame-ancestors 'self'")
        assert "Set-Cookie" not in resp.headers  # the upstream's cookies stay upstream
        page = await resp.text()
    assert upstream_token not in page
    config = page_config(page)
    assert config["token"] == token
    assert config["baseUrl"] == f"/s/{sid}/"
    full = {k: v for k, v in config.items() if k.startswith("full") and v.startswith("/")}
    assert full and all(v.startswith(f"/s/{sid}/") for v in full.values()), full
    assert config["settingsUrl"] == "/lab/api/settings"  # JupyterLab joins it to baseUrl
    assert config["fullStaticUrl"] == f"/s/{sid}/static/lab"
    assert config["treePath"] == "" and config["preferredPath"] == "/"  # paths, not URLs
    scripts = re.findall(r'<script[^>]* src="([^"]+)"', page)
    assert scripts and all(s.startswith(f"/s/{sid}/static/lab/") for s in scripts), scripts
    # The script the page loads comes through, and the UI's APIs answer.
    async with ui_broker.http.get(f"{ui_broker.url}{scripts[0]}", cookies=cookies) as resp:
        assert resp.status == 200
        assert "javascript" in resp.content_type
    auth = {"Authorization": f"token {token}"}
    async with ui_broker.http.get(f"{base}lab/api/settings", headers=auth) as resp:
        assert resp.status == 200 and "settings" in await resp.json()
    async with ui_broker.http.get(f"{base}api/kernelspecs", headers=auth) as resp:
        logos = [spec["resources"]["logo-svg"]
                 for spec in (await resp.json())["kernelspecs"].values()]
    assert logos and all(logo.startswith(f"/s/{sid}/kernelspecs/") for logo in logos), logos
    async with ui_broker.http.post(f"{base}api/contents", headers=auth,
                                   json={"type": "notebook"}) as resp:
        assert resp.status == 201
        created = await resp.json()
    async with ui_broker.http.get(f"{base}api/contents/{created['path']}", headers=auth) as resp:
        assert resp.status == 200 and (await resp.json())["type"] == "notebook"

    # Refusals (the same session: a spawn is the slow part).
    # No token and no cookie: a page that says how to open the UI.
    async with ui_broker.http.get(f"{base}lab", headers=HTML) as resp:
        assert resp.status == 401
        assert resp.content_type == "text/html"
        assert NO_CREDENTIAL in (await resp.text()).replace("&#x27;", "'")
    # A wrong token in the link: refused, no cookie set.
    async with ui_broker.http.get(f"{base}?token=not-{token}", headers=HTML,
                                  allow_redirects=False) as resp:
        assert resp.status == 403
        assert COOKIE not in resp.cookies
    auth = {"Authorization": f"token {token}"}
    # Outside the session's server, however spelled; and the server's own shutdown.
    for path in ("lab/..%2F..%2Fapi/shutdown", "static/%2e%2e/%2e%2e/etc/passwd",
                 "lab/%00"):
        async with ui_broker.http.get(URL(f"{base}{path}", encoded=True),
                                      headers=auth) as resp:
            assert resp.status == 400, path
            assert (await resp.json())["reason"] == "bad_path"
    async with ui_broker.http.post(f"{base}api/shutdown", headers=auth) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "not_proxied"
    async with ui_broker.http.get(f"{base}api/terminals", headers=auth) as resp:
        assert resp.status == 404  # terminals need their own setting
    # A cookie with another token (another session's) opens nothing here.
    async with ui_broker.http.get(f"{base}lab", headers=HTML,
                                  cookies={COOKIE: f"x{token}"}) as resp:
        assert resp.status == 403


def test_rewrite_page_of_a_hub_server() -> None:
    """A JupyterHub user server: its base path and absolute URLs move under /s/{id}/."""
    upstream = "http://hub.internal:8000/user/visitor-1/"
    page = ('<link href="/user/visitor-1/static/x.css"><a href="//cdn.example/x">'
            '<script id="jupyter-config-data" type="application/json">'
            '{"token": "UPSTREAM", "baseUrl": "/user/visitor-1/", '
            '"wsUrl": "ws://hub.internal:8000/user/visitor-1/", '
            '"fullStaticUrl": "/user/visitor-1/static/lab", "notes": "</b>", '
            '"fullMathjaxUrl": "https://cdn.example/mathjax.js", "preferredPath": "/"}</script>'
            '<body data-jupyter-api-token="UPSTREAM">http://hub.internal:8000/user/visitor-1/x')
    out = rewrite_page(page, upstream, "UPSTREAM", "/s/abc/", "BROKER")
    assert "UPSTREAM" not in out and "visitor-1" not in out and "hub.internal" not in out
    assert 'href="/s/abc/static/x.css"' in out and 'href="//cdn.example/x"' in out
    config = page_config(out)
    assert config == {"token": "BROKER", "baseUrl": "/s/abc/", "wsUrl": "",
                      "fullStaticUrl": "/s/abc/static/lab", "notes": "</b>",
                      "fullMathjaxUrl": "https://cdn.example/mathjax.js", "preferredPath": "/"}
    assert "<\\/b>" in out  # the JSON cannot close its script element early
    assert 'data-jupyter-api-token="BROKER"' in out and "/s/abc/x" in out


@pytest.mark.parametrize("raw", ["lab/tree/My%20Notebook.ipynb",
                                 "lab/extensions/@jupyter-widgets/x/static/y.js"])
def test_ui_paths_with_file_names_pass(raw: str) -> None:
    assert check_ui_remainder(raw) == raw


def test_terminals_need_the_ui() -> None:
    with pytest.raises(ValueError, match="BROKER_JUPYTER_UI_TERMINALS needs BROKER_JUPYTER_UI"):
        Settings(jupyter_ui_terminals=True)


async def test_off_the_launch_link_gets_the_not_offered_page(broker: BrokerHarness) -> None:
    async with aiohttp.ClientSession() as http, http.get(
            f"{broker.url}/s/0123456789abcdef/?token=x", headers=HTML) as resp:
        assert resp.status == 404
        assert "Jupyter UI not offered here" in await resp.text()
