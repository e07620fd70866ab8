"""Whole messages over an upstream kernel WebSocket, for the broker's own kernel client.

The relay forwards kernel WebSockets as bytes; the agent's kernel client
(:mod:`broker.agent.kernel_client`) instead speaks the protocol itself: it
sends ``execute_request`` messages and reads the replies. It opens its
socket the way the relay does (:meth:`broker.upstream.session.SessionUpstream.websocket`,
one handshake for both) and this protocol takes the connection over after
the upgrade. Frames are built with the relay's own wire module
(:mod:`broker.proxy.wire`: masking, close and ping frames), so there is one
implementation of the per-frame work and no second WebSocket client.

What it does, as RFC 6455 asks of a client
(docs/protocols.md#websocket-framing-rfc-6455): its frames are masked with a
fresh key; the server's must not be (else 1002); fragmented messages are
put together; pings are answered; a close is answered and ends the socket;
a message over ``max_message`` bytes closes it with 1009. With a
``heartbeat``, a ping goes out every ``heartbeat`` seconds and a server
silent for twice that (plus 5 s, as the relay allows) ends the socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from types import ModuleType

from broker.proxy import wire
from broker.upstream.websocket import Handshaking

#: One message: its opcode (``OP_TEXT`` or ``OP_BINARY``) and payload.
Message = tuple[int, bytes]


class KernelSocket(Handshaking):
    """An upstream WebSocket read as messages (:meth:`receive`) and written by :meth:`send_text`."""

    def __init__(self, *, max_message: int = 0, heartbeat: float = 0.0,
                 module: ModuleType | None = None) -> None:
        super().__init__()
        self._w = module if module is not None else wire.select()
        self.max_message = max_message
        self._heartbeat = heartbeat
        self._started = False
        self._data = bytearray()
        self._parts: list[bytes] = []
        self._opcode = 0  # the opcode of the fragmented message in progress
        self._size = 0
        self._messages: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._heard = False
        self._last_heard = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: (code, reason) once the socket ended; None while it is open.
        self.ended: tuple[int, str] | None = None

    # -- after the handshake ------------------------------------------------------------
    def start(self, leftover: bytes) -> None:
        """Take the connection over (``leftover``: frame bytes that came with the 101)."""
        self._started = True
        early = leftover + self.take_buffered()
        if early:
            self._feed(early)
        if self._lost:
            self._end(1006, "connection lost")
        elif self._heartbeat and self.ended is None:
            loop = asyncio.get_running_loop()
            self._last_heard = loop.time()
            self._timer = loop.call_later(self._heartbeat, self._beat)

    @property
    def closed(self) -> bool:
        """True once the socket ended (closed by either side, or lost)."""
        return self.ended is not None

    async def receive(self) -> Message | None:
        """The next message; None once the socket ended and every message was read."""
        while not self._messages:
            if self.ended is not None:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    def send_text(self, text: str) -> None:
        """Send one text message (raises ``ConnectionError`` once the socket ended)."""
        self._send(self._w.OP_TEXT, text.encode())

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame and end the socket (a transport flushes before it closes)."""
        if self.ended is None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._w.close_frame(code, reason, masked=True))
        self._end(code, reason)

    # -- the transport's callbacks ------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._started:
            self._feed(data)
        else:
            super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._started:
            self._end(1006, "connection lost")
        else:
            super().connection_lost(exc)

    # -- internals --------------------------------------------------------------------------
    def _send(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if self.ended is not None or transport is None or transport.is_closing():
            raise ConnectionError("the kernel WebSocket is closed")
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 1 << 16:
            head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        key = os.urandom(4)
        transport.write(head + key + self._w.mask(payload, key))

    def _feed(self, data: bytes) -> None:
        """Parse every whole frame buffered; keep the rest for the next read."""
        if self.ended is not None:
            return
        self._heard = True
        buf = self._data
        buf += data
        w = self._w
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            at = pos + 2
            if length >= 126:
                size = 2 if length == 126 else 8
                if end - at < size:
                    break
                length = int.from_bytes(buf[at:at + size], "big")
                at += size
            opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
            if b1 & 0x80 or b0 & 0x70:
                self._fail(1002, "masked or reserved bits in a server frame")
                return
            if self.max_message and opcode < w.OP_CLOSE \
                    and self._size + length > self.max_message:
                self._fail(1009, "message too big")
                return
            if end - at < length:
                break
            payload = bytes(buf[at:at + length])
            pos = at + length
            if not self._frame(opcode, fin, payload):
                return
        del buf[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> bool:
        """One whole frame; False when it ended the socket."""
        w = self._w
        if opcode == w.OP_PING:
            with contextlib.suppress(ConnectionError):
                self._send(w.OP_PONG, payload)
            return True
        if opcode == w.OP_PONG:
            return True
        if opcode == w.OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            reason = payload[2:].decode("utf-8", "replace")
            self.ended = (code, reason)  # (close() answers, and keeps this)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(w.close_frame(
                    code if w.valid_close_code(code) else 1000, "", masked=True))
            self._end(code, reason)
            return False
        if opcode == w.OP_CONT:
            if not self._parts:
                self._fail(1002, "continuation frame outside a fragmented message")
                return False
        elif opcode in (w.OP_TEXT, w.OP_BINARY):
            if self._parts:
                self._fail(1002, "new message inside a fragmented message")
                return False
            self._opcode = opcode
        else:
            self._fail(1002, "unknown opcode")
            return False
        if not fin:
            self._parts.append(payload)
            self._size += len(payload)
            return True
        if self._parts:
            self._parts.append(payload)
            payload = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
        self._messages.append((self._opcode, payload))
        self._wake()
        return True

    def _fail(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def _end(self, code: int, reason: str) -> None:
        if self.ended is None:
            self.ended = (code, reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _beat(self) -> None:
        """Ping; end a socket whose server stayed silent for two beats and 5 s."""
        self._timer = None
        if self.ended is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._heard:
            self._heard = False
            self._last_heard = now
        elif now - self._last_heard > 2 * self._heartbeat + 5:
            self.close(1011, "kernel connection lost")
            return
        with contextlib.suppress(ConnectionError):
            self._send(self._w.OP_PING, b"")
        self._timer = loop.call_later(self._heartbeat, self._beat)

