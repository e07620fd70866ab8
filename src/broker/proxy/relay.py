"""A WebSocket relay that forwards frames as bytes: the kernel hot path.

After both handshakes, each direction is forwarded as the bytes it arrived
in, from one transport's ``data_received`` straight into the other's
``write``: no task switch, no frame assembly, no re-encoding. This is sound
because neither leg negotiates an extension, so frames are byte-compatible
in both directions: client frames are masked and the upstream expects masked
frames from us (its client); upstream frames are unmasked and the browser
expects exactly that.

The per-chunk work (frame boundaries, the RFC 6455 checks of client frames
(docs/protocols.md#websocket-framing-rfc-6455), the peeks into kernel messages
(docs/protocols.md#kernel-websocket-protocols),
peeks, tallies, reply tracking, the rate limiter's charge, quick ACKs) is one
:class:`~broker.proxy._wire_py.Pump` per direction, from the module
:mod:`broker.proxy.wire` selects (compiled by Cython where it was built, else
the same code as Python). This module owns the connection's life once both
handshakes are done (the upstream's is :func:`broker.upstream.websocket.connect`):
heartbeats, flow control and closing.

Flow control: when one leg's write buffer passes the transport's high-water
mark, the other leg stops reading until it drains, so a slow client cannot
make the broker buffer a kernel's output without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from broker.policy.wsrate import Limiter
from broker.proxy import wire
from broker.proxy._wire_py import close_frame, ping_frame
from broker.upstream.websocket import Handshaking, UpstreamSocket

#: Seconds a client that broke the protocol is still read (and its bytes dropped) after
#: its close frame and our FIN went out, so that unread data does not make the kernel
#: reset the connection and the client lose the close frame.
LINGER = 2.0
#: Seconds the relay waits to learn why an upstream vanished (did its session end?)
#: before it tells the client 1011.
EXPLAIN_LIMIT = 2.0


class UpstreamLeg(Handshaking):
    """The broker's connection to the upstream kernel WebSocket: opened by
    :func:`broker.upstream.websocket.connect`, then handed to its relay."""

    def __init__(self) -> None:
        super().__init__()
        self.relay: Relay | None = None

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:  # (the relay normally replaces this method)
            self.relay.to_client.feed(data)
        else:
            super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.relay is not None:
            self.relay.leg_lost(self, exc)
        else:
            super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause(self)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume(self)


class ClientLeg(asyncio.Protocol):
    """The client's side of a relayed connection, on the broker's own transport.

    Bytes that arrive before the relay attaches (a client may send its first
    frames as soon as it has the 101) are kept for it.
    """

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:  # (the relay normally replaces this method)
            self.relay.to_upstream.feed(data)
        else:
            self._buffer += data

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.relay is not None:
            self.relay.leg_lost(self, exc)
        else:
            self._lost = True

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause(self)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume(self)

    def take_buffered(self) -> bytes:
        """Bytes that arrived before the relay took the leg over."""
        data, self._buffer = self._buffer, b""
        return data


# -- the relay itself -------------------------------------------------------------------


class Hooks:
    """What the relay reports to, and asks of, the rest of the broker (all synchronous).

    Subclass and override; the defaults do nothing. Called from protocol
    callbacks, so they must not block.
    """

    __slots__ = ()

    #: The connection's :class:`~broker.proxy._wire_py.Tap` (tallies, reply tracking),
    #: made by the same module as the relay's pumps; None: the relay makes its own.
    tap: Any = None
    #: The client message limiter, if any.
    limiter: Limiter | None = None

    def on_event(self, flags: int) -> None:
        """A frame needs the hooks (``EXEC_START``, ``EXEC_END``, ``ACTIVITY`` bits)."""

    def finished(self, code: int, reason: str) -> None:
        """The relay ended, with the close code the client was given."""


#: Why a leg is paused (bits): the other leg's write buffer is full; the rate limit;
#: the upstream is gone and the relay is finding out why.
_BACKPRESSURE, _RATE, _ENDING = 1, 2, 4


class Relay:
    """Pumps bytes between a client leg and an upstream leg until either ends.

    Slotted and allocation-free per message: thousands of idle connections
    each hold one of these. ``to_upstream`` and ``to_client`` are the
    :class:`~broker.proxy._wire_py.Pump` of each direction; their ``feed``
    is the reading leg's ``data_received``.
    """

    __slots__ = (
        "_client_paused",
        "_client_seen",
        "_explaining",
        "_heartbeat",
        "_linger",
        "_on_done",
        "_quickack",
        "_rate_timer",
        "_timer",
        "_upstream_paused",
        "_upstream_seen",
        "_why_lost",
        "client",
        "client_leg",
        "done",
        "hooks",
        "loop",
        "tap",
        "to_client",
        "to_upstream",
        "upstream",
        "upstream_leg",
    )

    def __init__(self, client: asyncio.Transport, upstream: UpstreamSocket[UpstreamLeg], *,
                 max_message: int, heartbeat: float, hooks: Hooks,
                 on_done: Callable[[], None] | None = None,
                 max_client_message: int = 0, client_leg: ClientLeg | None = None,
                 module: ModuleType | None = None,
                 why_lost: Callable[[], Awaitable[str | None]] | None = None) -> None:
        """``why_lost``: asked when the upstream vanishes without a close frame; a
        reason (the session ended, and why) closes the client with 1000 and
        that reason instead of 1011 (see :meth:`leg_lost`)."""
        self.loop = asyncio.get_running_loop()
        w = module if module is not None else wire.select()
        self.client = client
        self.upstream = upstream.transport
        self.hooks = hooks
        self.done: asyncio.Future[tuple[int, str]] = self.loop.create_future()
        self._on_done = on_done
        self._why_lost = why_lost
        self._explaining: asyncio.Task[None] | None = None
        self._client_paused = self._upstream_paused = 0
        self._heartbeat = heartbeat
        self._client_seen = self._upstream_seen = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        if client_leg is None:
            client_leg = ClientLeg()
            client_leg.connection_made(client)
        self.client_leg = client_leg
        self.upstream_leg = upstream.leg
        self._quickack = quickack_for(self.upstream)
        self.tap: Any = hooks.tap if hooks.tap is not None else w.Tap()
        # Clients may be held to a smaller cap than kernel output (0: the same).
        self.to_upstream: Any = w.Pump(
            from_client=True, max_message=max_client_message or max_message, tap=self.tap,
            write=self.upstream.write, on_error=self._client_error, on_delay=self._apply_delay,
            on_event=hooks.on_event, limiter=hooks.limiter)
        self.to_client: Any = w.Pump(
            from_client=False, max_message=max_message, tap=self.tap, write=client.write,
            on_error=self._kernel_error, on_delay=self._apply_delay, on_event=hooks.on_event,
            quickack=self._quickack)
        client_leg.relay = self
        self.upstream_leg.relay = self
        # The transports call the pumps directly (uvloop caches data_received when the
        # protocol is set, hence set_protocol again): no Python frame of ours per chunk.
        client_leg.data_received = self.to_upstream.feed  # type: ignore[method-assign]
        self.upstream_leg.data_received = self.to_client.feed  # type: ignore[method-assign]
        client.set_protocol(client_leg)
        self.upstream.set_protocol(self.upstream_leg)
        if heartbeat:
            self._timer = self.loop.call_later(heartbeat, self._beat)
        # Kernel output may follow the 101 at once (Jupyter replays what it
        # buffered for a reconnecting session): what came with the handshake,
        # then what arrived while the client's own handshake was answered.
        early = upstream.leftover + self.upstream_leg.take_buffered()
        upstream.leftover = b""
        if early:
            self.to_client.feed(early)
        early = client_leg.take_buffered()
        if early:
            self.to_upstream.feed(early)
        for leg in (client_leg, self.upstream_leg):
            if leg._lost:  # a leg that ended before the relay attached
                self.leg_lost(leg, None)

    # -- what the pumps report -----------------------------------------------------------
    def _client_error(self, code: int, reason: str) -> None:
        """The client broke the protocol (1002, 1007) or sent an oversized message (1009)."""
        self.finish(code, reason, linger=True)

    def _kernel_error(self, code: int, reason: str) -> None:
        self.finish(code, "kernel " + reason)

    def _apply_delay(self, delay: float) -> None:
        """What the limiter answered for a client message: pause reading, or close."""
        if delay < 0:  # the limiter says: sustained abuse
            self.finish(1008, "message rate limit exceeded", linger=True)
        elif delay > 0:
            self._set_paused(True, _RATE, True)
            if self._rate_timer is not None:
                self._rate_timer.cancel()
            self._rate_timer = self.loop.call_later(delay, self._set_paused, True, _RATE, False)

    # -- flow control ------------------------------------------------------------------
    def _set_paused(self, client_side: bool, reason: int, paused: bool) -> None:
        before = self._client_paused if client_side else self._upstream_paused
        after = before | reason if paused else before & ~reason
        if client_side:
            self._client_paused = after
        else:
            self._upstream_paused = after
        transport = self.client if client_side else self.upstream
        if bool(before) != bool(after) and not transport.is_closing():
            if after:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def pause(self, leg: ClientLeg | UpstreamLeg) -> None:
        """``leg``'s write buffer is full: stop reading from the other side."""
        self._set_paused(leg is not self.client_leg, _BACKPRESSURE, True)

    def resume(self, leg: ClientLeg | UpstreamLeg) -> None:
        self._set_paused(leg is not self.client_leg, _BACKPRESSURE, False)

    # -- heartbeat ---------------------------------------------------------------------
    def _beat(self) -> None:
        tap = self.tap
        if tap.ended:
            return
        now = self.loop.time()
        # Reads only set a flag (no clock read per chunk); the beat turns it into a time.
        if tap.client_active:
            tap.client_active = False
            self._client_seen = now
        if tap.upstream_active:
            tap.upstream_active = False
            self._upstream_seen = now
        silence = 2 * self._heartbeat + 5
        if now - self._upstream_seen > silence:
            self.finish(1011, "kernel connection lost")
            return
        if now - self._client_seen > silence:
            self.finish(1001, "client gone")
            return
        if self.to_client.scanner.at_boundary:
            self.client.write(ping_frame(masked=False))
        if self.to_upstream.scanner.at_boundary:
            self.upstream.write(ping_frame(masked=True))
        self._timer = self.loop.call_later(self._heartbeat, self._beat)

    # -- ending ------------------------------------------------------------------------

    def leg_lost(self, leg: ClientLeg | UpstreamLeg, exc: BaseException | None) -> None:
        if leg is self.client_leg:
            self.finish(1000 if self.to_upstream.scanner.closed else 1001, "client closed")
        else:
            code = self.to_client.scanner.close_code
            if code is not None and code not in (1005, 1006, 1015):
                self.finish(code, "kernel connection closed")
            elif self._why_lost is None or self.tap.ended:
                self.finish(1011, "kernel connection lost")
            elif self._explaining is None:
                # A server stopped because its session ended (on another replica that
                # could not tell this one, say) drops the socket without a close frame:
                # the client should hear "session ended", not a reason to reconnect.
                self._set_paused(True, _ENDING, True)  # nothing can reach the kernel now
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._explaining = self.loop.create_task(self._explain_loss(self._why_lost))

    async def _explain_loss(self, why_lost: Callable[[], Awaitable[str | None]]) -> None:
        """Close the client after a lost upstream: 1000 if its session ended, else 1011."""
        reason: str | None = None
        try:
            reason = await asyncio.wait_for(why_lost(), EXPLAIN_LIMIT)
        except Exception:  # the store is unreachable too, or slow: what we know is the loss
            reason = None
        if reason is None:
            self.finish(1011, "kernel connection lost")
        else:
            self.finish(1000, f"session ended: {reason}")

    @staticmethod
    def _clean(scanner: Any) -> bool:
        """Whether what went through ``scanner``'s direction ends between frames."""
        return bool(scanner.clean_cut) if scanner.error else bool(scanner.at_boundary)

    def finish(self, code: int, reason: str, *, linger: bool = False) -> None:
        """End both legs: a close frame where one may still be sent, then the TCP close.

        ``linger``: the client is at fault and may still be sending (an oversized
        frame); its close frame and a FIN go out, and what it still sends is read
        and dropped for up to :data:`LINGER` seconds, so that the close frame is
        not lost to a reset.
        """
        tap = self.tap
        if tap.ended:
            return
        tap.ended = True
        explaining = self._explaining
        if explaining is not None and explaining is not asyncio.current_task():
            explaining.cancel()  # the client left, or the session's end came first
        for timer in (self._timer, self._rate_timer):
            if timer is not None:
                timer.cancel()
        to_client, to_upstream = self.to_client.scanner, self.to_upstream.scanner
        if not self.client.is_closing() and self._clean(to_client) and not to_client.closed:
            self.client.write(close_frame(code, reason, masked=False))
        if (not self.upstream.is_closing() and self._clean(to_upstream)
                and not to_upstream.closed):
            self.upstream.write(close_frame(1000 if code in (1001, 1000) else code, reason,
                                            masked=True))
        if self._quickack is not None:
            # The socket object shares the transport's descriptor: let go of it
            # without closing, before the transport closes the descriptor itself.
            self._quickack.sock.detach()  # type: ignore[attr-defined]
            self._quickack = None
        self.upstream.close()
        if linger and not self.client.is_closing() and self.client.can_write_eof():
            self.client.write_eof()  # after the close frame: shutdown(SHUT_WR) once flushed
            self.client_leg.data_received = _drop  # type: ignore[method-assign]
            self.client.set_protocol(self.client_leg)
            if self._client_paused:
                self.client.resume_reading()
            self._linger = self.loop.call_later(LINGER, self.client.close)
        else:
            self.client.close()  # after the close frame: a transport flushes before closing
        self.done.set_result((code, reason))
        self.hooks.finished(code, reason)
        if self._on_done is not None:
            self._on_done()


def _drop(data: bytes) -> None:
    """What a lingering client still sends: read, and dropped."""


class BorrowedSocket(socket.socket):
    """A socket object over a descriptor that its transport owns: it never closes it.

    A plain ``socket.socket(fileno=...)`` closes the descriptor when it is
    collected, by which time the number may belong to another connection.
    """

    __slots__ = ()

    def close(self) -> None:
        self.detach()

    def __del__(self) -> None:
        self.detach()


def quickack_for(transport: asyncio.Transport) -> Callable[[], None] | None:
    """Acknowledges the upstream's data at once (``TCP_QUICKACK``), when called after a read.

    Why: jupyter_server leaves Nagle on, so the second small frame of a
    kernel's reply waits until the first is acknowledged, and Linux delays
    that ACK by up to 40 ms when the connection looks interactive. The relay
    calls this only while a kernel is mid-reply (``Hooks.kernel_message``):
    an ACK of its own costs a packet, which an upstream that is done
    answering (or sets ``TCP_NODELAY`` and answers in one frame) does not
    need: the ACK then rides on the next request.

    The socket object is made once per connection from the transport's file
    descriptor: uvloop's ``get_extra_info("socket")`` builds a new Python
    socket on every ``setsockopt`` (measured: 11 % of the relay's time). It
    is a :class:`BorrowedSocket`, which never closes that descriptor, even if
    its owner forgets to detach it before it is collected.
    """
    extra: Any = transport.get_extra_info("socket")
    if extra is None or not hasattr(socket, "TCP_QUICKACK"):
        return None
    try:
        sock = BorrowedSocket(fileno=extra.fileno())
    except OSError:
        return None
    setsockopt = sock.setsockopt
    level, option = socket.IPPROTO_TCP, socket.TCP_QUICKACK

    def quickack() -> None:
        with contextlib.suppress(OSError):
            setsockopt(level, option, 1)

    quickack.sock = sock  # type: ignore[attr-defined]  # detached when the relay ends
    return quickack
