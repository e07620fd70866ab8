"""The kernel WebSocket bridge: ``/s/{id}/api/kernels/{kid}/channels``.

All policy happens on the upgrade request (authentication, origin, path);
then the upstream WebSocket is opened *first*, so the client's handshake is
answered with the subprotocol the upstream chose (``v1.kernel.websocket.
jupyter.org`` binary frames, or none for JSON text) and an upstream refusal
(unknown kernel) is still an ordinary JSON HTTP error. No extensions are
negotiated on either leg. Both legs run aiohttp's heartbeat.

Per message, the bridge only forwards: it never decodes kernel output. For
client->kernel frames it looks for ``execute_request`` (in the header of v1
binary frames) to record activity, and it records kernel output as activity
too; both are throttled to one store write every few seconds.

Closing: whichever leg ends first ends the other. A client close closes the
upstream with 1000; an upstream close is passed on with its code (1011 when
the upstream vanished without one), an oversized message with 1009.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSMsgType, web

from broker import keys
from broker.errors import NotFound, UpstreamFailed
from broker.models import Session
from broker.proxy.paths import join
from broker.proxy.rest import forward_query

log = logging.getLogger(__name__)

#: Seconds between activity writes per connection.
ACTIVITY_EVERY = 5.0
#: Close codes that may not be sent in a close frame (RFC 6455 7.4.1).
_RESERVED = {1005, 1006, 1015}


def is_execute_request(msg_type: WSMsgType, data: str | bytes) -> bool:
    """Whether a client->kernel frame is an execute_request, reading as little as possible."""
    if msg_type is WSMsgType.TEXT:
        return isinstance(data, str) and '"execute_request"' in data
    raw = data if isinstance(data, bytes) else b""
    # v1.kernel.websocket.jupyter.org: u64 count, u64 offsets; header is part 1.
    if len(raw) < 24:
        return False
    count = int.from_bytes(raw[:8], "little")
    if count < 3 or len(raw) < 8 * (count + 1):
        return False
    start = int.from_bytes(raw[16:24], "little")
    end = int.from_bytes(raw[24:32], "little")
    return b'"execute_request"' in raw[start:end]


def _ws_base(http_url: str) -> str:
    return "ws" + http_url[4:] if http_url.startswith("http") else http_url


async def bridge(request: web.Request, session: Session, remainder: str) -> web.StreamResponse:
    """Connect the client's kernel WebSocket to the session's upstream kernel."""
    settings = request.app[keys.SETTINGS]
    manager = request.app[keys.MANAGER]
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
        raise UpstreamFailed(f"The kernel refused the connection ({exc.status})",
                             reason="upstream_refused") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
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
    last_activity = loop.time() - ACTIVITY_EVERY  # the first activity is written at once

    def activity() -> None:
        nonlocal last_activity
        now = loop.time()
        if now - last_activity >= ACTIVITY_EVERY:
            last_activity = now
            manager.note_activity(session.id)

    async def client_to_kernel() -> None:
        async for msg in client:
            if msg.type is WSMsgType.TEXT:
                await upstream.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await upstream.send_bytes(msg.data)
            else:
                break
            if is_execute_request(msg.type, msg.data):
                activity()

    async def kernel_to_client() -> None:
        async for msg in upstream:
            if msg.type is WSMsgType.TEXT:
                await client.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await client.send_bytes(msg.data)
            else:
                break
            activity()

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
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()
    return client
