"""The REST proxy's upstream client against real servers on loopback.

The servers here are plain asyncio socket servers that write HTTP by hand,
so each test controls exactly what the upstream does on the wire (keep-alive,
chunking, closing an idle connection, never answering).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from yarl import URL

from broker.upstream.http import HIGH_WATER, UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A hand-written HTTP server; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    def url(self, path: str = "/api/kernels") -> URL:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}{path}", encoded=True)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Upstream:
        upstream = Upstream(handler)
        upstream.server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
        servers.append(upstream.server)
        return upstream

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(connect_timeout=2.0)
    yield pool
    await pool.close()


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_reuses_one_connection(serve, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await upstream.read_request(reader)
            writer.write(answer(b"[]"))

    upstream = await serve(handler)
    for _ in range(3):
        async with await pool.request("GET", upstream.url(), [("Accept", "*/*")]) as resp:
            assert resp.status == 200
            assert await resp.read() == b"[]"
            assert resp.content_type == "application/json"
    assert upstream.connections == 1
    assert len(upstream.requests) == 3
    first = upstream.requests[0].decode()
    assert first.startswith("GET /api/kernels HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{upstream.url().port}\r\n" in first
    assert "Accept: */*\r\n" in first
    assert pool.idle_count() == 1


async def test_query_and_body_are_sent_as_given(serve, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(answer(b"{}", status="201 Created"))

    upstream = await serve(handler)
    async with await pool.request("POST", upstream.url(), [], b'{"name": "python3"}',
                                  query="a=%20b&c") as resp:
        assert resp.status == 201
        await resp.read()
    sent = upstream.requests[0]
    assert sent.startswith(b"POST /api/kernels?a=%20b&c HTTP/1.1\r\n")
    assert b"Content-Length: 19\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"name": "python3"}')


async def test_chunked_body_streams(serve, pool: UpstreamPool) -> None:
    parts = [b"x" * 1000, b"y" * 5000, b"z"]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in parts:
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await upstream.read_request(reader)  # kept alive for a second request
        writer.write(answer(b"again"))

    upstream = await serve(handler)
    async with await pool.request("GET", upstream.url(), []) as resp:
        assert resp.content_length is None
        got = [chunk async for chunk in resp.iter_chunks()]
    assert b"".join(got) == b"".join(parts)
    async with await pool.request("GET", upstream.url(), []) as resp:
        assert await resp.read() == b"again"
    assert upstream.connections == 1


async def answering(serve: Callable[[Handler], Awaitable[Upstream]], raw: bytes) -> Upstream:
    """An upstream that reads one request and writes ``raw`` back."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(raw)
        await writer.drain()

    upstream = await serve(handler)
    return upstream


async def test_close_delimited_body_ends_at_close(serve, pool: UpstreamPool) -> None:
    upstream = await answering(serve, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    async with await pool.request("GET", upstream.url(), []) as resp:
        assert await resp.read() == b"all of it"
    assert pool.idle_count() == 0


async def test_stale_connection_is_retried_for_get_only(serve, pool: UpstreamPool) -> None:
    """The upstream drops a kept-alive connection when the next request arrives on it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(answer(b"first"))
        await writer.drain()
        await upstream.read_request(reader)  # a second request on this connection: drop it

    upstream = await serve(handler)
    async with await pool.request("GET", upstream.url(), []) as resp:
        await resp.read()
    async with await pool.request("GET", upstream.url(), []) as resp:
        assert await resp.read() == b"first"  # answered on a fresh connection
    assert upstream.connections == 2
    assert len(upstream.requests) == 3  # first, the dropped retry, the answered one

    # A POST on a connection the upstream drops is not sent a second time.
    before = len(upstream.requests)
    with pytest.raises(UpstreamError):
        await pool.request("POST", upstream.url(), [], b"{}")
    assert len(upstream.requests) == before + 1


async def test_read_timeout(serve, pool: UpstreamPool) -> None:
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        await done.wait()  # never answers

    upstream = await serve(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await pool.request("GET", upstream.url(), [], read_timeout=0.3)
    assert 0.25 <= loop.time() - started < 5
    done.set()


async def test_slow_reader_pauses_the_upstream(serve, pool: UpstreamPool) -> None:
    """A streamed body is not buffered without bound while its reader is slow."""
    total = 64 * 1024 * 1024  # far more than socket buffers hold
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        for _ in range(total // 65536):
            writer.write(b"b" * 65536)
            await writer.drain()
        sent.set()

    upstream = await serve(handler)
    async with await pool.request("GET", upstream.url(), []) as resp:
        received = 0
        largest = 0
        async for chunk in resp.iter_chunks():
            received += len(chunk)
            largest = max(largest, resp._size)
            if received < total // 2:
                assert not sent.is_set()  # the upstream is held back while we dawdle
                await asyncio.sleep(0)
    assert received == total
    assert largest <= HIGH_WATER + 256 * 1024


async def test_head_answer_has_no_body(serve, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n")
        await reader.read()  # would hang a client that waits for 500 bytes

    upstream = await serve(handler)
    async with await pool.request("HEAD", upstream.url(), []) as resp:
        assert resp.status == 200
        assert resp.content_length == 500
        assert await resp.read() == b""


async def test_interim_answers_are_skipped(serve, pool: UpstreamPool) -> None:
    upstream = await answering(serve, b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"real"))
    async with await pool.request("GET", upstream.url(), [], read_timeout=10) as resp:
        assert resp.status == 200
        assert await resp.read() == b"real"


async def test_garbage_and_unreachable_are_upstream_errors(serve, pool: UpstreamPool) -> None:
    upstream = await answering(serve, b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(UpstreamError):
        await pool.request("GET", upstream.url(), [])
    url = upstream.url()
    assert upstream.server is not None
    upstream.server.close()
    await upstream.server.wait_closed()
    with pytest.raises(UpstreamError):
        await pool.request("GET", url, [])


async def test_header_line_breaks_are_refused(serve, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)

    upstream = await serve(handler)
    for value in ("a\r\nX-Injected: 1", "a\rb", "a\nb"):
        with pytest.raises(UpstreamError):
            await pool.request("GET", upstream.url(), [("Accept", value)])
    assert upstream.requests == []


async def test_idle_connections_expire(serve) -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        assert await reader.read() == b""  # the client closed its idle connection
        closed.set()

    upstream = await serve(handler)
    pool = UpstreamPool(idle_expiry=0.2)
    try:
        async with await pool.request("GET", upstream.url(), []) as resp:
            await resp.read()
        assert pool.idle_count() == 1
        await asyncio.wait_for(closed.wait(), 5)  # the sweep closed it
        assert pool.idle_count() == 0
    finally:
        await pool.close()
