"""The kernel WebSocket bridge: ``/s/{id}/api/kernels/{kid}/channels``.

All policy happens on the upgrade request (authentication, origin, path);
then the upstream WebSocket is opened *first*, so the client's handshake is
answered with the subprotocol the upstream chose (``v1.kernel.websocket.
jupyter.org`` binary frames, or none for JSON text) and an upstream refusal
(unknown kernel) is still an ordinary JSON HTTP error. No extensions are
negotiated on either leg. Both legs run aiohttp's heartbeat.

Per message, the bridge only forwards: it never decodes kernel output (see
:mod:`broker.proxy.frames` for the peeks it does). For client->kernel frames
it looks for ``execute_request`` to record activity and start an execution
timer; kernel output counts as activity too, and an ``execute_reply`` on the
shell channel stops the timer. Activity is written to the store at most every
few seconds, and message/byte counts are tallied in plain integers and
flushed to the metrics on the same schedule.

Closing: whichever leg ends first ends the other. A client close closes the
upstream with 1000; an upstream close is passed on with its code (1011 when
the upstream vanished without one), an oversized message with 1009.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from broker import keys
from broker.errors import NotFound, UpstreamFailed
from broker.metrics import Direction, WsCounts
from broker.models import Session
from broker.proxy.frames import binary_channel, binary_header_has, text_channel
from broker.proxy.paths import join
from broker.proxy.rest import forward_query

log = logging.getLogger(__name__)

#: Seconds between activity writes (and metric flushes) per connection.
FLUSH_EVERY = 5.0
#: Close codes that may not be sent in a close frame (RFC 6455 7.4.1).
_RESERVED = {1005, 1006, 1015}


def _tune(sock: Any) -> Any:
    """TCP_NODELAY on a leg's socket; returns the socket when TCP_QUICKACK exists."""
    if sock is None:
        return None
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock if hasattr(socket, "TCP_QUICKACK") else None


def _ws_base(http_url: str) -> str:
    return "ws" + http_url[4:] if http_url.startswith("http") else http_url


async def bridge(request: web.Request, session: Session, remainder: str) -> web.StreamResponse:
    """Connect the client's kernel WebSocket to the session's upstream kernel."""
    settings = request.app[keys.SETTINGS]
    manager = request.app[keys.MANAGER]
    metrics = manager.metrics
    handshake_started = asyncio.get_running_loop().time()
    offered = [
        p.strip()
        for header in request.headers.getall("Sec-WebSocket-Protocol", [])
        for p in header.split(",")
        if p.strip()
    ]
    url = join(_ws_base(session.upstream_url), remainder)
    heartbeat = settings.ws_heartbeat or None
    try:
        upstream = await request.app[keys.HTTP].ws_connect(
            url,
            params=forward_query(request),
            headers={"Authorization": f"token {session.upstream_token}"},
            protocols=offered,
            heartbeat=heartbeat,
            max_msg_size=settings.ws_max_message_size,
            compress=0,
            autoping=True,
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 404:
            raise NotFound("No such kernel in this session", reason="unknown_kernel") from exc
        metrics.upstream_error(session.backend, "refused")
        raise UpstreamFailed(f"The kernel refused the connection ({exc.status})",
                             reason="upstream_refused") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        metrics.upstream_error(session.backend, "unreachable")
        raise UpstreamFailed("The session's Jupyter server did not answer",
                             reason="upstream_unreachable") from exc

    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        heartbeat=heartbeat,
        max_msg_size=settings.ws_max_message_size,
        compress=False,
        autoping=True,
    )
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close()
        raise

    async def close_both(code: int, reason: str) -> None:
        await client.close(code=code, message=reason.encode()[:120])
        await upstream.close()

    unregister = manager.register_closer(session.id, close_both)
    loop = asyncio.get_running_loop()
    metrics.http_duration.labels("jupyter_ws", "2xx").observe(
        loop.time() - handshake_started
    )
    metrics.ws_open.inc()
    counts = WsCounts()
    executions: collections.deque[float] = collections.deque(maxlen=256)
    last_flush = loop.time() - FLUSH_EVERY  # the first activity is written at once

    def housekeeping() -> None:
        """Throttled: record activity in the store and flush message counts."""
        nonlocal last_flush
        now = loop.time()
        if now - last_flush >= FLUSH_EVERY:
            last_flush = now
            manager.note_activity(session.id)
            counts.flush(metrics)

    async def client_to_kernel() -> None:
        to_kernel = Direction.TO_KERNEL.value
        async for msg in client:
            data = msg.data
            if msg.type is WSMsgType.TEXT:
                await upstream.send_str(data)
                channel = text_channel(data, from_end=False)
                execute = channel == "shell" and '"execute_request"' in data
            elif msg.type is WSMsgType.BINARY:
                await upstream.send_bytes(data)
                channel = binary_channel(data)
                execute = channel == "shell" and binary_header_has(data, b'"execute_request"')
            else:
                break
            counts.add(to_kernel, channel, len(data))
            if execute:
                executions.append(loop.time())
                metrics.executions.inc()
                housekeeping()

    # A kernel answers with a burst of small frames and jupyter_server leaves
    # Nagle on: its second frame waits for our ACK, which Linux delays ~40 ms.
    # Re-arming TCP_QUICKACK after every read makes us acknowledge at once
    # (measured: kernel round trips from ~45 ms to direct-connection speed).
    upstream_sock = _tune(upstream.get_extra_info("socket"))
    _tune(request.transport.get_extra_info("socket") if request.transport else None)

    def quickack() -> None:
        with contextlib.suppress(OSError):
            upstream_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    ack = quickack if upstream_sock is not None else None

    async def kernel_to_client() -> None:
        to_client = Direction.TO_CLIENT.value
        async for msg in upstream:
            if ack is not None:
                ack()
            data = msg.data
            if msg.type is WSMsgType.TEXT:
                await client.send_str(data)
                channel = text_channel(data, from_end=True)
                replied = channel == "shell" and executions and '"execute_reply"' in data
            elif msg.type is WSMsgType.BINARY:
                await client.send_bytes(data)
                channel = binary_channel(data)
                replied = (channel == "shell" and executions
                           and binary_header_has(data, b'"execute_reply"'))
            else:
                break
            counts.add(to_client, channel, len(data))
            if replied:
                metrics.execution_duration.observe(loop.time() - executions.popleft())
            housekeeping()

    pumps = [asyncio.create_task(client_to_kernel()), asyncio.create_task(kernel_to_client())]
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if pumps[0] in done:  # the client left (or sent something too big)
            await upstream.close(code=1000)
        else:
            code = upstream.close_code
            if upstream.exception() is not None and code == 1009:
                reason = "kernel message too big"
            else:
                reason = "kernel connection closed"
            if code is None or code in _RESERVED:
                code, reason = 1011, "kernel connection lost"
            await client.close(code=code, message=reason.encode())
    finally:
        unregister()
        metrics.ws_open.dec()
        counts.flush(metrics)
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()
    return client
