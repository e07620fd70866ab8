"""The HTTP edge under bad traffic: every refusal is JSON, nothing holds a connection open.

Over real sockets on loopback, against the real command line where the edge
is wired (``broker.cli`` listens through ``broker.edge``) and against the
in-process app where the behaviour is the app's own (405, 413, bad bodies,
a client leaving).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.brokerproc import broker_process
from tests.conftest import BrokerHarness, MakeBroker

#: Bounds every raw read; the broker must answer (or close) well within it.
READ_BOUND = 15.0


async def exchange(port: int, data: bytes, *, then_close: bool = False,
                   one_response: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read until the broker closes it
    (or, with ``one_response``, until one response with a Content-Length is complete)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if then_close:
            return b""
        async with asyncio.timeout(READ_BOUND):
            if not one_response:
                return await reader.read()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(parse(head)[1]["content-length"])
            return head + await reader.readexactly(length)
    finally:
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of the first response in ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return status, headers, body[:length]


def json_error(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = parse(raw)
    assert headers.get("content-type", "").startswith("application/json"), (status, headers)
    data = json.loads(body)
    assert data["error"] == data["reason"] and data["message"], data
    return status, headers, data


PARSER_CASES = [
    ("control character in the URL", b"GET /he\x01lth HTTP/1.1\r\nHost: x\r\n\r\n", "bad_url"),
    ("request line too long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
     "line_too_long"),
    ("header line too long", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000
     + b"\r\n\r\n", "line_too_long"),
    ("too many headers", b"GET /health HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n", "too_many_headers"),
    ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", None),
]


async def test_parser_refusals_are_json_errors(tmp_path: Path) -> None:
    async with broker_process(tmp_path) as broker:
        for name, request, reason in PARSER_CASES:
            status, headers, body = json_error(await exchange(broker.port, request))
            assert status == 400, name
            if reason is not None:
                assert body["reason"] == reason, (name, body)
            assert headers.get("x-content-type-options") == "nosniff", name
        log = "\n".join(broker.log_lines())
        assert "Traceback" not in log
        assert broker.alive()


async def test_headers_must_arrive_within_the_header_timeout(tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_HEADER_TIMEOUT": "1"}) as broker:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)

        async def dribble() -> None:
            # A slowloris client: a byte at a time (for far longer than READ_BOUND),
            # never the blank line. Each byte arrives; the connection must still end.
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 400:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

        slowloris = asyncio.create_task(dribble())
        try:
            async with asyncio.timeout(READ_BOUND):
                raw = await reader.read()
        finally:
            slowloris.cancel()
            await asyncio.gather(slowloris, return_exceptions=True)
            writer.close()
        status, _, body = json_error(raw)
        assert (status, body["reason"]) == (408, "header_timeout")
        # The broker itself is fine.
        status, _, _ = parse(await exchange(
            broker.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert status == 200


async def test_a_stalled_body_is_dropped_and_not_logged_as_a_500(tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_BODY_TIMEOUT": "1"}) as broker:
        raw = await exchange(broker.port, b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"spec\": ")
        assert raw == b""  # closed without an answer: the client is not listening anyway
        deadline = asyncio.get_running_loop().time() + READ_BOUND
        access: list[dict[str, Any]] = []
        while not access and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)  # the access line is written on the broker's next turn
            access = [json.loads(line) for line in broker.log_lines()
                      if '"event": "request"' in line]
        assert [entry["status"] for entry in access] == [499]
        assert not [line for line in broker.log_lines() if '"level": "error"' in line]


async def test_connections_beyond_the_cap_are_refused_with_503(tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_MAX_CONNECTIONS": "4",
                                         "BROKER_HEADER_TIMEOUT": "60"}) as broker:
        idle = [await asyncio.open_connection("127.0.0.1", broker.port) for _ in range(4)]
        try:
            status, headers, body = json_error(await exchange(
                broker.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
            assert (status, body["reason"]) == (503, "too_many_connections")
            assert headers["retry-after"] == "1"
            # One idle connection does its request: it is served, the cap is on connections.
            reader, writer = idle[0]
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(READ_BOUND):
                assert parse(await reader.read())[0] == 200
            # Once it is closed, a new client is served again (the broker notices the close
            # on its own; poll with a bound).
            deadline = asyncio.get_running_loop().time() + READ_BOUND
            while True:
                status = parse(await exchange(
                    broker.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"\r\n"))[0]
                if status == 200 or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
            raw = await exchange(broker.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\n\r\n")
            assert b'broker_limit_refusals_total{reason="too_many_connections"}' in raw
            assert b'broker_limit_refusals_total{reason="too_many_connections"} 0.0' not in raw
        finally:
            for _, writer in idle:
                writer.close()


async def test_method_not_allowed_names_the_allowed_methods(broker: BrokerHarness) -> None:
    async with broker.http.put(f"{broker.url}/health") as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
        assert (await resp.json())["reason"] == "method_not_allowed"


async def test_a_declared_body_beyond_the_limit_is_refused_at_once(broker: BrokerHarness) -> None:
    port = int(broker.url.rsplit(":", 1)[1])
    for path in ("/api/v1/sessions", "/s/0123456789abcdef/api/contents/x"):
        # Ten bytes of a declared 10 GB: the answer may not wait for the rest.
        status, _, body = json_error(await exchange(
            port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
            "\r\n0123456789".encode(), one_response=True))
        assert (status, body["reason"]) == (413, "too_large"), path


async def test_a_client_leaving_mid_request_is_logged_quietly(
    broker: BrokerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = int(broker.url.rsplit(":", 1)[1])
    await exchange(port, b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                   b"\r\n\r\n{\"spec\":", then_close=True)
    deadline = asyncio.get_running_loop().time() + READ_BOUND
    while asyncio.get_running_loop().time() < deadline:
        statuses = [getattr(r, "status", None) for r in caplog.records
                    if r.name == "aiohttp.access"]
        if statuses:
            break
        await asyncio.sleep(0.05)  # the access record comes when aiohttp gives up the request
    assert statuses == [499]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


NESTED = b"[" * 100_000 + b"]" * 100_000
BAD_BODIES = [
    ("deeply nested array", NESTED),
    ("deeply nested object", b'{"spec": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001),
    ("lone surrogate in spec", b'{"spec": "gh/a/b/\\ud800"}'),
    ("lone surrogate in profile", b'{"profile": "\\udfff"}'),
    ("lone surrogate in a key", b'{"\\ud800": 1}'),
    ("invalid UTF-8", b'{"spec": "\xff\xfe"}'),
    ("huge integer", b'{"spec": ' + b"9" * 5000 + b"}"),
]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_bad_session_bodies_are_400_on_every_store(
    make_broker: MakeBroker, redis_url: str, store: str
) -> None:
    settings: dict[str, Any] = (
        {"redis_url": redis_url, "secret_key": "edge-test", "redis_prefix": f"edge{id(store)}:"}
        if store == "redis" else {})
    broker = await make_broker(**settings)
    for name, body in BAD_BODIES:
        async with broker.http.post(f"{broker.url}/api/v1/sessions", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400, (name, resp.status, await resp.text())
            assert (await resp.json())["reason"] == "bad_request", name
    assert await broker.store.list_live() == []  # nothing was stored or spawned


async def test_bad_execute_bodies_are_400(broker: BrokerHarness) -> None:
    session = await broker.ready_session()
    url = f"{broker.url}/api/v1/sessions/{session['id']}/execute"
    auth = {"Authorization": f"token {session['token']}", "Content-Type": "application/json"}
    for name, body in [*BAD_BODIES,
                       ("nested code", b'{"code": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                       ("lone surrogate in code", b'{"code": "print(\'\\ud83d\')"}')]:
        async with broker.http.post(url, data=body, headers=auth) as resp:
            assert resp.status == 400, (name, resp.status, await resp.text())


async def test_undecodable_header_tokens_are_refused_not_500(make_broker: MakeBroker) -> None:
    broker = await make_broker(admin_token="admin-secret")
    status, session = await broker.create(wait=False)
    assert status == 201, session
    port = int(broker.url.rsplit(":", 1)[1])
    for path in (f"/api/v1/sessions/{session['id']}".encode(), b"/api/v1/admin/sessions"):
        for token in (b"\xff\xfe", b"\xed\xa0\x80", b"caf\xc3\xa9"):
            raw = await exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                 b"Authorization: token " + token + b"\r\n"
                                 b"Connection: close\r\n\r\n")
            assert parse(raw)[0] == 403, (path, token, raw[:200])


async def test_relayed_kernel_websockets_give_their_slot_back(tmp_path: Path) -> None:
    """The relay takes a kernel WebSocket over at its upgrade (its own descriptor): the
    HTTP connection's slot is free again, so WebSockets never eat the cap for requests
    (they have their own per-session bound, see docs/limits.md)."""
    import aiohttp

    async with broker_process(tmp_path, {"BROKER_MAX_CONNECTIONS": "3"}) as broker:
        connector = aiohttp.TCPConnector(force_close=True)  # no idle keep-alive slots
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"{broker.url}/api/v1/sessions?wait=true") as resp:
                session = await resp.json()
                assert resp.status == 201, session
            auth = {"Authorization": f"token {session['token']}"}
            async with http.post(f"{session['base_url']}api/kernels", headers=auth,
                                 json={"name": "python3"}) as resp:
                kernel = (await resp.json())["id"]
            channels = f"{session['ws_url']}api/kernels/{kernel}/channels"

            async def connect() -> aiohttp.ClientWebSocketResponse:
                deadline = asyncio.get_running_loop().time() + READ_BOUND
                while True:  # an upgrade's slot comes back when aiohttp lets go of it
                    try:
                        return await http.ws_connect(channels, headers=auth)
                    except aiohttp.WSServerHandshakeError as exc:
                        assert exc.status == 503, exc
                        assert asyncio.get_running_loop().time() < deadline, "slot not freed"
                        await asyncio.sleep(0.2)

            sockets = [await connect() for _ in range(4)]  # more than the cap, all open
            try:
                deadline = asyncio.get_running_loop().time() + READ_BOUND
                while True:
                    async with http.get(f"{broker.url}/health") as resp:
                        if resp.status == 200:
                            break
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)
            finally:
                for ws in sockets:
                    await ws.close()


def test_the_connection_cap_stays_below_the_file_limit() -> None:
    import resource

    from broker.edge import FD_RESERVE, effective_max_connections

    assert effective_max_connections(0, 256) == (256 - FD_RESERVE) // 2
    assert effective_max_connections(10_000, 256) == (256 - FD_RESERVE) // 2  # lowered
    assert effective_max_connections(20, 256) == 20  # a smaller setting holds
    assert effective_max_connections(0, resource.RLIM_INFINITY) > 100_000
    assert effective_max_connections(0, 64) == 1  # never 0: something must be served
