"""The proxy's guarantees: authentication, isolation, confinement, limits, CORS, secrecy.

One shared pair of sessions serves most tests here (spawning is not what
they are about).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from broker import appkeys
from tests.conftest import BrokerHarness, MakeBroker
from tests.kernelproto import execute, make_message

ORIGIN = "https://book.example.org"


@pytest.fixture
async def pair(make_broker: MakeBroker) -> AsyncIterator[tuple[BrokerHarness, dict[str, Any],
                                                                 dict[str, Any]]]:
    broker = await make_broker(allowed_origins=ORIGIN, ws_max_message_size=64 * 1024)
    a, b = await asyncio.gather(broker.ready_session(), broker.ready_session())
    yield broker, a, b


async def raw_request(url: str, target: str, token: str) -> tuple[int, bytes]:
    """Send a request line exactly as given (clients normalise paths; attackers do not)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: token {token}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def test_tokens_are_required_and_checked(pair: Any) -> None:
    broker, a, _ = pair
    url = f"{a['base_url']}api/kernels"
    async with broker.http.get(url) as resp:
        assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
    async with broker.http.get(url, headers={"Authorization": "token nope"}) as resp:
        assert resp.status == 403 and (await resp.json())["reason"] == "wrong_token"
    async with broker.http.get(url, params={"token": a["token"]}) as resp:
        assert resp.status == 200
    async with broker.http.get(url, headers={"Authorization": f"Bearer {a['token']}"}) as resp:
        assert resp.status == 200
    for method in ("GET", "DELETE"):
        async with broker.http.request(method, f"{broker.url}/api/v1/sessions/{a['id']}",
                                       headers={"Authorization": "token nope"}) as resp:
            assert resp.status == 403
    async with broker.http.get(f"{broker.url}/s/0000000000000000/api/kernels",
                               headers={"Authorization": f"token {a['token']}"}) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "unknown_session"


async def test_a_token_never_opens_another_session(pair: Any) -> None:
    broker, a, b = pair
    kernel_b = await broker.start_kernel(b)
    # A's token on B's URLs: refused, and B's kernel stays invisible.
    async with broker.http.get(f"{b['base_url']}api/kernels",
                               headers={"Authorization": f"token {a['token']}"}) as resp:
        assert resp.status == 403
        assert kernel_b not in await resp.text()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await broker.http.ws_connect(f"{b['ws_url']}api/kernels/{kernel_b}/channels",
                                     params={"token": a["token"]})
    assert refused.value.status == 403
    # B's kernel id under A's session is simply unknown to A's server.
    async with broker.http.get(f"{a['base_url']}api/kernels/{kernel_b}",
                               headers={"Authorization": f"token {a['token']}"}) as resp:
        assert resp.status == 404
    with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
        await broker.http.ws_connect(f"{a['ws_url']}api/kernels/{kernel_b}/channels",
                                     params={"token": a["token"]})
    assert unknown.value.status == 404


@pytest.mark.parametrize(
    "suffix",
    [
        "api/kernels/../../../etc/passwd",
        "api/%2e%2e/%2e%2e/api/status",
        "api/kernels%2F..%2F..%2Fapi%2Fstatus",
        "api//status",
        "api/./status",
        "api\\..\\status",
        "api/contents",
        "api/terminals",
        "files/secret.txt",
        "tree",
        "login",
    ],
)
async def test_paths_cannot_leave_the_proxied_api(pair: Any, suffix: str) -> None:
    broker, a, _ = pair
    status, body = await raw_request(broker.url, f"/s/{a['id']}/{suffix}", a["token"])
    assert status in (400, 404), body
    assert json.loads(body)["reason"] in ("bad_path", "not_proxied", "not_found")


async def test_absolute_form_and_foreign_prefix_are_refused(pair: Any) -> None:
    broker, a, _ = pair
    for target in (f"http://127.0.0.1:1/s/{a['id']}/api/status",
                   f"/s/{a['id']}/../{a['id']}/api/status"):
        status, body = await raw_request(broker.url, target, a["token"])
        assert status in (400, 404), (target, body)


async def test_oversized_messages_close_with_1009(pair: Any) -> None:
    broker, a, _ = pair
    kernel = await broker.start_kernel(a)
    url = f"{a['ws_url']}api/kernels/{kernel}/channels"
    big = json.dumps(make_message("execute_request", {"code": "#" + "x" * 70_000}))
    async with broker.http.ws_connect(url, params={"token": a["token"]},
                                      max_msg_size=0) as ws:
        await ws.send_str(big)
        # The server's own frames sent before the close (its connection nudge's kernel
        # status) may come first; the first frame that is not one is the close.
        while True:
            closing = await ws.receive(timeout=10)
            if closing.type is not WSMsgType.TEXT:
                break
        assert closing.type is WSMsgType.CLOSE and closing.data == 1009
    # A kernel output above the cap closes the client side with 1009 too.
    async with broker.http.ws_connect(url, params={"token": a["token"]},
                                      max_msg_size=0) as ws:
        await ws.send_str(json.dumps(make_message(
            "execute_request", {"code": "print('y' * 100_000)", "silent": False})))
        while True:
            frame = await ws.receive(timeout=20)
            if frame.type is not WSMsgType.TEXT:
                break
        assert frame.type is WSMsgType.CLOSE and frame.data == 1009
    # Under the cap, large messages pass (aiohttp's default cap would be 4 MiB).
    async with broker.http.ws_connect(url, params={"token": a["token"]}) as ws:
        result = await execute(ws, "print('z' * 30_000)")
    assert result.stdout == "z" * 30_000 + "\n"


async def test_cors_on_success_error_and_preflight(pair: Any) -> None:
    broker, a, _ = pair
    origin = {"Origin": ORIGIN}
    async with broker.http.get(f"{broker.url}/s/0000000000000000/api/kernels",
                               headers=origin | {"Authorization": "token x"}) as resp:
        assert resp.status == 404
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with broker.http.options(
        f"{a['base_url']}api/sessions?1700000000",
        headers=origin | {"Access-Control-Request-Method": "POST",
                          "Access-Control-Request-Headers": "authorization,content-type"},
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        allowed = resp.headers["Access-Control-Allow-Headers"]
        assert "authorization" in allowed and "content-type" in allowed
        for method in ("GET", "POST", "DELETE", "PATCH"):
            assert method in resp.headers["Access-Control-Allow-Methods"]
    async with broker.http.get(f"{a['base_url']}api/kernels",
                               headers={"Origin": "https://evil.example",
                                        "Authorization": f"token {a['token']}"}) as resp:
        assert resp.status == 403 and (await resp.json())["reason"] == "origin"
        assert "Access-Control-Allow-Origin" not in resp.headers
    async with broker.http.post(f"{broker.url}/api/v1/sessions",
                                headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await broker.http.ws_connect(f"{a['ws_url']}api/kernels/x/channels",
                                     params={"token": a["token"]},
                                     origin="https://evil.example")
    assert refused.value.status == 403


async def test_thebe_style_session_start(pair: Any) -> None:
    """thebe posts api/sessions as text/plain with kernel name `python`."""
    broker, a, _ = pair
    body = json.dumps({"name": "thebe.ipynb", "path": "/", "type": "notebook",
                       "kernel": {"name": "python"}})
    async with broker.http.post(f"{a['base_url']}api/sessions?1700000001", data=body,
                                headers={"Content-Type": "text/plain;charset=UTF-8",
                                         "Origin": ORIGIN,
                                         "Authorization": f"token {a['token']}"}) as resp:
        assert resp.status == 201, await resp.text()
        created = await resp.json()
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Set-Cookie" not in resp.headers
    assert created["kernel"]["name"] == "python3"
    location = resp.headers.get("Location", "")
    assert location == "" or location.startswith(f"/s/{a['id']}/api/sessions/")


async def test_upstream_token_never_leaves_the_broker(
    make_broker: MakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = await make_broker()
    seen: list[str] = []

    async def record(resp: aiohttp.ClientResponse) -> None:
        seen.append(json.dumps(dict(resp.headers)))
        seen.append(await resp.text())

    status, session = await broker.create()
    assert status == 201
    seen.append(json.dumps(session))
    headers = {"Authorization": f"token {session['token']}"}
    async with broker.http.post(f"{session['base_url']}api/kernels", headers=headers,
                                json={"name": "python3"}) as resp:
        await record(resp)
        kernel = (await resp.json())["id"]
    for path in ("api/kernels", "api/sessions", "api/kernelspecs", "api/status", "api",
                 "api/contents", f"api/kernels/{kernel}", "api/kernels/nope"):
        async with broker.http.get(f"{session['base_url']}{path}", headers=headers) as resp:
            await record(resp)
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}",
                               headers=headers) as resp:
        await record(resp)
    async with broker.http.ws_connect(f"{session['ws_url']}api/kernels/{kernel}/channels",
                                      params={"token": session["token"]}) as ws:
        result = await execute(ws, "import os; print(sorted(k for k in os.environ))")
        seen.append(result.stdout)
        seen.extend(json.dumps(m) for m in result.messages)
    stored = await broker.app[appkeys.STORE].get(session["id"])
    secret = stored.upstream_token
    assert secret and len(secret) > 20
    everything = "\n".join(seen) + "\n".join(r.getMessage() for r in caplog.records)
    assert secret not in everything
    assert session["token"] not in "\n".join(r.getMessage() for r in caplog.records)
    # The kernel's environment carries no broker settings.
    assert "BROKER_" not in result.stdout


async def test_dns_rebinding_cannot_pass_the_origin_check(pair: Any) -> None:
    """A page whose Origin matches the Host it sent is still a foreign page."""
    broker, a, _ = pair
    port = broker.url.rsplit(":", 1)[1]
    forged = {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"}
    async with broker.http.post(f"{broker.url}/api/v1/sessions", headers=forged) as resp:
        assert resp.status == 403 and (await resp.json())["reason"] == "origin"
        assert "Access-Control-Allow-Origin" not in resp.headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await broker.http.ws_connect(f"{a['ws_url']}api/kernels/x/channels",
                                     params={"token": a["token"]}, headers=forged)
    assert refused.value.status == 403


async def test_nothing_the_broker_serves_can_run_as_a_page_of_its_origin(pair: Any) -> None:
    """Proxied files are the session's own content (kernelspec logos can be SVG):
    every answer carries nosniff and a sandboxing CSP, proxied or not."""
    broker, a, _ = pair
    headers = {"Authorization": f"token {a['token']}"}
    checks = [("GET", f"{a['base_url']}api/status"), ("GET", f"{a['base_url']}api/kernelspecs"),
              ("GET", f"{a['base_url']}api/contents"),  # refused: not proxied
              ("GET", f"{broker.url}/api/v1/sessions/{a['id']}"),
              ("GET", f"{broker.url}/api/v1/sessions/{a['id']}/events")]
    for method, url in checks:
        async with broker.http.request(method, url, headers=headers) as resp:
            assert resp.headers["X-Content-Type-Options"] == "nosniff", url
            assert "sandbox" in resp.headers["Content-Security-Policy"], url
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"], url
