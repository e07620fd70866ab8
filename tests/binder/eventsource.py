"""An EventSource-style client for /build streams, parsing them as thebe does.

thebe opens ``new EventSource(buildUrl)``: a GET with ``Accept:
text/event-stream`` and the page's ``Origin``, no other headers. Its
``onmessage`` only sees unnamed events; it ``JSON.parse``s ``data``,
lower-cases ``phase`` and closes the source on ``ready`` or ``failed``.
Comments (``:keepalive``) are ignored by the browser. This module follows
the event-stream parsing rules (fields per line, a blank line dispatches,
multi-line data joined with newlines) and records what a test may want to
check: every event in order, comments, named events (which thebe would never
see), and whether the server ended the stream by itself after the final
event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

FINAL = ("ready", "failed")


@dataclass
class Launch:
    """Everything a /build stream delivered to an EventSource-style client."""

    status: int
    headers: CIMultiDictProxy[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    named_events: list[str] = field(default_factory=list)
    raw: bytes = b""
    #: The ready or failed event thebe would act on.
    final: dict[str, Any] | None = None
    #: True if the server closed the stream (EOF) within ``eof_wait`` after the final event.
    server_closed_after_final: bool = False
    #: Bytes the server sent after the final event (keepalives, anything else).
    after_final: bytes = b""

    @property
    def phases(self) -> list[str]:
        """Lower-cased phases, as thebe compares them."""
        return [str(e.get("phase", "")).lower() for e in self.events]

    @property
    def ready(self) -> dict[str, Any]:
        assert self.final is not None and self.final["phase"] == "ready", self.final
        return self.final


async def event_source(
    http: aiohttp.ClientSession,
    url: str,
    *,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
    accept: str | None = "text/event-stream",
    eof_wait: float = 5.0,
    on_event: Callable[[dict[str, Any] | str], Awaitable[None]] | None = None,
) -> Launch:
    """Open a /build stream, read it to ``ready``/``failed``, then close it like thebe.

    ``eof_wait`` > 0: after the final event, wait that long for the server to
    end the stream by itself (the broker must); the client closes either way.
    ``on_event`` sees every event dict and every comment as it arrives.
    """
    sent = dict(headers or {})
    if accept is not None:
        sent["Accept"] = accept
    if origin is not None:
        sent["Origin"] = origin
    async with http.get(url, headers=sent) as resp:
        launch = Launch(status=resp.status, headers=resp.headers)
        data: list[str] = []
        event_name = ""
        while True:
            raw = await resp.content.readline()
            if not raw:
                break
            launch.raw += raw
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                launch.comments.append(line[1:])
                if on_event is not None:
                    await on_event(line)
                continue
            if line:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event_name = value
                continue
            if not data:
                continue
            if event_name:  # EventSource.onmessage never fires for named events
                launch.named_events.append(event_name)
            else:
                event = json.loads("\n".join(data))
                launch.events.append(event)
                if on_event is not None:
                    await on_event(event)
                if str(event.get("phase", "")).lower() in FINAL:
                    launch.final = event
                    break
            data, event_name = [], ""
        if launch.final is not None and eof_wait > 0:
            try:
                rest = await asyncio.wait_for(resp.content.read(), eof_wait)
            except TimeoutError:
                rest = None
            launch.server_closed_after_final = rest is not None
            launch.after_final = rest or b""
        resp.close()  # es.close()
    return launch
