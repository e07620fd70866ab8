"""The backend protocol: how the broker gets a Jupyter server for a session.

A backend turns a pending :class:`~broker.models.Session` into an upstream
Jupyter server. ``spawn`` is an async iterator of progress events that ends
with ``ready`` (carrying the upstream URL and token) or raises a
:class:`~broker.errors.BrokerError`; the session manager relays every event
to clients and owns timeouts, so a backend never has to. ``backend_state`` in
events is persisted with the session so ``stop`` works even from another
replica or after a restart.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from broker.logs import scrub
from broker.metrics import Metrics
from broker.models import Clock, ProgressEvent, Session, system_clock
from broker.settings import Settings
from broker.store.locks import ClusterLocks
from broker.upstream.session import UpstreamAccess

log = logging.getLogger(__name__)

#: A longer upstream message is cut (build logs can carry huge lines).
MAX_MESSAGE = 2000
#: A hub user server's path, with its scheme and host when given (BinderHub relays
#: the hub's "Server ready at /user/{name}/"): where the upstream server lives.
_SERVER_PATH = re.compile(r"(?:\b[a-z][a-z0-9+.\-]*://[^\s/\"'<>]+)?/user/[^\s\"'<>]*",
                          re.IGNORECASE)
#: What replaces an upstream location in a message a client sees.
HIDDEN = "[server]"


def public_message(message: str, hosts: tuple[str, ...] = ()) -> str:
    """An upstream message as a client may see it: no server path, upstream URL or token.

    ``hosts`` are the BinderHub's and its hub's ``host[:port]``: any URL on them
    is hidden too (build logs also name public URLs, such as the repository's,
    which stay).
    """
    text = _SERVER_PATH.sub(HIDDEN, message)
    for host in hosts:
        text = re.sub(rf"\b[a-z][a-z0-9+.\-]*://{re.escape(host)}(?![\w.:@-])(?:[/?#][^\s\"'<>]*)?",
                      HIDDEN, text, flags=re.IGNORECASE)
    return scrub(text).strip()[:MAX_MESSAGE]



#: errnos that mean "this process is out of something", not "the upstream is dead".
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EADDRNOTAVAIL})
#: A probe whose timeout fired this much later than asked ran on a starved loop.
_LATE_FACTOR = 1.5


class Liveness(enum.Enum):
    """What one probe of an upstream server found out."""

    #: It answered ``api/status`` with 200.
    ALIVE = "alive"
    #: It refused, reset, did not answer in time, or answered anything but 200.
    DEAD = "dead"
    #: The probe could not be made for reasons of our own (out of descriptors, our
    #: loop too late to time it): says nothing about the upstream.
    UNKNOWN = "unknown"


class LostCallback(Protocol):
    """Called by a backend when a ready session's server dies on its own.

    ``message`` is what the session's clients read; ``reason`` the session's
    ended reason (``upstream_exited`` by default; the federation says
    ``upstream_down`` when the member holding the session went down).
    """

    def __call__(self, session_id: str, message: str,
                 reason: str = "upstream_exited") -> Awaitable[None]: ...


class Backend(Protocol):
    """Spawns, checks and stops upstream Jupyter servers."""

    name: str
    #: Set by the app: how the backend reports a server that died by itself.
    on_lost: LostCallback | None

    def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        """Start a server; yield progress; finish with a ``ready`` event."""

    async def stop(self, session: Session) -> None:
        """Stop the session's server and release everything it held; idempotent."""

    async def is_alive(self, session: Session) -> bool:
        """Ask the upstream itself (not a cache) whether the server still answers."""

    # Optional: ``async def probe(self, session) -> Liveness`` (see :func:`probe`).
    # Optional: ``async def run(self) -> None``, background work for the app's whole life
    # (the federation's health checks): the app starts it as a task and cancels it at
    # shutdown, before ``close``.

    async def health(self) -> None:
        """Raise if the backend cannot spawn right now (for /ready)."""

    async def close(self) -> None:
        """Release the backend's own resources at shutdown."""


@dataclass(frozen=True)
class BackendContext:
    """What the application gives a backend's factory (see :mod:`broker.backends.registry`).

    One object rather than positional arguments, so that what the app offers
    backends can grow without breaking a factory an installed package wrote.
    """

    settings: Settings
    #: The app's HTTP client, for a hub's or BinderHub's own API (never a session's server).
    http: aiohttp.ClientSession
    #: The one client to sessions' servers (:func:`probe_server` goes through it).
    upstream: UpstreamAccess
    #: The sessions' clock (token lifetimes follow it).
    clock: Clock = system_clock
    #: Locks shared by every replica (in the store): one creation per hub user at a time.
    locks: ClusterLocks = field(default_factory=lambda: ClusterLocks(None))
    #: The app's metrics, for a backend that exports series of its own (None: none kept).
    metrics: Metrics | None = None
    #: The store's live sessions (every replica's), for a backend that counts or
    #: reconciles them (the federation's per-member counts); None where there is no store.
    live_sessions: Callable[[], Awaitable[list[Session]]] | None = None


async def probe(backend: Backend, session: Session) -> Liveness:
    """One liveness probe of a session's server through its backend.

    Uses the backend's own ``probe`` when it has one, else ``is_alive``
    (where every failure counts as DEAD). An exception escaping the backend
    is our problem, not the upstream's: UNKNOWN.
    """
    check: Callable[[Session], Awaitable[Liveness]] | None = getattr(backend, "probe", None)
    try:
        if check is not None:
            return await check(session)
        return Liveness.ALIVE if await backend.is_alive(session) else Liveness.DEAD
    except Exception as exc:
        log.warning("could not probe the server of session %s: %s", session.id,
                    type(exc).__name__)
        return Liveness.UNKNOWN


def _local_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or an OSError it wraps) is this process running out of something."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _LOCAL_ERRNOS:
            return True
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, OSError) and os_error.errno in _LOCAL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


async def probe_server(upstream: UpstreamAccess, base_url: str, token: str,
                       limit: float = 10.0) -> Liveness:
    """Ask a Jupyter server at ``base_url`` for ``api/status`` with ``token``.

    The one liveness probe every backend builds on: it asks the server
    itself, so a reused or reconciled session is never a stale cache entry,
    and it goes through ``upstream``, the same client (and token handling) as
    every other request to a session's server. "Does not answer" (refused,
    reset, no reply within ``limit``) and "answers dead" (not 200) are DEAD;
    our own trouble (EMFILE and the like, or a timeout that fired far later
    than asked because this loop was starved) is UNKNOWN.
    """
    if not base_url:
        return Liveness.DEAD
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limit):
            response = await upstream.server(base_url, token).request(
                "GET", "api/status", [("Accept-Encoding", "identity")], read_timeout=limit)
            async with response:
                await response.read()
                return Liveness.ALIVE if response.status == 200 else Liveness.DEAD
    except TimeoutError:
        late = loop.time() - started > limit * _LATE_FACTOR
        return Liveness.UNKNOWN if late else Liveness.DEAD
    except OSError as exc:  # UpstreamError is one, wrapping what the socket said
        return Liveness.UNKNOWN if _local_failure(exc) else Liveness.DEAD


async def server_answers(upstream: UpstreamAccess, base_url: str, token: str,
                         limit: float = 10.0) -> bool:
    """Whether :func:`probe_server` found the server alive (for session reuse)."""
    return await probe_server(upstream, base_url, token, limit) is Liveness.ALIVE
