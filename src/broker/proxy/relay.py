"""A WebSocket relay that forwards frames as bytes: the kernel hot path.

After both handshakes, each direction is forwarded as the bytes it arrived
in, from one transport's ``data_received`` straight into the other's
``write``: no task switch, no frame assembly, no re-encoding. This is sound
because neither leg negotiates an extension, so frames are byte-compatible
in both directions: client frames are masked and the upstream expects masked
frames from us (its client); upstream frames are unmasked and the browser
expects exactly that.

To still enforce everything the broker promises, a :class:`FrameScanner` per
direction parses frame *headers* only (2-14 bytes) and keeps frame
boundaries, so the relay can count messages and bytes, notice close and pong
frames, refuse oversized messages (1009), apply a per-connection rate limit
to client messages and inject its own pings and close frames between frames.
It peeks into payloads only where an answer lives: the first bytes of a
client data frame (``execute_request``, channel) and the first or last bytes
of a kernel frame (channel, ``execute_reply``); kernel output is never
decoded.

Flow control: when one leg's write buffer passes the transport's high-water
mark, the other leg stops reading until it drains, so a slow client cannot
make the broker buffer a kernel's output without bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp._websocket.helpers import websocket_mask as _mask_in_place  # C when built
from yarl import URL

from broker.proxy.tap import (
    ACTIVITY,
    BACK_END,
    BACK_NONE,
    EXEC_END,
    EXEC_START,
    PyTap,
    engine_for,
)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: How far into a payload the relay looks for a message type or channel.
PEEK = 512
_MAX_HANDSHAKE = 64 * 1024


def unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    """Unmask payload bytes that start ``offset`` bytes into their frame's payload."""
    if not data:
        return b""
    shift = offset & 3
    buf = bytearray(data)
    _mask_in_place(mask[shift:] + mask[:shift] if shift else mask, buf)
    return bytes(buf)


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame; masked for the upstream (we are its client), plain for the client."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    if not masked:
        return bytes([0x80 | OP_CLOSE, len(payload)]) + payload
    mask = os.urandom(4)
    return bytes([0x80 | OP_CLOSE, 0x80 | len(payload)]) + mask + unmask(payload, mask, 0)


def ping_frame(*, masked: bool) -> bytes:
    """An empty ping; the relay injects these only between frames."""
    return bytes([0x80 | OP_PING, 0x80]) + os.urandom(4) if masked else b"\x89\x00"


class TooBig(Exception):
    """A message exceeds the size cap; ``offset`` is where its frame starts in the chunk."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


@dataclass(slots=True)
class FrameEvent:
    """A data frame that started in the chunk just scanned (opcode 0: a continuation).

    Valid during the hook call that receives it: on the fast path the
    scanner reuses one event object for every chunk.
    """

    opcode: int
    length: int
    fin: bool
    head: bytes  # first up to PEEK payload bytes present in this chunk (unmasked)
    tail: bytes  # last up to 64 payload bytes, when the frame ended in this chunk


class FrameScanner:
    """Follows frame boundaries in one direction of a WebSocket byte stream.

    Invariant: after :meth:`scan`, ``at_boundary`` tells whether the bytes
    seen so far end exactly between two frames, which is the only place a
    frame of the broker's own may be inserted.
    """

    __slots__ = (
        "_ev",
        "_fast",
        "_fast_list",
        "_head",
        "_mask",
        "_offset",
        "_opcode",
        "_remaining",
        "close_code",
        "closed",
        "masked",
        "max_message",
        "message_length",
    )

    def __init__(self, *, masked: bool, max_message: int) -> None:
        self.masked = masked
        self.max_message = max_message
        self.message_length = 0
        #: Sticky: a close frame has passed (and the code it carried, if any).
        self.closed = False
        self.close_code: int | None = None
        self._head = b""  # an incomplete frame header carried to the next chunk
        self._remaining = 0  # payload bytes of the current frame still to come
        self._offset = 0  # payload bytes of the current frame already seen
        self._opcode = 0
        self._mask = b""
        self._ev: FrameEvent | None = None
        # The fast path's event and list, reused for every chunk (no allocation).
        self._fast = FrameEvent(OP_TEXT, 0, True, b"", b"")
        self._fast_list = [self._fast]

    @property
    def at_boundary(self) -> bool:
        """True when no frame is partly seen."""
        return self._remaining == 0 and not self._head

    def adopt(self, remaining: int, opcode: int, mask: bytes, offset: int) -> None:
        """Continue a data frame that someone else (the engine) scanned the start of:
        ``remaining`` payload bytes are still to come, ``offset`` have passed. Its
        peeks were taken then, so no event is made for it again."""
        self._head = b""
        self._remaining = remaining
        self._offset = offset
        self._opcode = opcode
        self._mask = mask
        self._ev = None
        self.message_length = 0  # the engine takes only unfragmented frames

    @property
    def mid_message(self) -> bool:
        """True inside a frame or a fragmented message: the next chunk continues it."""
        return self._remaining != 0 or bool(self._head) or self.message_length != 0

    def scan(self, data: bytes) -> list[FrameEvent]:
        """Walk ``data``: the data frames that start in it, in order (``closed`` and
        ``close_code`` tell about close frames). Raises :class:`TooBig` before
        passing an oversized frame."""
        # Fast path, the common case on a kernel socket: the chunk is exactly
        # one whole, unfragmented data frame with a 7- or 16-bit length.
        if not self._remaining and not self._head and not self.message_length:
            n = len(data)
            if n >= 2:
                b0 = data[0]
                b1 = data[1]
                length = b1 & 0x7F
                at = 2
                if length == 126 and n >= 4:
                    length = (data[2] << 8) | data[3]
                    at = 4
                if (b1 & 0x7F) != 127 and b0 in (0x81, 0x82):
                    if b1 & 0x80:
                        mask = data[at:at + 4]
                        at += 4
                    else:
                        mask = b""
                    if at + length == n:
                        if length > self.max_message:
                            raise TooBig(0)
                        head = data[at:at + PEEK]
                        tail = data[max(at, n - 64):] if length > PEEK else b""
                        if mask:
                            head = unmask(head, mask, 0)
                            if tail and b'"channel"' not in head:
                                tail = unmask(tail, mask, len(data) - len(tail) - at)
                            else:
                                tail = b""
                        ev = self._fast
                        ev.opcode = b0 & 0x0F
                        ev.length = length
                        ev.head = head
                        ev.tail = tail
                        return self._fast_list
        frames: list[FrameEvent] = []
        pos = 0
        end = len(data)
        if self._head:
            data = self._head + data
            pos, end = 0, len(data)
            base = len(self._head)
            self._head = b""
        else:
            base = 0
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                self._observe(data, pos, take)
                pos += take
                continue
            # A frame header: 2 bytes, + 2 or 8 of length, + 4 of mask.
            if end - pos < 2:
                self._head = data[pos:end]
                break
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            need = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0)
            if end - pos < need:
                self._head = data[pos:end]
                break
            at = pos + 2
            if length == 126:
                length = int.from_bytes(data[at:at + 2], "big")
                at += 2
            elif length == 127:
                length = int.from_bytes(data[at:at + 8], "big")
                at += 8
            self._mask = data[at:at + 4] if b1 & 0x80 else b""
            opcode = b0 & 0x0F
            if opcode < OP_CLOSE:  # data or continuation: counts towards the message
                total = length if opcode != OP_CONT else self.message_length + length
                if total > self.max_message:
                    raise TooBig(max(0, pos - base))
                self.message_length = 0 if b0 & 0x80 else total
                # Continuation frames are reported too (opcode 0): their bytes
                # count for limits and metrics even though no message starts.
                self._ev = FrameEvent(opcode, length, bool(b0 & 0x80), b"", b"")
                frames.append(self._ev)
            else:
                self._ev = None
                if opcode == OP_CLOSE:
                    self.closed = True
            self._opcode = opcode
            self._remaining = length
            self._offset = 0
            pos = at + len(self._mask)
            if length == 0:
                continue
            take = min(length, end - pos)
            self._observe(data, pos, take)
            pos += take
        return frames

    def _observe(self, data: bytes, pos: int, take: int) -> None:
        """Account for ``take`` payload bytes at ``pos``; peek where it is cheap."""
        ev = self._ev
        offset = self._offset
        if ev is not None:
            if offset < PEEK and not ev.head:
                chunk = data[pos:pos + min(take, PEEK - offset)]
                ev.head = unmask(chunk, self._mask, offset) if self._mask else chunk
            if take == self._remaining:  # the frame ends in this chunk
                start = max(pos, pos + take - 64)
                chunk = data[start:pos + take]
                ev.tail = (unmask(chunk, self._mask, offset + start - pos) if self._mask
                           else chunk)
        elif self._opcode == OP_CLOSE and offset == 0 and take >= 2:
            raw = data[pos:pos + 2]
            code = unmask(raw, self._mask, 0) if self._mask else raw
            if self.close_code is None:
                self.close_code = int.from_bytes(code, "big")
        self._offset = offset + take
        self._remaining -= take


# -- the upstream handshake -------------------------------------------------------------


class HandshakeRefused(Exception):
    """The upstream answered the upgrade with something other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class _Leg(asyncio.Protocol):
    """A transport's protocol that hands every event to its relay."""

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[tuple[bytes, bytes]] | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class UpstreamLeg(_Leg):
    """The broker's connection to the upstream kernel WebSocket."""

    def __init__(self) -> None:
        super().__init__()
        self._handshake = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_upstream(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        fut = self._handshake
        if fut is None or fut.done():
            return
        if end >= 0:
            fut.set_result((self._buffer[:end], self._buffer[end + 4:]))
            self._buffer = b""
        elif len(self._buffer) > _MAX_HANDSHAKE:
            fut.set_exception(ConnectionError("oversized upstream handshake"))

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.relay is not None:
            self.relay.leg_lost(self, exc)
        elif self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(ConnectionError("upstream closed during handshake"))

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause(self)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume(self)

    def take_buffered(self) -> bytes:
        """Bytes that arrived after the handshake, before a relay took the leg over."""
        data, self._buffer = self._buffer, b""
        return data

    async def handshake(self) -> tuple[bytes, bytes]:
        """The upstream's response head and whatever frame bytes followed it."""
        assert self._handshake is not None
        try:
            return await self._handshake
        finally:
            self._handshake = None  # not kept (with the response head) for the connection's life


class ClientLeg(_Leg):
    """Takes over the client's transport after aiohttp answered the upgrade."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay
        # The transport calls the relay directly (uvloop caches data_received
        # when the protocol is set): one Python call less per chunk.
        self.data_received = relay.from_client  # type: ignore[method-assign]

    def connection_lost(self, exc: BaseException | None) -> None:
        assert self.relay is not None
        self.relay.leg_lost(self, exc)

    def pause_writing(self) -> None:
        assert self.relay is not None
        self.relay.pause(self)

    def resume_writing(self) -> None:
        assert self.relay is not None
        self.relay.resume(self)


@dataclass
class Upstream:
    """An upstream WebSocket ready for relaying."""

    transport: asyncio.Transport
    leg: UpstreamLeg
    protocol: str | None
    leftover: bytes


async def connect_upstream(url: URL, headers: dict[str, str], protocols: list[str],
                           limit: float) -> Upstream:
    """Open the upstream WebSocket ourselves: a plain HTTP/1.1 upgrade, no extensions."""
    loop = asyncio.get_running_loop()
    secure = url.scheme in ("wss", "https")
    host = url.raw_host or "127.0.0.1"
    port = url.port or (443 if secure else 80)
    context = ssl.create_default_context() if secure else None
    async with asyncio.timeout(limit):
        transport, leg = await loop.create_connection(
            UpstreamLeg, host, port, ssl=context, server_hostname=host if secure else None)
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16)).decode()
            default_port = port == (443 if secure else 80)
            lines = [
                f"GET {url.raw_path_qs} HTTP/1.1",
                f"Host: {host if default_port else f'{host}:{port}'}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            if protocols:
                lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
            lines += [f"{name}: {value}" for name, value in headers.items()]
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head, leftover = await leg.handshake()
        except BaseException:
            transport.abort()
            raise
    status_line, _, rest = head.decode("latin-1").partition("\r\n")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status != 101:
        transport.abort()
        raise HandshakeRefused(status)
    answer: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, _, value = line.partition(":")
        answer[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324
    if answer.get("sec-websocket-accept") != expected or answer.get("sec-websocket-extensions"):
        transport.abort()
        raise ConnectionError("upstream WebSocket handshake is invalid")
    return Upstream(transport, leg, answer.get("sec-websocket-protocol") or None, leftover)


# -- the relay itself -------------------------------------------------------------------


class Hooks:
    """What the relay reports to, and asks of, the rest of the broker (all synchronous).

    Subclass and override; the defaults do nothing. Called from protocol
    callbacks, so they must not block.
    """

    __slots__ = ()

    #: Hooks whose per-frame work a :class:`~broker.proxy.tap.Tap` does set this to
    #: it; with the compiled Tap, the relay then lets the Tap relay whole frames
    #: itself, and calls ``on_event`` and ``limiter`` from there (see ``Relay``).
    tap: Any = None
    #: The client message limiter (``(bytes, messages) -> delay``), if any.
    limiter: Callable[[int, float], float] | None = None

    def on_event(self, flags: int) -> None:
        """The Tap's fast path saw a frame that needs Python (``tap.EXEC_*``, ``ACTIVITY``)."""

    def client_message(self, ev: FrameEvent) -> float:
        """A client data message started; return seconds to pause reading (rate limit)."""
        return 0.0

    def kernel_message(self, ev: FrameEvent) -> bool:
        """A kernel data message started (peeked head/tail in ``ev``).

        Returns whether the kernel is in the middle of answering (more small
        frames are coming): the relay then acknowledges the upstream's
        segments at once instead of letting the kernel's delayed-ACK timer
        hold the rest of the burst (see :func:`quickack_for`).
        """
        return False

    def finished(self, code: int, reason: str) -> None:
        """The relay ended, with the close code the client was given."""


#: Why a leg is paused (bits): the other leg's write buffer is full; the rate limit.
_BACKPRESSURE, _RATE = 1, 2


class Relay:
    """Pumps bytes between a client leg and an upstream leg until either ends.

    Slotted and allocation-free per message: thousands of idle connections
    each hold one of these.

    The flags a chunk updates (``ended``, the liveness flags, ``mid_reply``)
    live on a :class:`~broker.proxy.tap.Tap`: the hooks' own when they have
    one, else a private :class:`~broker.proxy.tap.PyTap`. When the hooks'
    Tap is the compiled one, it becomes both transports' ``data_received``
    and relays every chunk that is one whole frame between frames by itself;
    it hands all others to :meth:`from_client` and :meth:`from_upstream`,
    which are then told (``slow_client``, ``slow_upstream``) whether their
    scanner is in the middle of something the Tap must not touch.

    Where the engine runs (see :mod:`broker.proxy.tap`), the relay gives it the
    connection whenever both scanners are between frames, no write of the
    loop's own is pending and reading is not paused (:meth:`_give`), and takes
    it back before it writes anything itself (:meth:`_take`); what the engine
    hands back comes to :meth:`_from_engine`.
    """

    __slots__ = (
        "_bucket",
        "_client_paused",
        "_client_seen",
        "_closing",
        "_engine",
        "_engine_owned",
        "_fast",
        "_give_timer",
        "_heartbeat",
        "_holding",
        "_on_done",
        "_quickack",
        "_rate_timer",
        "_timer",
        "_upstream_close",
        "_upstream_paused",
        "_upstream_seen",
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

    def __init__(self, client: asyncio.Transport, upstream: Upstream, *, max_message: int,
                 heartbeat: float, hooks: Hooks,
                 on_done: Callable[[], None] | None = None,
                 max_client_message: int = 0) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.upstream = upstream.transport
        self.hooks = hooks
        # Clients may be held to a smaller cap than kernel output (0: the same).
        self.to_upstream = FrameScanner(masked=True,
                                        max_message=max_client_message or max_message)
        self.to_client = FrameScanner(masked=False, max_message=max_message)
        self.done: asyncio.Future[tuple[int, str]] = self.loop.create_future()
        self._on_done = on_done
        self._client_paused = self._upstream_paused = 0
        self._closing = False
        self._upstream_close: int | None = None
        self._heartbeat = heartbeat
        self._client_seen = self._upstream_seen = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        self.client_leg = ClientLeg(self)
        self.client_leg.transport = client
        self.upstream_leg = upstream.leg
        self.upstream_leg.relay = self
        self._quickack = quickack_for(self.upstream)
        tap = hooks.tap
        self._fast = tap is not None and hasattr(tap, "wire")
        self.tap: Any = tap if tap is not None else PyTap()
        if self._fast:
            tap.wire(self.upstream.write, client.write, self.from_client, self.from_upstream,
                     hooks.on_event, self._quickack, hooks.limiter, self._apply_delay,
                     self.to_upstream.max_message, self.to_client.max_message)
            self.client_leg.data_received = tap.from_client  # type: ignore[method-assign]
            self.upstream_leg.data_received = tap.from_upstream  # type: ignore[method-assign]
        else:
            self.upstream_leg.data_received = self.from_upstream  # type: ignore[method-assign]
        self.upstream.set_protocol(self.upstream_leg)  # (re-read by the transport)
        self._engine = self._engine_owned = self._holding = False
        self._give_timer: asyncio.TimerHandle | None = None
        # The limiter's buckets when the engine can charge them itself (a WsLimiter on
        # the engine's clock); with any other limiter, connections stay on the loop.
        limiter_of: Any = getattr(hooks.limiter, "__self__", None)
        self._bucket: Any = (limiter_of if hasattr(limiter_of, "buckets")
                             and limiter_of.buckets() is not None else None)
        if self._fast and (hooks.limiter is None or self._bucket is not None):
            self._engine = self._engage(tap)
        if heartbeat:
            self._timer = self.loop.call_later(heartbeat, self._beat)
        # Kernel output may follow the 101 at once (Jupyter replays what it
        # buffered for a reconnecting session): what came with the handshake,
        # then what arrived while the client's own handshake was answered.
        early = upstream.leftover + self.upstream_leg.take_buffered()
        upstream.leftover = b""
        if early:
            self.from_upstream(early)
        if self._engine:
            # On the loop's next turn: the caller finishes taking the client's socket
            # over (its protocol, aiohttp letting go) before the engine reads it.
            self.loop.call_soon(self._give)

    # -- the engine ------------------------------------------------------------------
    def _engage(self, tap: Any) -> bool:
        """Register both sockets with the engine, if it runs here and both legs are plain TCP."""
        sockets = []
        for transport in (self.client, self.upstream):
            if transport.get_extra_info("sslcontext") is not None:
                return False
            sock = transport.get_extra_info("socket")
            if sock is None:
                return False
            sockets.append(sock.fileno())
        if not engine_for(self.loop):
            return False
        tap.engage(sockets[0], sockets[1], self._from_engine, self._quickack is not None)
        return True

    def _give(self) -> None:
        """Let the engine relay from now on, if the connection is in its steady state."""
        if not self._engine or self._engine_owned or self._holding:
            return
        tap = self.tap
        if (tap.ended or self._closing or self._upstream_close is not None or tap.slow_client
                or tap.slow_upstream or self._client_paused or self._upstream_paused):
            return
        if self.client.get_write_buffer_size() or self.upstream.get_write_buffer_size():
            # The loop's own bytes go first; try again once the transports sent them.
            if self._give_timer is None:
                self._give_timer = self.loop.call_later(0.01, self._retry_give)
            return
        self.client.pause_reading()
        self.upstream.pause_reading()
        self._engine_owned = True
        tap.limit(self._bucket.buckets() if self._bucket is not None else None)
        tap.give()

    def _retry_give(self) -> None:
        self._give_timer = None
        self._give()

    def _take(self) -> None:
        """Read (and write) from the loop again; handle whatever the engine had queued."""
        if not self._engine_owned:
            return
        self._holding = True
        try:
            self.tap.take()  # runs _from_engine first if something was queued
        finally:
            self._holding = False
        if self._engine_owned:  # nothing was handed back: resume here
            self._engine_owned = False
            self._resume_legs()

    def _resume_legs(self) -> None:
        for transport in (self.client, self.upstream):
            if not transport.is_closing():
                transport.resume_reading()

    def _from_engine(self, pending: tuple[Any, ...]) -> None:
        """What the engine queued: executions and activity for the hooks, and, when it
        handed the connection back, where its scanners are, the bytes it relayed that a
        peer did not take yet, and a chunk it did not relay."""
        starts, ends, activity, back, leg, rests, chunk, mid, bucket = pending
        on_event = self.hooks.on_event
        for _ in range(starts):
            on_event(EXEC_START)
        for _ in range(ends):
            on_event(EXEC_END)
        if activity:
            on_event(ACTIVITY)
        if back == BACK_NONE:
            return
        self._engine_owned = False
        tap = self.tap
        if bucket is not None and self._bucket is not None:  # what the engine charged
            self._bucket.restore(*bucket)
        if mid is not None:
            for scanner, frame in zip((self.to_upstream, self.to_client), mid, strict=True):
                if frame is not None:  # the engine is in the middle of a frame on this leg
                    scanner.adopt(*frame)
            tap.slow_client = self.to_upstream.mid_message
            tap.slow_upstream = self.to_client.mid_message
        if tap.ended:
            return
        self._resume_legs()
        if rests is not None:
            for transport, rest in zip((self.client, self.upstream), rests, strict=True):
                if rest:  # what the engine relayed that the peer did not take yet
                    transport.write(rest)
        if back == BACK_END:
            # A stream ended or failed. The transports read that themselves and end the
            # relay; the engine never gets this connection again.
            self._engine = False
            return
        if chunk:  # what only the loop handles: a control frame, a fragment...
            (tap.from_client if leg == 0 else tap.from_upstream)(chunk)
        self._give()

    # -- data ----------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        tap = self.tap
        if tap.ended:
            return
        tap.client_active = True
        scanner = self.to_upstream
        try:
            frames = scanner.scan(data)
        except TooBig as big:
            self.upstream.write(data[:big.offset])
            self.finish(1009, "message too big")
            return
        if self._fast:
            tap.slow_client = scanner.mid_message
        self.upstream.write(data)
        delay = 0.0
        client_message = self.hooks.client_message
        for ev in frames:
            wait = client_message(ev)
            if wait:
                # A close (negative) must survive the answers for later frames of this read.
                delay = wait if wait < 0 or delay < 0 else max(delay, wait)
        if scanner.closed:
            self._closing = True
        if delay:
            self._apply_delay(delay)
        if self._engine and not self._engine_owned:
            self._give()

    def _apply_delay(self, delay: float) -> None:
        """What the limiter answered for a client message: pause reading, or close."""
        if delay < 0:  # the limiter says: sustained abuse
            self.finish(1008, "message rate limit exceeded")
        elif delay > 0:
            self._pause_for_rate(delay)

    def from_upstream(self, data: bytes) -> None:
        tap = self.tap
        if tap.ended:
            return
        tap.upstream_active = True
        scanner = self.to_client
        try:
            frames = scanner.scan(data)
        except TooBig as big:
            self.client.write(data[:big.offset])
            self.finish(1009, "kernel message too big")
            return
        if self._fast:
            tap.slow_upstream = scanner.mid_message
        self.client.write(data)
        if frames:
            kernel_message = self.hooks.kernel_message
            for ev in frames:
                mid_reply = kernel_message(ev)
            tap.mid_reply = mid_reply
        if tap.mid_reply and self._quickack is not None:
            self._quickack()
        if scanner.close_code is not None:
            self._upstream_close = scanner.close_code
        if self._engine and not self._engine_owned:
            self._give()

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
        if not after and self._engine:
            self._give()

    def pause(self, leg: _Leg) -> None:
        """``leg``'s write buffer is full: stop reading from the other side."""
        self._set_paused(leg is not self.client_leg, _BACKPRESSURE, True)

    def resume(self, leg: _Leg) -> None:
        self._set_paused(leg is not self.client_leg, _BACKPRESSURE, False)

    def _pause_for_rate(self, delay: float) -> None:
        self._set_paused(True, _RATE, True)
        if self._rate_timer is not None:
            self._rate_timer.cancel()
        self._rate_timer = self.loop.call_later(delay, self._set_paused, True, _RATE, False)

    # -- heartbeat ---------------------------------------------------------------------
    def _beat(self) -> None:
        tap = self.tap
        if tap.ended:
            return
        self._take()  # the pings are written from here
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
        if self.to_client.at_boundary:
            self.client.write(ping_frame(masked=False))
        if self.to_upstream.at_boundary:
            self.upstream.write(ping_frame(masked=True))
        self._timer = self.loop.call_later(self._heartbeat, self._beat)
        self._give()

    # -- ending ------------------------------------------------------------------------

    def leg_lost(self, leg: _Leg, exc: BaseException | None) -> None:
        if leg is self.client_leg:
            self.finish(1000 if self._closing else 1001, "client closed")
        else:
            code = self._upstream_close
            if code is None or code in (1005, 1006, 1015):
                self.finish(1011, "kernel connection lost")
            else:
                self.finish(code, "kernel connection closed")

    def finish(self, code: int, reason: str) -> None:
        """End both legs: a close frame where one may still be sent, then the TCP close."""
        tap = self.tap
        if tap.ended:
            return
        self._take()  # what the engine queued comes first; then the loop writes the closes
        if tap.ended:
            return
        tap.ended = True
        if self._fast:
            tap.unwire()  # its callables hold this relay: no cycle outlives it
        for timer in (self._timer, self._rate_timer, self._give_timer):
            if timer is not None:
                timer.cancel()
        if not self.client.is_closing() and self.to_client.at_boundary \
                and self._upstream_close is None:
            self.client.write(close_frame(code, reason, masked=False))
        if not self.upstream.is_closing() and self.to_upstream.at_boundary and not self._closing:
            self.upstream.write(close_frame(1000 if code in (1001, 1000) else code, reason,
                                            masked=True))
        if self._quickack is not None:
            # The socket object shares the transport's descriptor: let go of it
            # without closing, before the transport closes the descriptor itself.
            self._quickack.sock.detach()  # type: ignore[attr-defined]
            self._quickack = None
        self.upstream.close()
        self.client.close()  # after the close frame: a transport flushes before closing
        self.done.set_result((code, reason))
        self.hooks.finished(code, reason)
        if self._on_done is not None:
            self._on_done()


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
