"""The kernel WebSocket endpoint: ``/s/{id}/api/kernels/{kid}/channels``.

All policy happens on the upgrade request (authentication, origin, path,
rate admission); then the upstream WebSocket is opened *first*, so the
client's handshake is answered with the subprotocol the upstream chose
(``v1.kernel.websocket.jupyter.org`` binary frames, or none for JSON text)
and an upstream refusal (unknown kernel) is still an ordinary JSON HTTP
error. aiohttp answers the client's upgrade; then the connection is handed
to a :class:`~broker.proxy.relay.Relay`, which forwards bytes between the
two sockets from their protocol callbacks (see that module for why this is
sound and what it still inspects).

Per message, the hooks below do integer bookkeeping only: activity is
written to the store at most every few seconds, and message/byte counts are
flushed to the metrics on the same schedule and at the end.

Closing: whichever leg ends first ends the other. A client close reaches the
upstream as the client sent it; an upstream close is passed on with its code
(1011 when the upstream vanished without one); an oversized message closes
both with 1009; a session that ends closes with 1000 and the reason; a
shutting-down broker with 1001.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Callable

from aiohttp import web
from yarl import URL

from broker import keys
from broker.errors import NotFound, UpstreamFailed
from broker.metrics import CHANNELS, Direction, Metrics
from broker.models import Session
from broker.policy.wsrate import WsLimits
from broker.proxy.paths import join
from broker.proxy.relay import (
    FrameEvent,
    HandshakeRefused,
    Hooks,
    Relay,
    connect_upstream,
)
from broker.proxy.rest import forward_query
from broker.proxy.tap import ACTIVITY, EXEC_END, EXEC_START, MID_REPLY, Tap
from broker.sessions import SessionManager

log = logging.getLogger(__name__)

#: Seconds between activity writes (and metric flushes) per connection.
FLUSH_EVERY = 5.0
#: Tap direction index -> metric label.
_DIRECTIONS = (Direction.TO_KERNEL.value, Direction.TO_CLIENT.value)


class KernelHooks(Hooks):
    """Activity, metrics, execution timing and reply tracking for one kernel connection
    (slotted: idle connections are many).

    The per-frame part (tallies, reply tracking) is the :class:`~broker.proxy.tap.Tap`'s,
    compiled when it is built, and its answers bring the rest here: an
    ``execute_request`` starts a timing that its ``execute_reply`` ends, and
    activity is written to the store at once after a quiet spell, then at most
    every :data:`FLUSH_EVERY` seconds by a timer that runs only while there is
    traffic (no clock read per message, no timer per idle connection).

    Reply tracking decides the relay's quick ACKs: the kernel is mid-reply
    while its last status was ``busy``, or a shell/control request of the
    client still awaits its ``*_reply`` or the ``idle`` status that closes
    its handling. jupyter_server forwards the shell and iopub streams
    independently, so the reply may reach the socket before ``busy`` or after
    ``idle``: only when both have come is the burst over.
    """

    __slots__ = ("_flush_timer", "_note_activity", "executions", "limiter", "loop", "metrics",
                 "tap")

    def __init__(self, metrics: Metrics, note_activity: Callable[[], None],
                 limiter: Callable[[int, float], float] | None = None) -> None:
        self.metrics = metrics
        self.tap = Tap()
        self.loop = asyncio.get_running_loop()
        # Start times of executions awaiting their reply; made on first use.
        self.executions: collections.deque[float] | None = None
        self._note_activity = note_activity
        self.limiter = limiter
        self._flush_timer: asyncio.TimerHandle | None = None

    def on_event(self, flags: int) -> None:
        if flags & EXEC_START:
            if self.executions is None:
                self.executions = collections.deque(maxlen=256)
            self.executions.append(self.loop.time())
            self.metrics.executions.inc()
        if flags & EXEC_END and self.executions:
            self.metrics.execution_duration.observe(self.loop.time() - self.executions.popleft())
        if flags & ACTIVITY:
            if self._flush_timer is not None:  # already ticking: its next flush writes it
                self.tap.dirty = True
                return
            self._note_activity()
            self.tap.ticking = True
            self._flush_timer = self.loop.call_later(FLUSH_EVERY, self._flush)

    def _flush(self) -> None:
        tap = self.tap
        self._flush_timer = None
        tap.ticking = False
        self._flush_counts()
        if tap.dirty:
            tap.dirty = False
            self.on_event(ACTIVITY)

    def _flush_counts(self) -> None:
        """Move the tap's tallies into the exported counters."""
        metrics = self.metrics
        for direction, channel, messages, size in self.tap.take_counts():
            labels = (_DIRECTIONS[direction], CHANNELS[channel])
            metrics.ws_messages.labels(*labels).inc(messages)
            metrics.ws_bytes.labels(*labels).inc(size)

    def client_message(self, ev: FrameEvent) -> float:
        flags = self.tap.client_frame(ev.opcode, ev.length, ev.head, ev.tail)
        if flags:
            self.on_event(flags)
        if self.limiter is None:
            return 0.0
        # Continuations (opcode 0) are charged their bytes, not another message.
        return self.limiter(ev.length, 1.0 if ev.opcode else 0.0)

    def kernel_message(self, ev: FrameEvent) -> bool:
        flags = self.tap.kernel_frame(ev.opcode, ev.length, ev.head, ev.tail)
        if flags & _EVENTS:
            self.on_event(flags)
        return bool(flags & MID_REPLY)

    def finished(self, code: int, reason: str) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_counts()


_EVENTS = EXEC_START | EXEC_END | ACTIVITY


async def bridge(request: web.Request, session: Session, remainder: str) -> web.StreamResponse:
    """Connect the client's kernel WebSocket to the session's upstream kernel."""
    settings = request.app[keys.SETTINGS]
    manager = request.app[keys.MANAGER]
    metrics = manager.metrics
    loop = asyncio.get_running_loop()
    started = loop.time()
    offered = [p.strip() for header in request.headers.getall("Sec-WebSocket-Protocol", [])
               for p in header.split(",") if p.strip()]
    http_url = join(session.upstream_url, remainder)
    url = http_url.with_scheme("wss" if http_url.scheme == "https" else "ws")
    query = forward_query(request)
    if query:  # byte for byte, as the REST proxy forwards it
        url = URL(f"{url}?{query}", encoded=True)
    try:
        upstream = await connect_upstream(
            url, {"Authorization": f"token {session.upstream_token}"}, offered,
            limit=settings.upstream_timeout)
    except HandshakeRefused as exc:
        if exc.status == 404:
            raise NotFound("No such kernel in this session", reason="unknown_kernel") from exc
        metrics.upstream_error(session.backend, "refused")
        raise UpstreamFailed(f"The kernel refused the connection ({exc.status})",
                             reason="upstream_refused") from exc
    except (OSError, TimeoutError) as exc:
        metrics.upstream_error(session.backend, "unreachable")
        raise UpstreamFailed("The session's Jupyter server did not answer",
                             reason="upstream_unreachable") from exc

    # aiohttp answers the client's upgrade (101, the upstream's subprotocol, no
    # extensions); after that the socket is ours.
    ws = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), compress=False,
        autoping=False, max_msg_size=settings.ws_max_message_size)
    try:
        await ws.prepare(request)
    except BaseException:
        upstream.transport.abort()
        raise
    transport = request.transport
    if transport is None or transport.is_closing():
        upstream.transport.abort()
        return ws
    hooks = KernelHooks(metrics, lambda: manager.note_activity(session.id),
                        limiter=_limiter_for(request))
    connection = _Connection(manager, session.id, loop.time())
    relay = Relay(transport, upstream, max_message=settings.ws_max_message_size,
                  heartbeat=settings.ws_heartbeat, hooks=hooks, on_done=connection.ended,
                  max_client_message=settings.ws_client_max_message_size)
    transport.set_protocol(relay.client_leg)
    _hand_over(request, ws)
    with contextlib.suppress(OSError):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.attach(relay)
    metrics.observe_http("jupyter_ws", 200, loop.time() - started)
    return ws


class _Connection:
    """One relayed kernel WebSocket's bookkeeping, after the handler has returned.

    The handler returns as soon as the relay owns the sockets (see
    :func:`_hand_over`): a suspended handler kept aiohttp's request, task and
    middleware frames alive for the connection's whole life, several KiB per
    idle connection. What must happen at the end (the session's closer
    unregistered, the open-connections gauge, a log line) happens here, from
    the relay's ``on_done``.
    """

    __slots__ = ("_unregister", "manager", "relay", "session_id", "started")

    def __init__(self, manager: SessionManager, session_id: str, started: float) -> None:
        self.manager = manager
        self.session_id = session_id
        self.started = started
        self.relay: Relay | None = None
        self._unregister: Callable[[], None] | None = None
        manager.metrics.ws_open.inc()

    def attach(self, relay: Relay) -> None:
        """Let session ends and shutdown close this connection (unless it already ended)."""
        if relay.done.done():
            return
        self.relay = relay
        self._unregister = self.manager.register_closer(self.session_id, self.close)

    async def close(self, code: int, reason: str) -> None:
        if self.relay is not None:
            self.relay.finish(code, reason)

    def ended(self) -> None:
        relay, self.relay = self.relay, None
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self.manager.metrics.ws_open.dec()
        if relay is not None:
            code, reason = relay.done.result()
            log.info("kernel connection of session %s closed: %d %s (after %.0f s)",
                     self.session_id, code, reason, relay.loop.time() - self.started)


def _limiter_for(request: web.Request) -> Callable[[int, float], float] | None:
    """The per-connection client message limiter, when limits are configured.

    A fresh :class:`~broker.policy.wsrate.WsLimiter` per connection; its
    ``take`` is the hook (see that module for the contract). Metrics are
    touched on its slow path only.
    """
    limits = WsLimits.from_settings(request.app[keys.SETTINGS])
    if limits is None:
        return None
    metrics = request.app[keys.MANAGER].metrics
    return limits.new(on_throttle=metrics.ws_throttled.inc,
                      on_close=lambda: metrics.limit_refused("ws_rate")).take


def _hand_over(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Make aiohttp let go of a connection the relay now owns, so the handler can return.

    aiohttp's request handler would close the socket when the handler returns
    (a 101 response is not kept alive); with its transport taken away it
    cannot, and it forgets the connection (the server's connection table drops
    it when the request task ends). The response is marked closed, so aiohttp
    does not try to send a close frame of its own; its frame reader is dropped.
    From here on the relay closes the socket, and the session manager's closers
    (session end, shutdown drain) reach it there.
    """
    ws._reader = None
    ws._parser = None
    _mark_closed(ws, 1000)
    protocol = request.protocol
    protocol._payload_parser = None
    server = getattr(protocol, "_manager", None)
    if server is not None:
        server.connection_lost(protocol, None)
    protocol.transport = None
    protocol.force_close()


def _mark_closed(ws: web.WebSocketResponse, code: int) -> None:
    """Tell aiohttp's response the close handshake already happened (on the relay)."""
    ws._closed = True
    ws._close_code = code
