"""Per-connection limits on what a client sends down a kernel WebSocket.

A connection lives on one replica, so its buckets are plain attributes of a
:class:`WsLimiter` — no store, no lock, no await on the normal path. Two
token buckets run side by side: messages per second and bytes per second
(a frame's payload bytes, as they cross the wire; the relay never decodes
text). Oversized single messages are not this module's
business: the relay's frame scanner closes those with 1009
(``BROKER_WS_CLIENT_MAX_MESSAGE_SIZE``) before they are forwarded.

Contract (it is the relay's ``Hooks.client_message`` limiter): one call per
client data message, ``delay = limiter.take(size)``, a few float operations,
never awaiting:

* ``0.0`` — within the limits, carry on;
* ``> 0`` — a bucket ran dry: stop reading this client for ``delay``
  seconds. The bucket goes into debt, so later messages wait behind this
  one; while the broker does not read, the client's TCP window fills and its
  sends slow down — the flood is slowed at its source, nothing is dropped or
  reordered;
* ``< 0`` (:data:`CLOSE`) — sustained abuse: close the connection with 1008.

Closing is for sustained abuse only: once a connection has been throttled
without a break (every message had to wait) for longer than
``throttle_limit`` seconds, ``take`` answers :data:`CLOSE`. A client that
bursts and then pauses is slowed briefly and never closed; the first
message that finds tokens ends the throttled stretch.

Per session: all kernel WebSockets of one session on one replica may share a
second :class:`WsLimiter` (the same class), the session's aggregate budget:
a connection's limiter charges its own buckets, then that one, and the
answer is the longer wait (or :data:`CLOSE`). :class:`SessionWsBudgets` also
caps how many kernel WebSockets a session holds open at once. Both are per
replica: a session's connections on another replica are counted there.

Time comes from an injectable ``clock`` (``time.monotonic`` by default), so
the buckets are tested exactly with a manual clock. ``on_throttle`` and
``on_close`` (metrics) run on the slow path only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from broker.settings import Settings

#: What ``take`` answers for sustained abuse: close with 1008.
CLOSE = -1.0


class Limiter(Protocol):
    """What the relay charges each client data frame to (:class:`WsLimiter` is the one)."""

    def take(self, size: int, messages: float = 1.0) -> float:
        """0.0, seconds to pause reading, or :data:`CLOSE`."""
        ...


@dataclass(frozen=True)
class WsLimits:
    """The configured per-connection limits (0 = that bucket is off)."""

    messages_per_second: float = 0.0
    message_burst: int = 1
    bytes_per_second: float = 0.0
    byte_burst: int = 1
    throttle_limit: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WsLimits | None:
        """The limits in ``settings``, or None when neither bucket is on (no limiter at all)."""
        if not settings.ws_client_messages_per_second and not settings.ws_client_bytes_per_second:
            return None
        return cls(
            messages_per_second=settings.ws_client_messages_per_second,
            message_burst=settings.ws_client_message_burst,
            bytes_per_second=settings.ws_client_bytes_per_second,
            byte_burst=settings.ws_client_byte_burst,
            throttle_limit=settings.ws_client_throttle_limit,
        )

    def new(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_throttle: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        parent: WsLimiter | None = None,
    ) -> WsLimiter:
        """A fresh limiter (full buckets) for one connection (``parent``: its session's)."""
        return WsLimiter(self, clock=clock, on_throttle=on_throttle, on_close=on_close,
                         parent=parent)

    @classmethod
    def for_sessions(cls, settings: Settings) -> WsLimits | None:
        """A session's aggregate budget (buckets of one second's worth; the byte bucket
        holds at least one message of the largest size a client may send), or None."""
        mps = settings.ws_session_messages_per_second
        bps = settings.ws_session_bytes_per_second
        if not mps and not bps:
            return None
        largest = settings.ws_client_max_message_size or settings.ws_max_message_size
        return cls(messages_per_second=mps, message_burst=max(1, math.ceil(mps)),
                   bytes_per_second=bps, byte_burst=max(largest, math.ceil(bps)),
                   throttle_limit=settings.ws_client_throttle_limit)


class WsLimiter:
    """Token buckets for one client connection; see the module docstring for the contract."""

    __slots__ = (
        "_bburst",
        "_brate",
        "_bytes",
        "_clock",
        "_last",
        "_limit",
        "_mburst",
        "_mrate",
        "_msgs",
        "_on_close",
        "_on_throttle",
        "_parent",
        "_since",
    )

    def __init__(
        self,
        limits: WsLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_throttle: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        parent: WsLimiter | None = None,
    ) -> None:
        #: The session's shared budget, charged after this connection's own buckets.
        self._parent = parent
        # A bucket that is off is an infinite one with no refill: inf - n stays
        # inf, so the hot path needs no branch per bucket.
        self._mrate = float(limits.messages_per_second)
        self._mburst = float(limits.message_burst) if self._mrate else math.inf
        self._brate = float(limits.bytes_per_second)
        self._bburst = float(limits.byte_burst) if self._brate else math.inf
        self._msgs = self._mburst
        self._bytes = self._bburst
        self._limit = limits.throttle_limit
        self._clock = clock
        self._on_throttle = on_throttle
        self._on_close = on_close
        self._last = clock()
        #: When the current unbroken stretch of throttling began (None: not throttled).
        self._since: float | None = None

    def take(self, size: int, messages: float = 1.0) -> float:
        """Charge ``messages`` (one, or none for more of a fragmented message) and
        ``size`` bytes here and to the session's budget: 0.0, seconds to pause reading,
        or CLOSE."""
        delay = self._charge(size, messages)
        parent = self._parent
        if parent is None:
            return delay
        shared = parent.take(size, messages)
        if delay < 0.0 or shared < 0.0:
            return CLOSE
        return delay if delay > shared else shared

    def _charge(self, size: int, messages: float) -> float:
        """Charge this limiter's own buckets."""
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        msgs = self._msgs + elapsed * self._mrate
        if msgs > self._mburst:
            msgs = self._mburst
        size_left = self._bytes + elapsed * self._brate
        if size_left > self._bburst:
            size_left = self._bburst
        msgs -= messages
        size_left -= size
        self._msgs = msgs
        self._bytes = size_left
        if msgs >= 0.0 and size_left >= 0.0:
            self._since = None
            return 0.0
        return self._throttle(now, msgs, size_left)

    def _throttle(self, now: float, msgs: float, size_left: float) -> float:
        """The slow path: how long the debt takes to repay, or the close."""
        if msgs == -math.inf or size_left == -math.inf:
            return CLOSE
        wait = -msgs / self._mrate if msgs < 0.0 else 0.0
        if size_left < 0.0:
            wait = max(wait, -size_left / self._brate)
        if self._since is None:
            self._since = now
        if now + wait - self._since > self._limit:
            # Latched: empty buckets forever bring every later call (the rest of the frames
            # of the same read) here, to this early answer, counted once.
            self._msgs = self._bytes = -math.inf
            if self._on_close is not None:
                self._on_close()
            return CLOSE
        if self._on_throttle is not None:
            self._on_throttle()
        return wait

    @property
    def throttled(self) -> bool:
        """Whether the connection is inside a stretch of throttling right now."""
        return self._since is not None


class SessionWsBudgets:
    """Per-session bounds of kernel WebSockets on this replica (see the module docstring).

    :meth:`open` admits one more connection of a session, or answers None at
    the cap; the admitted connection gets the session's shared limiter (None
    when no aggregate budget is configured) and must call :meth:`close` once
    when it ends. A session's entry goes when its last connection closes.
    """

    __slots__ = ("_limits", "_max", "_on_close", "_on_throttle", "_open", "_shared")

    def __init__(self, max_connections: int, limits: WsLimits | None = None, *,
                 on_throttle: Callable[[], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self._max = max_connections
        self._limits = limits
        self._on_throttle = on_throttle
        self._on_close = on_close
        self._open: dict[str, int] = {}
        self._shared: dict[str, WsLimiter] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, on_throttle: Callable[[], None] | None = None,
                      on_close: Callable[[], None] | None = None) -> SessionWsBudgets:
        return cls(settings.ws_session_max_connections, WsLimits.for_sessions(settings),
                   on_throttle=on_throttle, on_close=on_close)

    def open(self, session_id: str) -> tuple[bool, WsLimiter | None]:
        """(admitted, the session's shared limiter)."""
        count = self._open.get(session_id, 0)
        if self._max and count >= self._max:
            return False, None
        self._open[session_id] = count + 1
        shared = self._shared.get(session_id)
        if shared is None and self._limits is not None:
            shared = self._shared[session_id] = self._limits.new(
                on_throttle=self._on_throttle, on_close=self._on_close)
        return True, shared

    def close(self, session_id: str) -> None:
        count = self._open.get(session_id, 0) - 1
        if count > 0:
            self._open[session_id] = count
        else:
            self._open.pop(session_id, None)
            self._shared.pop(session_id, None)

    def connections(self, session_id: str) -> int:
        """Kernel WebSockets of ``session_id`` open on this replica."""
        return self._open.get(session_id, 0)
