"""The per-session upstream access layer against real servers.

A session's own Jupyter server (local backend) for what it must reach, and
a hand-written HTTP server standing in for "the rest of the upstream's
origin" for what it must never reach: that server records every request,
so a refused path is shown not to have left the broker at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from broker import appkeys
from broker.errors import BadRequest
from broker.models import Session
from broker.proxy.relay import UpstreamLeg
from broker.upstream.session import UpstreamAccess
from broker.upstream.websocket import HandshakeRefused
from tests.conftest import BrokerHarness

#: Remainders that would reach outside a session's server if joined naively.
OUTSIDE = [
    "..",
    "../other/api/status",
    "api/../../other/api/status",
    "api/./status",
    "%2e%2e/other/api/status",
    "%2E%2e/other",
    "api%2F..%2F..%2Fother",
    "api%2f..%2f..%2fother",
    "api%5C..%5Cother",
    "api\\..\\other",
    "/other/api/status",
    "//evil.example/api/status",
    "http://evil.example/api/status",
    "api/status?token=x",
    "api/status#x",
    "api//status",
    "api/status\r\nX-Injected: 1",
    "api/ status",
]


class Recorder:
    """A plain HTTP server that answers 200 ``[]`` and records every request head."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n[]")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/user/a/"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def access() -> AsyncIterator[UpstreamAccess]:
    upstreams = UpstreamAccess(connect_timeout=5.0, read_timeout=10.0)
    yield upstreams
    await upstreams.close()


async def _session(broker: BrokerHarness) -> Session:
    data = await broker.ready_session()
    session = await broker.store.get(data["id"])
    assert session is not None and session.upstream_url
    return session


@pytest.mark.parametrize("remainder", OUTSIDE)
async def test_nothing_outside_the_session_server_is_reached(
        access: UpstreamAccess, remainder: str) -> None:
    recorder = Recorder()
    async with recorder as base:
        upstream = access.for_session(Session(id="s", token_hash="", owner="o", backend="local",
                                              created_at=0, expires_at=0, last_activity=0,
                                              upstream_url=base, upstream_token="secret"))
        # The recorder answers what is inside: the layer reaches it, with the token.
        status, data = await upstream.json("GET", "api/kernels")
        assert (status, data) == (200, [])
        assert recorder.heads[-1].startswith(b"GET /user/a/api/kernels HTTP/1.1\r\n")
        assert b"\r\nAuthorization: token secret\r\n" in recorder.heads[-1]
        seen = len(recorder.heads)
        with pytest.raises(BadRequest) as refused:
            await upstream.json("GET", remainder)
        assert refused.value.reason == "bad_path"
        with pytest.raises(BadRequest):
            await upstream.request("POST", remainder, body=b"{}")
        with pytest.raises(BadRequest):
            await upstream.websocket(remainder, leg=UpstreamLeg)
        assert len(recorder.heads) == seen  # none of them left the broker


async def test_a_session_upstream_reaches_its_server_with_its_token(
        broker: BrokerHarness) -> None:
    session = await _session(broker)
    upstream = broker.app[appkeys.UPSTREAM].for_session(session)
    status, started = await upstream.json("POST", "api/kernels", {"name": "python3"})
    assert status == 201, started
    status, kernels = await upstream.json("GET", "api/kernels")
    assert status == 200
    assert [k["id"] for k in kernels] == [started["id"]]
    # The token is what lets it in: the same server with another token is refused.
    stranger = broker.app[appkeys.UPSTREAM].for_session(
        dataclasses.replace(session, upstream_token="not-the-token"))
    status, _ = await stranger.json("GET", "api/kernels")
    assert status == 403


async def test_the_kernel_websocket_opens_through_the_same_layer(
        broker: BrokerHarness) -> None:
    session = await _session(broker)
    upstream = broker.app[appkeys.UPSTREAM].for_session(session)
    status, kernel = await upstream.json("POST", "api/kernels", {"name": "python3"})
    assert status == 201
    opened = await upstream.websocket(
        f"api/kernels/{kernel['id']}/channels", leg=UpstreamLeg,
        protocols=["v1.kernel.websocket.jupyter.org"], query="session_id=abc", limit=10)
    try:
        assert opened.protocol == "v1.kernel.websocket.jupyter.org"
        assert opened.leg.transport is opened.transport
    finally:
        opened.transport.close()
    with pytest.raises(HandshakeRefused) as refused:
        await upstream.websocket("api/kernels/no-such-kernel/channels", leg=UpstreamLeg,
                                 limit=10)
    assert refused.value.status == 404
    stranger = broker.app[appkeys.UPSTREAM].for_session(
        dataclasses.replace(session, upstream_token="not-the-token"))
    with pytest.raises(HandshakeRefused) as refused:
        await stranger.websocket(f"api/kernels/{kernel['id']}/channels", leg=UpstreamLeg,
                                 limit=10)
    assert refused.value.status == 403
