"""The kernel WebSocket endpoint: ``/s/{id}/api/kernels/{kid}/channels``.

All policy happens on the upgrade request (authentication, origin, path,
rate admission); then the upstream WebSocket is opened *first*, so the
client's handshake is answered with the subprotocol the upstream chose
(``v1.kernel.websocket.jupyter.org`` binary frames, or none for JSON text;
docs/protocols.md#kernel-websocket-protocols)
and an upstream refusal (unknown kernel) is still an ordinary JSON HTTP
error. The broker answers the client's upgrade through aiohttp (a plain 101
response) and then takes the connection over with public APIs only: a
duplicate of the socket's descriptor becomes the broker's own transport
(``loop.connect_accepted_socket``), and aiohttp's transport, paused before
the 101 went out, is closed, so aiohttp forgets the connection and the
handler returns (see :func:`_take_over`). A
:class:`~broker.proxy.relay.Relay` then forwards bytes between the two
sockets from their protocol callbacks (see that module for why this is
sound and what it still inspects).

Per message, the hooks below do integer bookkeeping only: activity is
written to the store at most every few seconds, and message/byte counts are
flushed to the metrics on the same schedule and at the end.

Closing: whichever leg ends first ends the other. A client close reaches the
upstream as the client sent it; an upstream close is passed on with its code
(1011 when the upstream vanished without one, unless the store says the
session ended: then 1000 and the reason, as below); an oversized message closes
both with 1009; a session that ends closes with 1000 and the reason; a
shutting-down broker with 1001.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from aiohttp import web

from broker import appkeys
from broker.errors import BadRequest, NotFound, RateLimited, UpstreamFailed
from broker.metrics import CHANNELS, Direction, Metrics
from broker.models import Session
from broker.policy.wsrate import Limiter, SessionWsBudgets, WsLimiter, WsLimits
from broker.proxy import wire
from broker.proxy._wire_py import ACTIVITY, EXEC_END, EXEC_START
from broker.proxy.relay import ClientLeg, Hooks, Relay, UpstreamLeg
from broker.proxy.rest import forward_query
from broker.sessions import SessionManager
from broker.upstream.websocket import HandshakeRefused, accept_key

log = logging.getLogger(__name__)

#: Seconds between activity writes (and metric flushes) per connection.
FLUSH_EVERY = 5.0
#: Tap direction index -> metric label.
_DIRECTIONS = (Direction.TO_KERNEL.value, Direction.TO_CLIENT.value)


class KernelHooks(Hooks):
    """Activity, metrics, execution timing and reply tracking for one kernel connection
    (slotted: idle connections are many).

    The per-frame part (tallies, reply tracking) is the :class:`~broker.proxy._wire_py.Tap`'s,
    compiled when it is built, and its answers bring the rest here: an
    ``execute_request`` starts a timing that its ``execute_reply`` ends, and
    activity is written to the store at once after a quiet spell, then at most
    every :data:`FLUSH_EVERY` seconds by a timer that runs only while there is
    traffic (no clock read per message, no timer per idle connection).

    Reply tracking decides the relay's quick ACKs: the kernel is mid-reply
    while its last status was ``busy``, or a shell/control request of the
    client still awaits its ``*_reply`` or the ``idle`` status that closes
    its handling (for an ``execute_request``, the idle status whose parent is
    that request: the idle of another client's request ends nothing).
    jupyter_server forwards the shell and iopub streams independently, so the
    reply may reach the socket before ``busy`` or after ``idle``: only when
    both have come is the burst over.
    """

    __slots__ = ("_flush_timer", "_note_activity", "executions", "limiter", "loop", "metrics",
                 "on_first_reply", "tap")

    def __init__(self, metrics: Metrics, note_activity: Callable[[], None],
                 limiter: Limiter | None = None, module: ModuleType | None = None,
                 on_first_reply: Callable[[], None] | None = None) -> None:
        self.metrics = metrics
        self.tap: Any = (module if module is not None else wire.select()).Tap()
        self.loop = asyncio.get_running_loop()
        # Start times of executions awaiting their reply; made on first use.
        self.executions: collections.deque[float] | None = None
        self._note_activity = note_activity
        self.limiter = limiter
        self._flush_timer: asyncio.TimerHandle | None = None
        #: Called at this connection's first execute_reply (the session's first-reply metric).
        self.on_first_reply = on_first_reply

    def on_event(self, flags: int) -> None:
        if flags & EXEC_START:
            if self.executions is None:
                self.executions = collections.deque(maxlen=256)
            self.executions.append(time.perf_counter())  # (loop.time(): whole ms on uvloop)
            self.metrics.executions.inc()
        if flags & EXEC_END and self.executions:
            self.metrics.execution_duration.observe(
                time.perf_counter() - self.executions.popleft())
            if self.on_first_reply is not None:
                self.on_first_reply()
                self.on_first_reply = None
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

    def finished(self, code: int, reason: str) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_counts()


async def bridge(request: web.Request, session: Session, remainder: str) -> web.StreamResponse:
    """Connect the client's kernel WebSocket to the session's upstream kernel."""
    settings = request.app[appkeys.SETTINGS]
    manager = request.app[appkeys.MANAGER]
    metrics = manager.metrics
    started = time.perf_counter()  # (loop.time(): whole ms on uvloop)
    key = _check_upgrade(request)
    budgets = request.app[appkeys.WS_BUDGETS]
    admitted, shared = budgets.open(session.id)
    if not admitted:
        metrics.limit_refused("ws_rate")
        raise RateLimited(
            f"This session already has {settings.ws_session_max_connections} kernel "
            "WebSockets open; close one first", reason="too_many_websockets", retry_after=5)
    slot = _Slot(budgets, session.id)
    try:
        return await _bridge(request, session, remainder, key, shared, slot, started)
    except BaseException:
        slot.release()
        raise


class _Slot:
    """A connection's place in its session's count; released once, whichever path ends it."""

    __slots__ = ("budgets", "session_id")

    def __init__(self, budgets: SessionWsBudgets | None, session_id: str) -> None:
        self.budgets = budgets
        self.session_id = session_id

    def release(self) -> None:
        budgets, self.budgets = self.budgets, None
        if budgets is not None:
            budgets.close(self.session_id)


async def _bridge(request: web.Request, session: Session, remainder: str, key: str,
                  shared: WsLimiter | None, slot: _Slot, started: float
                  ) -> web.StreamResponse:
    """:func:`bridge` once the connection is admitted (its slot is released on failure)."""
    settings = request.app[appkeys.SETTINGS]
    manager = request.app[appkeys.MANAGER]
    metrics = manager.metrics
    loop = asyncio.get_running_loop()
    offered = [p.strip() for header in request.headers.getall("Sec-WebSocket-Protocol", [])
               for p in header.split(",") if p.strip()]
    try:
        upstream = await request.app[appkeys.UPSTREAM].for_session(session).websocket(
            remainder, leg=UpstreamLeg, protocols=offered,
            query=forward_query(request),  # byte for byte, as the REST proxy forwards it
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

    try:
        response, transport, leg = await _take_over(request, key, upstream.protocol)
    except BaseException:
        upstream.transport.abort()
        raise
    module = wire.select(settings.ws_relay_compiled)
    hooks = KernelHooks(metrics, lambda: manager.note_activity(session.id),
                        limiter=_limiter_for(request, shared), module=module,
                        on_first_reply=lambda: manager.first_reply(session))
    connection = _Connection(manager, session.id, loop.time(), slot)
    relay = Relay(transport, upstream, max_message=settings.ws_max_message_size,
                  heartbeat=settings.ws_heartbeat, hooks=hooks, on_done=connection.ended,
                  max_client_message=settings.ws_client_max_message_size, client_leg=leg,
                  module=module, why_lost=lambda: manager.end_reason(session.id))
    connection.attach(relay)
    metrics.observe_http("jupyter_ws", 200, time.perf_counter() - started)
    return response


def _check_upgrade(request: web.Request) -> str:
    """The client's ``Sec-WebSocket-Key`` once its upgrade request is one RFC 6455 allows."""
    headers = request.headers
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if (request.method != "GET" or "upgrade" not in headers.get("Connection", "").lower()
            or headers.get("Sec-WebSocket-Version") != "13" or not valid_key):
        raise BadRequest("Not a valid WebSocket upgrade (RFC 6455 version 13)",
                         reason="bad_websocket_upgrade",
                         headers={"Sec-WebSocket-Version": "13"})
    return key


async def _take_over(request: web.Request, key: str, protocol: str | None
                     ) -> tuple[web.StreamResponse, asyncio.Transport, ClientLeg]:
    """Answer the client's upgrade (101, the upstream's subprotocol, no extensions) and make
    the connection the broker's own, with public APIs only.

    aiohttp's transport stops reading before the 101 goes out, so no frame of
    the client reaches aiohttp (a client sends none before the 101). The
    socket's descriptor is duplicated into a transport of the broker's own;
    aiohttp's transport is then closed, which closes only its descriptor: the
    TCP connection lives on in the duplicate. aiohttp sees an ordinary end of
    connection and the handler returns (a suspended handler per connection
    would keep several KiB alive for the connection's whole life).
    """
    old = request.transport
    if old is None or old.is_closing():
        raise ConnectionResetError("the client left during the upgrade")
    sock = old.get_extra_info("socket")
    if sock is None or old.get_extra_info("sslcontext") is not None:
        raise UpstreamFailed("This listener cannot relay WebSockets (TLS is terminated "
                             "in front of the broker)", reason="websocket_unsupported")
    headers = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Accept": accept_key(key)}
    if protocol:
        headers["Sec-WebSocket-Protocol"] = protocol
    response = web.StreamResponse(status=101, headers=headers)
    old.pause_reading()
    await response.prepare(request)
    await response.write_eof()  # sends the head (aiohttp holds a body-less one until here)
    for _ in range(100):  # what the kernel did not take at once: normally nothing
        if not old.get_write_buffer_size() or old.is_closing():
            break
        await asyncio.sleep(0.01)
    if old.is_closing():
        raise ConnectionResetError("the client left during the upgrade")
    # From here on the client has its 101: a failure can only end the connection.
    try:
        own = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError as exc:  # out of descriptors (EMFILE)
        old.close()
        log.warning("kernel WebSocket dropped after its upgrade: %s", exc)
        raise ConnectionResetError("no descriptor to take the connection over") from exc
    try:
        with contextlib.suppress(OSError):
            own.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport, leg = await asyncio.get_running_loop().connect_accepted_socket(
            ClientLeg, sock=own)
    except BaseException:
        own.close()
        old.close()
        raise
    old.close()
    return response, transport, leg


class _Connection:
    """One relayed kernel WebSocket's bookkeeping, after the handler has returned.

    The handler returns as soon as the relay owns the sockets (see
    :func:`_take_over`): a suspended handler kept aiohttp's request, task and
    middleware frames alive for the connection's whole life, several KiB per
    idle connection. What must happen at the end (the session's closer
    unregistered, the session's connection slot, the open-connections gauge, a
    log line) happens here, from
    the relay's ``on_done``.
    """

    __slots__ = ("_unregister", "manager", "relay", "session_id", "slot", "started")

    def __init__(self, manager: SessionManager, session_id: str, started: float,
                 slot: _Slot) -> None:
        self.manager = manager
        self.slot = slot
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
        self.slot.release()
        relay, self.relay = self.relay, None
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self.manager.metrics.ws_open.dec()
        if relay is not None:
            code, reason = relay.done.result()
            log.info("kernel connection of session %s closed: %d %s (after %.0f s)",
                     self.session_id, code, reason, relay.loop.time() - self.started)


def _limiter_for(request: web.Request, shared: WsLimiter | None = None) -> Limiter | None:
    """The per-connection client message limiter, when limits are configured.

    A fresh :class:`~broker.policy.wsrate.WsLimiter` per connection (see that
    module for the contract), charging ``shared`` (the session's aggregate
    budget) too. Metrics are touched on its slow path only.
    """
    limits = WsLimits.from_settings(request.app[appkeys.SETTINGS])
    if limits is None:
        return shared  # the session's budget alone, or nothing on the hot path
    metrics = request.app[appkeys.MANAGER].metrics
    return limits.new(on_throttle=metrics.ws_throttled.inc,
                      on_close=lambda: metrics.limit_refused("ws_rate"), parent=shared)
