"""The event-stream writer and reader (broker.sse): bytes, parsing, and a real server.

The bytes are compared exactly where a client depends on them (thebe's
EventSource on /build, BinderHub's own form); the writer's behaviour
(headers, keepalives while waiting, a client that left) runs on a real
aiohttp server on 127.0.0.1 with a real client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from broker import sse
from broker.sse import Event, EventStream


async def lines(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as an aiohttp response's content yields it: line by line, newline kept."""
    for line in data.splitlines(keepends=True):
        yield line


async def read(data: bytes) -> list[Event]:
    return [event async for event in sse.events(lines(data))]


# -- writing: the bytes ---------------------------------------------------------------
def test_binderhub_form_is_unchanged() -> None:
    # What /build has always sent (and BinderHub sends): unnamed JSON events, comments.
    assert sse.encode_json({"phase": "ready", "message": "server running\n"}) == (
        b'data: {"phase": "ready", "message": "server running\\n"}\n\n')
    assert sse.comment() == b":keepalive\n\n"


def test_named_event_puts_its_name_first() -> None:
    # The execute API's form: the event's type as its name, then the data.
    assert sse.encode_json({"type": "stream", "text": "1"}, event="stream") == (
        b'event: stream\ndata: {"type": "stream", "text": "1"}\n\n')


def test_fields_and_multi_line_data() -> None:
    assert sse.encode("one\ntwo\r\nthree\rfour", event="log", id="7", retry=2.5) == (
        b"event: log\nid: 7\nretry: 2500\n"
        b"data: one\ndata: two\ndata: three\ndata: four\n\n")
    assert sse.encode("") == b"data: \n\n"
    assert sse.comment("a\nb") == b":a\n:b\n\n"


@pytest.mark.parametrize("kwargs", [{"event": "a\nb"}, {"id": "a\rb"}, {"id": "a\0b"}])
def test_a_field_that_would_break_the_stream_is_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        sse.encode("x", **kwargs)


# -- reading --------------------------------------------------------------------------
async def test_reader_follows_the_format() -> None:
    stream = (b": a comment\r\n"
              b"\n"  # JupyterHub's keepalive: a bare blank line
              b"event: progress\nid: 3\ndata: first\ndata:second\n\n"
              b"retry: 100\nunknown: field\ndata: {\"a\": 1}\n\n"
              b"event: nodata\n\n"  # no data: not dispatched, its name forgotten
              b"data: cut")  # a stream cut after its last data line
    assert await read(stream) == [Event("first\nsecond", "progress", "3"),
                                  Event('{"a": 1}', "", "3"), Event("cut", "", "3")]


async def test_reader_skips_an_oversized_line() -> None:
    huge = b"data: " + b"x" * sse.MAX_LINE + b"\n"
    assert await read(b"data: dropped\n" + huge + b"\ndata: kept\n\n") == [Event("kept")]


async def test_json_events_yield_objects_only() -> None:
    stream = (b":keepalive\n\ndata: not json\n\ndata: [1, 2]\n\n"
              b'data: {"phase":\ndata:  "ready"}\n\n')
    assert [e async for e in sse.json_events(lines(stream))] == [{"phase": "ready"}]


@pytest.mark.parametrize("data", ["plain", "two\nlines", "", " leading space",
                                  "trailing newline\n", json.dumps({"m": "a\nb"})])
async def test_what_the_writer_writes_the_reader_reads(data: str) -> None:
    written = sse.encode(data, event="e", id="i") + sse.comment() + sse.encode(data)
    assert await read(written) == [Event(data, "e", "i"), Event(data, "", "i")]


# -- the writer on a real server --------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Serve one handler on 127.0.0.1; yields a function returning its URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_stream_headers_events_and_keepalives(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        stream.response.set_cookie("visitor", "v1")
        await stream.start()
        await stream.send_json({"phase": "waiting"})
        # Keepalives flow until the awaited thing is done (the client releases it).
        value = await stream.until(release.wait(), keepalive=0.01)
        await stream.send(f"released: {value}\nsecond line", event="done", id="1")
        await stream.end()
        return stream.response

    url = await serve(handler)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.cookies["visitor"].value == "v1"
        assert await resp.content.readline() == b'data: {"phase": "waiting"}\n'
        assert await resp.content.readline() == b"\n"
        assert await resp.content.readline() == b":keepalive\n"
        assert await resp.content.readline() == b"\n"
        release.set()
        rest = await resp.content.read()
    last = b"event: done\nid: 1\ndata: released: True\ndata: second line\n\n"
    assert rest.endswith(last)
    assert set(rest[:-len(last)].split(b"\n\n")) <= {b"", b":keepalive"}  # keepalives only


async def test_a_client_that_left_is_noticed_while_waiting(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.start()
        await stream.keepalive()
        try:
            await stream.until(waiting, keepalive=0.01)  # never done: only the client can end it
        except ConnectionResetError as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result(None)
        return stream.response

    url = await serve(handler)
    async with aiohttp.ClientSession() as http:
        resp = await http.get(url)
        assert await resp.content.readline() == b":keepalive\n"
        resp.close()  # the visitor closes the tab
    assert isinstance(await asyncio.wait_for(outcome, 30), ConnectionResetError)
    assert waiting.cancelled()  # what the stream waited for is not left running


async def test_writing_to_a_gone_client_raises_client_gone(
        serve: Callable[[Handler], Awaitable[str]]) -> None:
    closed = asyncio.Event()
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = EventStream(request)
        await stream.start()
        await stream.keepalive()
        await closed.wait()
        assert request.transport is not None
        request.transport.close()  # as when the connection is lost
        try:
            await stream.send_json({"phase": "ready"})
        except sse.ClientGone as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result(None)
        return stream.response

    url = await serve(handler)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert await resp.content.readline() == b":keepalive\n"
        closed.set()
        assert isinstance(await asyncio.wait_for(outcome, 30), sse.ClientGone)


def test_a_short_stream_as_one_response() -> None:
    response = sse.response(sse.encode_json({"phase": "failed"}), headers={"Vary": "Origin"})
    assert response.body == b'data: {"phase": "failed"}\n\n'
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Vary"] == "Origin"
