"""Server-sent events: the one writer and the one reader of ``text/event-stream``.

The broker serves three event streams (a session's spawn progress, the
execute API's outputs, and the BinderHub-compatible ``/build``) and reads
two (JupyterHub's spawn progress, BinderHub's ``/build``). The format is the
WHATWG HTML "server-sent events" one (docs/protocols.md#server-sent-events):
lines of ``field: value``, an event ends at a blank line, a line starting
with ``:`` is a comment. What each stream carries is written down in
docs/protocols.md#binderhub-launch-api and docs/protocols.md#jupyterhub-rest-api;
this module only knows the format.

Writing (:class:`EventStream`, :func:`encode`, :func:`comment`):

* headers: ``Content-Type: text/event-stream``, ``Cache-Control: no-cache``
  and ``X-Accel-Buffering: no`` (nginx ingress would otherwise buffer the
  stream, and thebe would see its launch progress all at once, late);
* fields in a fixed order, ``event``, ``id``, ``retry`` (milliseconds), then
  one ``data:`` line per line of the data, so a multi-line value arrives
  whole (a reader joins the lines with ``\\n``);
* keepalives are ``:keepalive`` comments, byte for byte what BinderHub
  sends: thebe's ``EventSource`` ignores comments, proxies see traffic;
* a client that has gone is noticed before a write, and while waiting
  between events (:meth:`EventStream.until`), as :class:`ClientGone`, a
  ``ConnectionResetError``, which the error middleware records as 499.

Reading (:func:`events`, :func:`json_events`): JupyterHub writes bare blank
lines as keepalives, BinderHub ``:keepalive`` comments; both send unnamed
events whose ``data`` is one JSON object. :func:`json_events` yields those
objects and nothing else, so a proxy's or hub's chatter can never end a
stream early.

A leaf module: it imports nothing of the application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Headers of every event stream the broker serves.
HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx ingress: do not buffer the stream
}
#: A longer line than this is not an event the broker reads; it is skipped, not buffered.
MAX_LINE = 1 << 20

_NEWLINES = re.compile(r"\r\n|\r|\n")


# -- writing ----------------------------------------------------------------------------
def encode(data: str, *, event: str | None = None, id: str | None = None,
           retry: float | None = None) -> bytes:
    """One event: ``event``/``id``/``retry`` fields when given, then ``data`` line by line.

    ``retry`` is in seconds (sent as the format's milliseconds). A name or
    id cannot hold a line break (it would end the field early), nor an id a
    NUL (readers ignore such ids): both are refused.
    """
    lines = []
    if event is not None:
        lines.append(f"event: {_single_line(event, 'event')}")
    if id is not None:
        if "\0" in id:
            raise ValueError("an event id cannot contain NUL")
        lines.append(f"id: {_single_line(id, 'id')}")
    if retry is not None:
        lines.append(f"retry: {max(0, round(retry * 1000))}")
    lines.extend(f"data: {line}" for line in _NEWLINES.split(data))
    return ("\n".join(lines) + "\n\n").encode()


def encode_json(value: Any, *, event: str | None = None) -> bytes:
    """One event whose ``data`` is ``value`` as JSON (on one line: JSON escapes newlines)."""
    return encode(json.dumps(value), event=event)


def comment(text: str = "keepalive") -> bytes:
    """A comment line (``:keepalive`` by default): readers skip it, proxies see traffic."""
    return "".join(f":{line}\n" for line in _NEWLINES.split(text)).encode() + b"\n"


def _single_line(value: str, name: str) -> str:
    if _NEWLINES.search(value):
        raise ValueError(f"an event {name} cannot contain a line break")
    return value


def response(*events: bytes, headers: Mapping[str, str] | None = None) -> web.Response:
    """A whole, short stream as one response (a refusal told as an event, say)."""
    return web.Response(body=b"".join(events), headers={**HEADERS, **(headers or {})})


class ClientGone(ConnectionResetError):
    """The client of an event stream (or of any long answer) closed its connection."""


def client_gone(request: web.Request) -> bool:
    """True once the client's connection is closed or closing.

    aiohttp does not cancel a handler whose client disconnects (on purpose:
    a stop must not be cut short), so a handler that waits looks for itself.
    """
    transport = request.transport
    return transport is None or transport.is_closing()


async def ticking(waiting: Awaitable[T], interval: float,
                  tick: Callable[[], Awaitable[None]]) -> T:
    """``await waiting``, calling ``tick()`` every ``interval`` s until it is done.

    An exception from ``tick`` (a keepalive that found the client gone)
    ends the wait; ``waiting`` is then cancelled, as it was the caller's.
    """
    task = asyncio.ensure_future(waiting)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            await tick()
    finally:
        if not task.done():
            task.cancel()


class EventStream:
    """One event-stream response to ``request``.

    Set cookies or headers on :attr:`response` before :meth:`start`. Every
    write first looks whether the client is still there, and raises
    :class:`ClientGone` if not (aiohttp itself would only notice on a later
    write, or not at all while the handler waits).
    """

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers=HEADERS)

    async def start(self) -> None:
        """Send the status and headers: from now on the client only reads events."""
        await self.response.prepare(self.request)

    @property
    def gone(self) -> bool:
        """True once the client's connection is closed or closing."""
        return client_gone(self.request)

    async def send(self, data: str, *, event: str | None = None, id: str | None = None,
                   retry: float | None = None) -> None:
        """Send one event (see :func:`encode`)."""
        await self.write(encode(data, event=event, id=id, retry=retry))

    async def send_json(self, value: Any, *, event: str | None = None) -> None:
        """Send one event whose data is ``value`` as JSON."""
        await self.write(encode_json(value, event=event))

    async def keepalive(self) -> None:
        """Send a ``:keepalive`` comment."""
        await self.write(comment())

    async def write(self, chunk: bytes) -> None:
        """Send bytes already in the format; raise :class:`ClientGone` if nobody reads."""
        if self.gone:
            raise ClientGone("the event-stream client has gone")
        await self.response.write(chunk)

    async def until(self, waiting: Awaitable[T], keepalive: float) -> T:
        """``await waiting``, with a keepalive every ``keepalive`` s until it is done.

        A client that leaves meanwhile raises :class:`ClientGone` at the next
        keepalive; ``waiting`` is then cancelled (it was this stream's).
        """
        return await ticking(waiting, keepalive, self.keepalive)

    async def end(self) -> None:
        """Finish the stream (the client's EventSource sees the connection close)."""
        await self.response.write_eof()


# -- reading ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One event as a reader sees it: its name ('' when unnamed), data, and id."""

    data: str
    event: str = ""
    id: str = ""


async def events(lines: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Every complete event of a stream of lines (an aiohttp response's ``content``).

    Comments and unknown fields are skipped; an event without ``data`` is
    not dispatched, as in a browser. A line over :data:`MAX_LINE` is
    dropped with the event it belongs to. A stream cut right after its last
    data line still yields that event (BinderHub's last event sometimes
    arrives that way through proxies).
    """
    data: list[str] = []
    name = last_id = ""
    async for raw in lines:
        if len(raw) > MAX_LINE:
            log.warning("skipping an oversized event-stream line (%d bytes)", len(raw))
            data.clear()
            continue
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield Event("\n".join(data), name, last_id)
            data.clear()
            name = ""
            continue
        if line.startswith(":"):
            continue  # a comment (BinderHub's :keepalive)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id" and "\0" not in value:
            last_id = value
    if data:
        yield Event("\n".join(data), name, last_id)


async def json_events(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON object of every event; events whose data is anything else are skipped."""
    async for event in events(lines):
        try:
            value = json.loads(event.data)
        except ValueError:
            log.debug("skipping a non-JSON event")
            continue
        if isinstance(value, dict):
            yield value
