"""The execute API for AI agents: ``POST /api/v1/sessions/{id}/execute``.

Code-interpreter style: JSON in (``code``, optional ``timeout`` and
``kernel_name``), JSON out (``status``, ``stdout``, ``stderr``, ``result``,
``display``, ``error``, ...), on the session's default kernel, whose state
persists across calls. The kernel work is :mod:`broker.agent.kernel_client`;
this module is the HTTP face: who may call, what the body means, and the two
answer shapes.

With ``Accept: text/event-stream`` the same call streams: one server-sent
event per output as it arrives (``event: stream|display|update_display|
result|error|clear_output``), ``:keepalive`` comments while the code is
silent, and finally ``event: done`` carrying the same summary the JSON call
returns. Refusals found before the stream starts (token, body) are ordinary
JSON errors; anything after (kernel start, lost connection) ends the stream
with ``event: failed`` carrying the error body and the HTTP status the JSON
call would have answered. A client that disconnects mid-stream interrupts
its execution.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from broker import appkeys
from broker.agent.access import agent_session
from broker.agent.kernel_client import AgentKernels
from broker.api.sessions import NAME, json_object
from broker.errors import BadRequest, BrokerError
from broker.settings import Settings
from broker.sse import EventStream

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: Events buffered for a streaming caller before the kernel reader waits.
_STREAM_QUEUE = 256
#: Seconds between keep-alive comments on a silent stream.
KEEPALIVE = 15.0
#: The default-kernel registry (set by :func:`kernels_ctx`); the agent package's own key, as
#: ``appkeys`` sits below this floor and names nothing of it.
KERNELS = web.AppKey("agent_kernels", AgentKernels)


async def kernels_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx step (after the session manager): the default-kernel registry.

    Closed before the manager and backend, so kernel sockets end before servers stop.
    """
    kernels = app[KERNELS] = AgentKernels(
        app[appkeys.UPSTREAM], app[appkeys.SETTINGS], app[appkeys.MANAGER],
        gate=lambda: app.get(appkeys.KERNEL_GATE))
    # The REST proxy tells the registry of kernel restarts through a key of the floor below.
    app[appkeys.KERNEL_RESTARTING] = kernels.restarting
    yield
    await kernels.close()


def parse_execute(raw: bytes, settings: Settings) -> tuple[str, float, str]:
    """Validate an execute body; returns (code, timeout in seconds, kernel name)."""
    data = json_object(raw, {"code", "timeout", "kernel_name"}, empty_ok=False,
                       shape='a JSON object like {"code": "print(1)"}')
    code = data.get("code")
    if not isinstance(code, str):
        raise BadRequest("'code' is required and must be a string")
    timeout = data.get("timeout")
    if timeout is None:
        timeout = settings.execute_timeout_default
    elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise BadRequest("'timeout' must be a positive number of seconds")
    kernel_name = data.get("kernel_name") or ""
    if not isinstance(kernel_name, str) or (kernel_name and not NAME.match(kernel_name)):
        raise BadRequest("'kernel_name' may only contain letters, digits, '.', '_' and '-'")
    return code, min(float(timeout), settings.execute_timeout_max), kernel_name


def _wants_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


@routes.post("/api/v1/sessions/{sid}/execute", name="execute")
async def execute(request: web.Request) -> web.StreamResponse:
    """Run code on the session's default kernel and answer with its outputs."""
    session = await agent_session(request)
    code, timeout, kernel_name = parse_execute(await request.read(), request.app[appkeys.SETTINGS])
    kernel_name = kernel_name or session.kernel_name
    kernels = request.app[KERNELS]
    if not _wants_stream(request):
        result = await kernels.execute(session, code, time_limit=timeout, kernel_name=kernel_name)
        return web.json_response(result.body())

    # Bounded: a slow reader slows the kernel reader down instead of growing memory.
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=_STREAM_QUEUE)

    async def emit(event: dict[str, Any]) -> None:
        await queue.put(event)

    async def run() -> None:
        try:
            result = await kernels.execute(session, code, time_limit=timeout,
                                           kernel_name=kernel_name, emit=emit)
            await queue.put({"type": "done", **result.body()})
        except BrokerError as exc:
            await queue.put({"type": "failed", "status_code": exc.status, **exc.body()})
        except Exception:
            log.exception("streamed execution in session %s failed", session.id)
            error = BrokerError("Internal error")
            await queue.put({"type": "failed", "status_code": error.status, **error.body()})
        finally:
            await queue.put(None)

    stream = EventStream(request)
    await stream.start()
    task = asyncio.create_task(run(), name=f"execute-{session.id}")
    try:
        while (event := await stream.until(queue.get(), KEEPALIVE)) is not None:
            await stream.send_json(event, event=event["type"])
        await stream.end()
    except ConnectionResetError:
        log.info("client of session %s left a streamed execution", session.id)
    finally:
        if not task.done():
            task.cancel()  # the kernel is interrupted, see kernel_client
        await asyncio.gather(task, return_exceptions=True)
    return stream.response
