"""Reading server-sent event streams from upstreams (JupyterHub progress, BinderHub /build).

Both upstreams send unnamed events whose ``data:`` is one JSON object, with
keepalives in between: JupyterHub writes bare blank lines, BinderHub writes
``:keepalive`` comments. :func:`json_events` yields each event's JSON object
and nothing else; keepalives, comments, ``event:``/``id:`` fields and data
that is not a JSON object are skipped, so a proxy's or hub's chatter can
never end a stream early. Multi-line ``data:`` fields are joined with
newlines, as the SSE specification says.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

log = logging.getLogger(__name__)

#: A longer line than this is not a progress event; it is skipped, not buffered.
MAX_LINE = 1 << 20


async def json_events(lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Yield the JSON object of every complete event in an event stream."""
    data: list[str] = []
    async for raw in lines:
        if len(raw) > MAX_LINE:
            log.warning("skipping an oversized event-stream line (%d bytes)", len(raw))
            data.clear()
            continue
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                event = _parse("\n".join(data))
                data.clear()
                if event is not None:
                    yield event
            continue
        if line.startswith(":"):
            continue  # a comment (BinderHub's :keepalive)
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:  # a stream cut right after its last data line still counts
        event = _parse("\n".join(data))
        if event is not None:
            yield event


def _parse(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        log.debug("skipping a non-JSON event")
        return None
    return value if isinstance(value, dict) else None
