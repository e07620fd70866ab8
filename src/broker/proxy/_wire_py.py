"""The kernel WebSocket relay's per-frame work: one implementation, in Python.

This module is the single source of what the relay does per chunk of bytes:
follow frame boundaries (:class:`FrameScanner`), check client frames as a
server must (RFC 6455 section 5), peek at the few bytes that say what a
message is, keep the tallies and reply tracking of a connection
(:class:`Tap`), and forward the chunk (:class:`Pump`). ``relay.py`` owns the
connection's life (handshakes, heartbeats, flow control, closing) and calls
into here only through :class:`Pump` objects, which become the transports'
``data_received``.

Why one module and how it is fast: ``_wire_c.py`` is this very file (a
symbolic link, aiohttp's ``reader_py.py``/``reader_c.py`` pattern), which
``setup.py`` compiles with Cython when Cython and a C compiler are there
(``_wire_c.pxd`` adds the C types). Without them the package still installs
and ``broker.proxy.wire`` runs this file as Python: the same behaviour, more
CPU per frame. ``tests/proxy/test_wire.py`` runs both on the same random
streams. Keep this file plain Python that Cython compiles as it is: no
``cython`` import, no ``dataclass``, module-level constants only.
"""

from __future__ import annotations

import codecs
import importlib.machinery
import os
from collections.abc import Callable
from typing import Any

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
#: How far into a client payload the relay looks for a message type or channel.
PEEK = 512
#: Kernel frames are peeked further: an iopub ``status`` names the request it
#: ends in its ``parent_header``, some 400-900 bytes in.
KERNEL_PEEK = 2048
TAIL = 64

#: Bits of the answer of ``Tap.client_frame`` / ``Tap.kernel_frame``.
EXEC_START = 1  # an execute_request went to the kernel: start timing it
EXEC_END = 2  # an execute_reply came back on shell: stop the oldest timing
ACTIVITY = 4  # activity while no flush timer runs: note it now and start one
MID_REPLY = 8  # the kernel is mid-reply: acknowledge its segments at once
EVENTS = EXEC_START | EXEC_END | ACTIVITY

#: Direction indices of the tallies (``broker.metrics.Direction`` order).
TO_KERNEL, TO_CLIENT = 0, 1
#: Channel indices of the tallies (``broker.metrics.CHANNELS`` order).
CHANNELS = ("shell", "iopub", "stdin", "control", "other")
SHELL, IOPUB, STDIN, CONTROL, OTHER = 0, 1, 2, 3, 4
_CHANNEL_INDEX = {b"shell": SHELL, b"iopub": IOPUB, b"stdin": STDIN, b"control": CONTROL}
#: Requests counted as awaiting their reply (or idle status), at most: a kernel that
#: never answers only keeps the quick ACKs on.
MAX_OWED = 64
#: Kernel states after which no reply of the old kernel is owed any more.
_FRESH_STATES = (b"starting", b"restarting", b"dead")

#: Whether this file runs as the compiled ``_wire_c`` (its ``__file__`` is then the built
#: extension, as ``wire.py`` checks it): the one place where the two builds take
#: different code, in :func:`mask`.
_COMPILED = __file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))

#: Close codes a client may send (RFC 6455 section 7.4): 1000-1003, 1007-1014, 3000-4999.
_NO_CODE = -1


def valid_close_code(code: int) -> bool:
    """Whether a peer may put ``code`` in a close frame (1005, 1006, 1015 never go on the wire)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """``data`` XORed with the 4-byte ``key``, starting ``offset`` bytes into a payload.

    Masking and unmasking are the same operation. Compiled, ``out`` and ``k``
    are C pointers (``_wire_c.pxd``) and this is a byte loop in C, about a
    fifth of the instructions of the big-integer XOR below (three calls that
    each convert the payload), which is what the interpreter runs instead: a
    byte loop there would be a hundred times slower.
    """
    if len(key) != 4:  # (the compiled loop reads four bytes of it)
        raise ValueError("a WebSocket masking key is 4 bytes")
    n = len(data)
    if not n:
        return b""
    shift = offset & 3
    if shift:
        key = key[shift:] + key[:shift]
    if _COMPILED:
        result = bytearray(data)
        out = result
        k = key
        for i in range(n):
            out[i] ^= k[i & 3]
        return bytes(result)
    keys = key * ((n >> 2) + 1)
    return (int.from_bytes(data, "little")
            ^ int.from_bytes(keys[:n], "little")).to_bytes(n, "little")


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame; masked for the upstream (we are its client), plain for the client."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    if not masked:
        return bytes([0x80 | OP_CLOSE, len(payload)]) + payload
    key = os.urandom(4)
    return bytes([0x80 | OP_CLOSE, 0x80 | len(payload)]) + key + mask(payload, key)


def ping_frame(*, masked: bool) -> bytes:
    """An empty ping; the relay injects these only between frames."""
    return bytes([0x80 | OP_PING, 0x80]) + os.urandom(4) if masked else b"\x89\x00"


# -- peeks ---------------------------------------------------------------------------------


def channel_of(opcode: int, head: bytes, tail: bytes) -> int:
    """The channel index of a frame from its peeked bytes (:data:`OTHER` if unseen).

    v1 binary frames name the channel in the offsets table at the start;
    jupyter_server's JSON writes ``"channel"`` last, so the tail is looked at first.
    """
    if opcode == OP_BINARY:
        if len(head) >= 24:
            start = int.from_bytes(head[8:16], "little")
            stop = int.from_bytes(head[16:24], "little")
            if stop <= len(head):
                return _CHANNEL_INDEX.get(head[start:stop], OTHER)
        return OTHER
    text = tail
    at = text.rfind(b'"channel"') if text else -1
    if at < 0:
        text = head
        at = text.rfind(b'"channel"')
        if at < 0:
            return OTHER
    value = _quoted(text, at + 9)
    return OTHER if value is None else _CHANNEL_INDEX.get(value, OTHER)


def _quoted(text: bytes, start: int) -> bytes | None:
    """The first double-quoted string at or after ``start`` in ``text``.

    Walked byte by byte rather than with ``bytes.find``: the strings looked
    for sit a few bytes after their key and are a few bytes long, and the
    compiled build turns this loop into C (a method call costs it more than
    the whole walk; interpreted, the two cost about the same here).
    """
    n = len(text)
    quote = start
    while quote < n and text[quote] != 0x22:  # '"'
        quote += 1
    close = quote + 1
    while close < n and text[close] != 0x22:
        close += 1
    return text[quote + 1:close] if close < n else None


def state_of(head: bytes, tail: bytes) -> bytes | None:
    """The ``execution_state`` of a kernel status message (``b"busy"``, ``b"idle"``...).

    The content of a status message is the last part of both the v1 frame and
    jupyter_server's JSON, so the peeked tail has it; short frames are whole
    in the head. ``None`` when the frame is not a status message.
    """
    for text in (tail, head):
        at = text.rfind(b'"execution_state"')
        if at >= 0:
            return _quoted(text[at + 17:at + 40], 0)
    return None


def msg_id_of(head: bytes) -> bytes | None:
    """The first ``msg_id`` in a client request's peeked bytes: its header's (clients send
    an empty ``parent_header``), which the kernel's replies and statuses carry as parent."""
    at = head.find(b'"msg_id"')
    if at < 0:
        return None
    value = _quoted(head, at + 8)
    return value if value else None


# -- the tallies and reply tracking of one connection --------------------------------------


class Tap:
    """Per-connection state the relay and its hooks update for every kernel message.

    Attributes: ``ended`` (the relay finished: drop whatever still arrives),
    ``client_active`` / ``upstream_active`` (data arrived since the last
    heartbeat), ``mid_reply`` (the last kernel frames' answer), ``busy``,
    ``owed`` (replies awaited), ``owed_idle`` (idle statuses awaited),
    ``awaiting`` (the msg_ids of execute_requests whose idle status has not
    come), ``ticking`` (a flush timer runs) and ``dirty`` (activity came while
    it ran). Slotted: idle connections are many.
    """

    __slots__ = ("_counts", "awaiting", "busy", "client_active", "dirty", "ended", "mid_reply",
                 "owed", "owed_idle", "ticking", "upstream_active")

    def __init__(self) -> None:
        self.ended = False
        self.client_active = False
        self.upstream_active = False
        self.mid_reply = False
        self.busy = False
        self.ticking = False
        self.dirty = False
        self.owed = 0
        self.owed_idle = 0
        self.awaiting: list[bytes] = []
        # [direction * 5 + channel] -> messages, bytes (flat: one list per connection)
        self._counts = [0] * 20

    def take_counts(self) -> list[tuple[int, int, int, int]]:
        """The non-zero tallies as ``(direction, channel, messages, bytes)``, reset to zero."""
        taken = []
        counts = self._counts
        for i in range(10):
            if counts[2 * i] or counts[2 * i + 1]:
                taken.append((i // 5, i % 5, counts[2 * i], counts[2 * i + 1]))
                counts[2 * i] = counts[2 * i + 1] = 0
        return taken

    def _activity(self) -> int:
        if self.ticking:
            self.dirty = True
            return 0
        return ACTIVITY

    def client_frame(self, opcode: int, length: int, head: bytes, tail: bytes) -> int:
        """A client data frame started (opcode 0: a continuation, bytes only)."""
        counts = self._counts
        if opcode == OP_CONT:
            counts[2 * OTHER + 1] += length
            return 0
        channel = channel_of(opcode, head, tail)
        counts[2 * channel] += 1
        counts[2 * channel + 1] += length
        flags = 0
        # (``head.find(x) >= 0``, not ``x in head``: CPython 3.11 first tries a bytes
        # operand of ``in`` as an integer, building and dropping a TypeError each time.)
        # An execute_request is a request: the second search only runs after the first hit.
        if (channel in (SHELL, CONTROL) or opcode == OP_TEXT) and head.find(b'_request"') >= 0:
            if self.owed < MAX_OWED:
                self.owed += 1
                self.owed_idle += 1
            if head.find(b'"execute_request"') >= 0:
                flags = EXEC_START | self._activity()
                msg_id = msg_id_of(head)
                if msg_id is not None and len(self.awaiting) < MAX_OWED:
                    self.awaiting.append(msg_id)
        return flags

    def kernel_frame(self, opcode: int, length: int, head: bytes, tail: bytes) -> int:
        """A kernel data frame started; :data:`MID_REPLY` is set while a reply is under way:
        a request awaits its reply or its idle status, or the kernel says it is busy."""
        counts = self._counts
        flags = 0
        if opcode == OP_CONT:
            counts[10 + OTHER * 2 + 1] += length
        else:
            channel = channel_of(opcode, head, tail)
            counts[10 + 2 * channel] += 1
            counts[10 + 2 * channel + 1] += length
            if channel == IOPUB:
                state = state_of(head, tail)
                if state is not None:
                    self.busy = state == b"busy"
                    if state == b"idle":
                        self._idle(head)
                    elif state in _FRESH_STATES:
                        self.owed = self.owed_idle = 0
                        self.awaiting.clear()
            elif channel in (SHELL, CONTROL) and head.find(b'_reply"') >= 0:
                if self.owed:
                    self.owed -= 1
                if channel == SHELL and head.find(b'"execute_reply"') >= 0:
                    flags = EXEC_END
            flags |= self._activity()
        if self.busy or self.owed or self.owed_idle or self.awaiting:
            flags |= MID_REPLY
        return flags

    def _idle(self, head: bytes) -> None:
        """An idle status: it ends the request it names as parent (an execute_request we
        saw, or one idle owed); the idle of a request of someone else ends nothing."""
        awaiting = self.awaiting
        for i in range(len(awaiting)):
            if head.find(awaiting[i]) >= 0:
                del awaiting[i]
                if self.owed_idle:
                    self.owed_idle -= 1
                return
        if self.owed_idle > len(awaiting):  # requests other than execute: counted only
            self.owed_idle -= 1


# -- frames --------------------------------------------------------------------------------


class FrameEvent:
    """A data frame that started in the chunk just scanned (opcode 0: a continuation).

    ``head``: its first payload bytes present in the chunk (unmasked);
    ``tail``: its last :data:`TAIL` bytes, when it ended in this chunk and was
    longer than the peek. Valid during the call that receives it: the fast
    path reuses one event for every chunk.
    """

    __slots__ = ("fin", "head", "length", "opcode", "tail")

    def __init__(self, opcode: int, length: int, fin: bool, head: bytes, tail: bytes) -> None:
        self.opcode = opcode
        self.length = length
        self.fin = fin
        self.head = head
        self.tail = tail


class FrameScanner:
    """Follows frame boundaries in one direction of a WebSocket byte stream.

    ``server=True`` (the client -> broker leg) checks every frame as an
    RFC 6455 server must: masked, no RSV bits (no extension is negotiated), a
    known opcode, control frames final and at most 125 bytes, continuation
    frames only inside a fragmented message and data frames never inside one,
    a close code a peer may send, valid UTF-8 in text messages and close
    reasons. The first violation stops the scan: ``error`` holds the close code
    (1002, 1007, or 1009 for a message over ``max_message``) and its reason,
    ``error_at`` where in the chunk the offending frame starts (nothing from
    there on may be forwarded).

    Invariant: after :meth:`scan`, ``at_boundary`` tells whether the bytes seen
    so far end exactly between two frames, the only place a frame of the
    broker's own may be inserted.
    """

    __slots__ = ("_close", "_ev", "_fast", "_fast_list", "_fragmented", "_head", "_key",
                 "_offset", "_opcode", "_peek", "_remaining", "_text", "_utf8", "clean_cut",
                 "close_code", "closed", "error", "error_at", "error_reason", "max_message",
                 "message_length", "server")

    def __init__(self, *, server: bool, max_message: int) -> None:
        self.server = server
        self.max_message = max_message
        self._peek = PEEK if server else KERNEL_PEEK
        #: Payload bytes of the fragmented message in progress so far.
        self.message_length = 0
        self._fragmented = False  # a fragmented message is in progress
        #: Sticky: a close frame has passed (and the code it carried, if any).
        self.closed = False
        self.close_code: int | None = None
        self.error = 0
        self.error_reason = ""
        self.error_at = 0
        #: The refused frame starts in the refusing chunk: what was forwarded ends
        #: between frames, so a close frame may follow it.
        self.clean_cut = False
        self._head = b""  # an incomplete frame header carried to the next chunk
        self._remaining = 0  # payload bytes of the current frame still to come
        self._offset = 0  # payload bytes of the current frame already seen
        self._opcode = 0
        self._key = b""
        self._text = False  # server side: the message in progress is text
        self._utf8: Any = None  # server side: its incremental UTF-8 decoder
        self._close = b""  # a close frame's payload, gathered
        self._ev: FrameEvent | None = None
        self._fast = FrameEvent(OP_TEXT, 0, True, b"", b"")
        self._fast_list = [self._fast]

    @property
    def at_boundary(self) -> bool:
        """True when no frame is partly seen."""
        return self._remaining == 0 and not self._head

    @property
    def mid_message(self) -> bool:
        """True inside a frame or a fragmented message: the next chunk continues it."""
        return self._remaining != 0 or bool(self._head) or self._fragmented

    def _fail(self, code: int, reason: str, at: int) -> None:
        self.error = code
        self.error_reason = reason
        self.error_at = at if at > 0 else 0
        self.clean_cut = at >= 0

    def scan(self, data: bytes) -> list[FrameEvent]:
        """Walk ``data``: the data frames that start in it, in order, up to the first
        violation (``error``); ``closed`` and ``close_code`` tell about close frames."""
        if self.error:
            return []
        if not self._remaining and not self._head and not self._fragmented:
            fast = self._whole_frame(data)
            if fast is not None:
                return fast
        frames: list[FrameEvent] = []
        base = len(self._head)
        if base:
            data = self._head + data
            self._head = b""
        pos = 0
        end = len(data)
        while pos < end:
            if self._remaining:
                take = self._remaining if self._remaining < end - pos else end - pos
                if not self._observe(data, pos, take, -1):  # (it began in an earlier chunk)
                    return frames
                pos += take
                continue
            # A frame header: 2 bytes, + 2 or 8 of length, + 4 of mask.
            if end - pos < 2:
                self._head = data[pos:end]
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            need = (2 + (2 if length == 126 else 8 if length == 127 else 0)
                    + (4 if b1 & 0x80 else 0))
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
            opcode = b0 & 0x0F
            fin = (b0 & 0x80) != 0
            if self.server and not self._check_header(b0, b1, opcode, fin, length, pos - base):
                return frames
            total = length if opcode != OP_CONT else self.message_length + length
            if total > self.max_message:  # (also bounds what a 64-bit length may claim)
                self._fail(1009, "message too big", pos - base)
                return frames
            self._key = data[at:at + 4] if b1 & 0x80 else b""
            if opcode < OP_CLOSE:  # data or continuation: counts towards the message
                self.message_length = 0 if fin else total
                self._fragmented = not fin
                if opcode != OP_CONT:
                    self._text = opcode == OP_TEXT
                    self._utf8 = None
                # Continuations are reported too (opcode 0): their bytes count for
                # limits and metrics even though no message starts.
                self._ev = FrameEvent(opcode, length, fin, b"", b"")
                frames.append(self._ev)
            else:
                self._ev = None
                self._close = b""
                if opcode == OP_CLOSE:
                    self.closed = True
            self._opcode = opcode
            self._remaining = length
            self._offset = 0
            start = pos - base
            pos = at + len(self._key)
            if length == 0:
                if not self._frame_done(start):
                    return frames
                continue
            take = length if length < end - pos else end - pos
            if not self._observe(data, pos, take, start):
                return frames
            pos += take
        return frames

    def _whole_frame(self, data: bytes) -> list[FrameEvent] | None:
        """The common case on a kernel socket: the chunk is exactly one whole, final text
        or binary frame with a 7- or 16-bit length. None: take the general path."""
        n = len(data)
        if n < 2:
            return None
        b0 = data[0]
        b1 = data[1]
        if b0 != 0x81 and b0 != 0x82:
            return None
        length = b1 & 0x7F
        at = 2
        if length == 127:
            return None
        if length == 126:
            if n < 4:
                return None
            length = (data[2] << 8) | data[3]
            at = 4
        if b1 & 0x80:
            at += 4
        elif self.server:
            return None  # unmasked: the general path says why it is refused
        if at + length != n or length > self.max_message:
            return None
        ev = self._fast
        ev.opcode = b0 & 0x0F
        ev.length = length
        peek = self._peek
        if b1 & 0x80:
            key = data[at - 4:at]
            if b0 == 0x81 and self.server:
                payload = mask(data[at:], key)
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return None
                ev.head = payload[:peek]
                ev.tail = payload[n - at - TAIL:] if length > peek else b""
                return self._fast_list
            ev.head = mask(data[at:at + peek], key)
            ev.tail = (mask(data[n - TAIL:], key, length - TAIL)
                       if length > peek and b'"channel"' not in ev.head else b"")
        else:
            ev.head = data[at:at + peek]
            ev.tail = data[n - TAIL:] if length > peek else b""
        return self._fast_list

    def _check_header(self, b0: int, b1: int, opcode: int, fin: bool, length: int,
                      start: int) -> bool:
        """A client frame header as RFC 6455 section 5 allows it; else ``error`` (1002)."""
        reason = ""
        if not b1 & 0x80:
            reason = "client frames must be masked"
        elif b0 & 0x70:
            reason = "reserved bits set without an extension"
        elif opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                reason = "unknown opcode"
            elif not fin or length > 125:
                reason = "control frames must be final and at most 125 bytes"
            elif opcode == OP_CLOSE and length == 1:
                reason = "close frame with a 1-byte payload"
        elif opcode > OP_BINARY:
            reason = "unknown opcode"
        elif opcode == OP_CONT:
            if not self._fragmented:
                reason = "continuation frame outside a fragmented message"
        elif self._fragmented:
            reason = "new message inside a fragmented message"
        if reason:
            self._fail(1002, reason, start)
            return False
        return True

    def _observe(self, data: bytes, pos: int, take: int, start: int) -> bool:
        """Account for ``take`` payload bytes at ``pos``; peek, check text and close
        payloads. False when the frame (starting at ``start``) is refused."""
        ev = self._ev
        offset = self._offset
        key = self._key
        last = take == self._remaining  # the frame ends in this chunk
        if ev is not None:
            if self.server and self._text:
                chunk = mask(data[pos:pos + take], key, offset)
                if self._utf8 is None:
                    self._utf8 = codecs.getincrementaldecoder("utf-8")()
                try:
                    self._utf8.decode(chunk, last and ev.fin)
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8 in a text message", start)
                    return False
                if offset < self._peek and not ev.head:
                    ev.head = chunk[:self._peek - offset]
                if last:
                    ev.tail = chunk[-TAIL:]
            else:
                if offset < self._peek and not ev.head:
                    chunk = data[pos:pos + min(take, self._peek - offset)]
                    ev.head = mask(chunk, key, offset) if key else chunk
                if last:
                    at = pos + take - TAIL if take > TAIL else pos
                    chunk = data[at:pos + take]
                    ev.tail = mask(chunk, key, offset + at - pos) if key else chunk
        elif self._opcode == OP_CLOSE:
            chunk = data[pos:pos + take]
            self._close += mask(chunk, key, offset) if key else chunk
        self._offset = offset + take
        self._remaining -= take
        return self._frame_done(start) if last else True

    def _frame_done(self, start: int) -> bool:
        """A frame ended: a close frame's payload is checked (server side) and noted."""
        if self._opcode != OP_CLOSE:
            return True
        payload = self._close
        self._close = b""
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else _NO_CODE
        if self.server:
            if code != _NO_CODE and not valid_close_code(code):
                self._fail(1002, "invalid close code", start)
                return False
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in a close reason", start)
                return False
        if self.close_code is None and code != _NO_CODE:
            self.close_code = code
        return True


# -- one direction of a relay --------------------------------------------------------------


class Pump:
    """One direction of a relayed connection: its :meth:`feed` is the reading transport's
    ``data_received``, and scans, forwards, tallies, charges the limiter and
    acknowledges in one call per chunk.

    What only the relay can do comes back through callbacks, off the common
    path: ``on_error(code, reason)`` (a refused or oversized frame: forward
    nothing from it on and close), ``on_delay(seconds)`` (the limiter's
    answer: pause reading, or close when negative), ``on_event(flags)``
    (execution timing and activity, the hooks' business).
    """

    __slots__ = ("_events", "from_client", "limiter", "on_delay", "on_error", "on_event",
                 "quickack", "scanner", "tap", "write")

    def __init__(self, *, from_client: bool, max_message: int, tap: Tap,
                 write: Callable[[bytes], Any], on_error: Callable[[int, str], Any],
                 on_delay: Callable[[float], Any], on_event: Callable[[int], Any],
                 limiter: Any = None, quickack: Callable[[], Any] | None = None) -> None:
        self.from_client = from_client
        self.scanner = FrameScanner(server=from_client, max_message=max_message)
        self.tap = tap
        self.write = write
        self.on_error = on_error
        self.on_delay = on_delay
        self.on_event = on_event
        self.limiter = limiter
        self.quickack = quickack
        self._events = EVENTS

    def feed(self, data: bytes) -> None:
        tap = self.tap
        if tap.ended:
            return
        scanner = self.scanner
        frames = scanner.scan(data)
        error = scanner.error
        if error:
            forward = data[:scanner.error_at]
            if forward:
                self.write(forward)
        else:
            self.write(data)
        if self.from_client:
            tap.client_active = True
            delay = 0.0
            limiter = self.limiter
            for ev in frames:
                flags = tap.client_frame(ev.opcode, ev.length, ev.head, ev.tail)
                if flags:
                    self.on_event(flags)
                if limiter is not None:
                    # Continuations are charged their bytes, not another message.
                    wait = limiter.take(ev.length, 1.0 if ev.opcode else 0.0)
                    if wait:
                        # A close (negative) survives the answers for later frames.
                        delay = wait if wait < 0.0 or delay < 0.0 else max(delay, wait)
            if error:
                self.on_error(error, scanner.error_reason)
            elif delay:
                self.on_delay(delay)
            return
        tap.upstream_active = True
        if frames:
            flags = 0
            for ev in frames:
                flags = tap.kernel_frame(ev.opcode, ev.length, ev.head, ev.tail)
                if flags & self._events:
                    self.on_event(flags & self._events)
            tap.mid_reply = (flags & MID_REPLY) != 0
        if tap.mid_reply and self.quickack is not None:
            self.quickack()
        if error:
            self.on_error(error, scanner.error_reason)
