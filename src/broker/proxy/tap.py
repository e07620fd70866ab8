"""Per-frame bookkeeping of a relayed kernel WebSocket, and its compiled fast path.

A :class:`Tap` holds what the relay and its hooks update for every kernel
message: liveness flags for the heartbeat, message and byte tallies per
direction and channel, and the reply tracking that decides quick ACKs
(see :class:`~broker.proxy.wsbridge.KernelHooks`). ``client_frame`` and
``kernel_frame`` apply one frame's peeked bytes to that state and answer
with :data:`EXEC_START`, :data:`EXEC_END`, :data:`ACTIVITY` and
:data:`MID_REPLY` bits, so the rare work (execution timing, activity
writes) stays in Python.

Two implementations share this interface:

- :class:`PyTap`, below: the reference, in Python.
- ``broker.proxy._tap.Tap``, in C (``_tap.c``), built when a compiler is
  there (``pip install`` does it; the build is optional). Besides the same
  state and methods it relays the common chunk itself: a chunk that is
  exactly one whole text or binary frame, between frames. Its ``from_client``
  and ``from_upstream`` become the transports' ``data_received``, so such a
  chunk is scanned, peeked, written on and tallied without a single Python
  frame; every other chunk goes to the relay's Python code, untouched.

Why C: per round trip of a small message, the relay's own Python work
(header scan, channel peek, tallies, reply tracking) was about 5 µs, a
fifth of the broker's CPU and the whole gap between it and a relay that
only copies bytes (``bench/ws_bench.py --floor``). The C path does the same
in well under a microsecond. ``tests/proxy/test_tap.py`` feeds both
implementations the same byte streams and compares everything they do.

``BROKER_NO_EXTENSIONS=1`` in the environment selects the Python one.

The engine
----------

Even with no Python per chunk, every chunk still costs the event loop a
wakeup: an iteration of the loop, a callback into the protocol, the GIL
released and taken around the poll. On one connection that is as much CPU
as the relaying itself. So the compiled module also has an *engine*: one
thread with its own epoll that relays engaged connections while they carry
unfragmented data frames (whole or spanning reads), without the GIL and
without any Python object. It charges the client's rate limit itself while
the buckets hold, and keeps what a slow peer has not taken yet while it
stops reading the other side. Anything else hands the connection back to
the loop with what it must do (a chunk to process, what a peer did not take
yet, the frame the engine is in the middle of, an end of stream to read, a
message the limiter must throttle); activity and execution timing reach the
loop the same way, through an eventfd it watches. The relay gives the
connection to the engine again when its scanners are between frames and
nothing of its own waits to be written, and takes it back before it writes
anything itself (heartbeats, closes). Linux only; ``BROKER_NO_ENGINE=1``
keeps every connection on the loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

#: Bits of the answer of ``client_frame`` / ``kernel_frame``.
EXEC_START = 1  # an execute_request went to the kernel: start timing it
EXEC_END = 2  # an execute_reply came back on shell: stop the oldest timing
ACTIVITY = 4  # activity while no flush timer runs: note it now and start one
MID_REPLY = 8  # the kernel is mid-reply: acknowledge its segments at once

#: Direction indices of the tallies (``broker.metrics.Direction`` order).
TO_KERNEL, TO_CLIENT = 0, 1
#: Channel indices of the tallies (``broker.metrics.CHANNELS`` order).
CHANNELS = ("shell", "iopub", "stdin", "control", "other")
SHELL, IOPUB, STDIN, CONTROL, OTHER = range(5)
_CHANNEL_INDEX = {name.encode(): i for i, name in enumerate(CHANNELS[:OTHER])}
#: Requests counted as awaiting their reply, at most (a kernel that never answers
#: only keeps the quick ACKs on).
MAX_OWED = 64
#: Kernel states after which no reply of the old kernel is owed any more.
_FRESH_STATES = (b"starting", b"restarting", b"dead")
_OP_CONT, _OP_TEXT, _OP_BINARY = 0, 1, 2


def channel_of(opcode: int, head: bytes, tail: bytes) -> int:
    """The channel index of a frame from its peeked bytes (:data:`OTHER` if unseen).

    v1 binary frames name the channel in the offsets table at the start;
    jupyter_server's JSON writes ``"channel"`` last, so the tail is looked
    at first.
    """
    if opcode == _OP_BINARY:
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
    quote = text.find(b'"', at + 9)
    close = text.find(b'"', quote + 1) if quote >= 0 else -1
    if close > quote >= 0:
        return _CHANNEL_INDEX.get(text[quote + 1:close], OTHER)
    return OTHER


def state_of(head: bytes, tail: bytes) -> bytes | None:
    """The ``execution_state`` of a kernel status message (``b"busy"``, ``b"idle"``...).

    The content of a status message is the last part of both the v1 frame and
    jupyter_server's JSON, so the peeked tail has it; short frames are whole
    in the head. ``None`` when the frame is not a status message.
    """
    for text in (tail, head):
        at = text.rfind(b'"execution_state"')
        if at >= 0:
            value = text[at + 17:at + 40]
            quote = value.find(b'"')
            close = value.find(b'"', quote + 1) if quote >= 0 else -1
            return value[quote + 1:close] if close > quote >= 0 else None
    return None


class PyTap:
    """The reference :class:`Tap` (slotted: idle connections are many).

    Attributes, read and written by the relay and its hooks:
    ``ended`` (the relay finished: drop whatever still arrives),
    ``client_active`` / ``upstream_active`` (data arrived since the last
    heartbeat), ``slow_client`` / ``slow_upstream`` (that direction is in the
    middle of a frame or fragmented message: only the Python scanner may
    continue it), ``mid_reply`` (the last kernel frame's answer), ``busy``,
    ``owed``, ``owed_idle`` (reply tracking), ``ticking`` (a flush timer
    runs) and ``dirty`` (activity came while it ran).
    """

    __slots__ = (
        "_counts",
        "busy",
        "client_active",
        "dirty",
        "ended",
        "mid_reply",
        "owed",
        "owed_idle",
        "slow_client",
        "slow_upstream",
        "ticking",
        "upstream_active",
    )

    def __init__(self) -> None:
        self.ended = self.client_active = self.upstream_active = False
        self.slow_client = self.slow_upstream = self.mid_reply = False
        self.busy = self.ticking = self.dirty = False
        self.owed = self.owed_idle = 0
        # [direction][channel] -> [messages, bytes]
        self._counts = [[[0, 0] for _ in CHANNELS] for _ in range(2)]

    def take_counts(self) -> list[tuple[int, int, int, int]]:
        """The non-zero tallies as ``(direction, channel, messages, bytes)``, reset to zero."""
        taken = []
        for direction, table in enumerate(self._counts):
            for channel, entry in enumerate(table):
                if entry[0] or entry[1]:
                    taken.append((direction, channel, entry[0], entry[1]))
                    entry[0] = entry[1] = 0
        return taken

    def _activity(self) -> int:
        if self.ticking:
            self.dirty = True
            return 0
        return ACTIVITY

    def client_frame(self, opcode: int, length: int, head: bytes, tail: bytes) -> int:
        """A client data frame started (opcode 0: a continuation, bytes only)."""
        counts = self._counts[TO_KERNEL]
        if opcode == _OP_CONT:
            counts[OTHER][1] += length
            return 0
        channel = channel_of(opcode, head, tail)
        entry = counts[channel]
        entry[0] += 1
        entry[1] += length
        flags = 0
        if channel in (SHELL, CONTROL) or opcode == _OP_TEXT:
            if b'_request"' in head and self.owed < MAX_OWED:
                self.owed += 1
                self.owed_idle += 1
            if b'"execute_request"' in head:
                flags = EXEC_START | self._activity()
        return flags

    def kernel_frame(self, opcode: int, length: int, head: bytes, tail: bytes) -> int:
        """A kernel data frame started; :data:`MID_REPLY` is set while a reply is under way."""
        counts = self._counts[TO_CLIENT]
        if opcode == _OP_CONT:
            counts[OTHER][1] += length
            flags = 0
        else:
            channel = channel_of(opcode, head, tail)
            entry = counts[channel]
            entry[0] += 1
            entry[1] += length
            flags = 0
            if channel == IOPUB:
                state = state_of(head, tail)
                if state is not None:
                    self.busy = state == b"busy"
                    if state == b"idle":
                        if self.owed_idle:
                            self.owed_idle -= 1
                    elif state in _FRESH_STATES:
                        self.owed = self.owed_idle = 0
            elif channel in (SHELL, CONTROL) and b'_reply"' in head:
                if self.owed:
                    self.owed -= 1
                if channel == SHELL and b'"execute_reply"' in head:
                    flags = EXEC_END
            flags |= self._activity()
        if self.busy or self.owed or self.owed_idle:
            flags |= MID_REPLY
        return flags


def _compiled() -> Any:
    if os.environ.get("BROKER_NO_EXTENSIONS"):
        return None
    try:
        from broker.proxy import _tap  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _tap.Tap


#: The C implementation when it is built (and not switched off), else ``None``.
CTap: Any = _compiled()
#: The implementation the relay uses.
Tap: Any = CTap if CTap is not None else PyTap

#: Whether the engine handed a connection back (``_tap.c``'s BACK_* values).
BACK_NONE, BACK_HANDED, BACK_END = range(3)
_engine_loop: asyncio.AbstractEventLoop | None = None


def engine_for(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether relays on ``loop`` may use the engine; starts it and has ``loop`` drain it.

    One loop per process drains the engine (the broker has one). Should another loop
    ask while that one still runs (tests run several, one after the other), its relays
    stay on their loop.
    """
    global _engine_loop
    if CTap is None or os.environ.get("BROKER_NO_ENGINE"):
        return False
    from broker.proxy import _tap  # type: ignore[attr-defined]

    if not hasattr(_tap, "engine_start"):  # not Linux
        return False
    if _engine_loop is loop:
        return True
    if _engine_loop is not None and not _engine_loop.is_closed():
        return False
    loop.add_reader(_tap.engine_start(), _tap.engine_drain)
    _engine_loop = loop
    return True
