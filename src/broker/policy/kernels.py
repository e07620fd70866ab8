"""Kernels per session: refuse a kernel start beyond ``BROKER_MAX_KERNELS_PER_SESSION``.

Each kernel is a process on the session's server, so one client looping
``POST api/kernels`` could fill a node. The count is the upstream's own
kernel list (``GET api/kernels``), not a tally of the broker's: kernels
started or shut down by any route, or by the server culling them, are seen
as they are.

What counts as a kernel start (the Jupyter Server semantics):

* ``POST api/kernels`` always starts one;
* ``POST api/sessions`` starts one unless its body names a running kernel
  (``kernel.id``) or a session for the same ``path`` already exists (the
  server then answers with that session: thebe's page reloads do this).

Checks of one session are serialised, so two concurrent POSTs cannot both
see room for one more: first on this replica (an ``asyncio.Lock`` per
session), then across replicas (the store's expiring lock,
:class:`~broker.store.locks.ClusterLocks`), held until the upstream answered the POST, so the next
check sees the kernel it started. A refusal is 429 ``kernels_per_session``.

The same kernel list answers the idle reaper's question, whether a kernel
is busy (:func:`kernels_busy`). Both ask through the session's
:class:`~broker.upstream.session.SessionUpstream`, as every caller does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from broker.errors import RateLimited, Unavailable, UpstreamFailed
from broker.models import Session
from broker.store.base import SessionStore
from broker.store.locks import ClusterLocks
from broker.upstream.http import UpstreamError
from broker.upstream.session import UpstreamAccess

#: Remainders of the POSTs that may start a kernel.
KERNEL_STARTS = frozenset({"api/kernels", "api/sessions"})


def _body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _session_path(body: dict[str, Any]) -> str | None:
    """The ``path`` a session POST names (also the legacy ``notebook`` form)."""
    path = body.get("path")
    notebook = body.get("notebook")
    if path is None and isinstance(notebook, dict):
        path = notebook.get("name") or notebook.get("path")
    return path if isinstance(path, str) else None


class KernelGate:
    """Serialised per-session checks of the kernel count before a kernel start."""

    def __init__(
        self,
        cap: int,
        store: SessionStore,
        upstreams: UpstreamAccess,
        *,
        timeout: float = 30.0,
        on_refusal: Callable[[], None] | None = None,
    ) -> None:
        self.cap = cap
        self._store = store
        self._upstreams = upstreams
        self._timeout = timeout
        self._on_refusal = on_refusal
        self._locks = ClusterLocks(store)

    @contextlib.asynccontextmanager
    async def starting(self, session: Session, remainder: str, raw: bytes) -> AsyncIterator[None]:
        """Hold the session's check while the caller forwards the POST; raise 429 at the cap."""
        # The lock outlives a slow kernel start (the forward's own read timeout, twice)
        # but not a replica that died holding it.
        async with self._locks.hold(
                f"kernels:{session.id}", ttl=self._timeout * 2 + 10, wait=self._timeout,
                busy=lambda: Unavailable("Another kernel of this session is starting; try "
                                         "again.", reason="kernels_busy", retry_after=2)):
            if await self._would_start(session, remainder, _body(raw)):
                kernels = await self._list(session, "api/kernels")
                if len(kernels) >= self.cap:
                    if self._on_refusal is not None:
                        self._on_refusal()
                    raise RateLimited(
                        f"This session already runs {len(kernels)} kernels (the limit is "
                        f"{self.cap}); shut one down before starting another.",
                        reason="kernels_per_session", retry_after=10)
            yield

    async def _would_start(self, session: Session, remainder: str, body: dict[str, Any]) -> bool:
        if remainder == "api/kernels":
            return True
        kernel = body.get("kernel")
        kernel_id = kernel.get("id") if isinstance(kernel, dict) else None
        if kernel_id:
            kernels = await self._list(session, "api/kernels")
            if any(k.get("id") == kernel_id for k in kernels):
                return False
        path = _session_path(body)
        if path is not None:
            sessions = await self._list(session, "api/sessions")
            if any(s.get("path") == path for s in sessions):
                return False
        return True

    async def _list(self, session: Session, what: str) -> list[dict[str, Any]]:
        """The upstream's own list of kernels or sessions."""
        try:
            status, items = await self._upstreams.for_session(session).json(
                "GET", what, limit=self._timeout)
        except (UpstreamError, TimeoutError) as exc:
            raise UpstreamFailed("The session's Jupyter server did not answer",
                                 reason="upstream_unreachable") from exc
        if status != 200:
            raise UpstreamFailed(f"The session's server could not list {what[4:]} "
                                 f"({status})", reason="upstream_response")
        return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


async def kernels_busy(upstreams: UpstreamAccess, session: Session) -> bool:
    """Whether any kernel of the session is executing right now, per its server.

    The idle reaper asks this before culling: a long computation that prints
    nothing, with its tab closed, shows no WebSocket traffic but is work.
    An unreachable server counts as not busy.
    """
    try:
        status, kernels = await upstreams.for_session(session).json(
            "GET", "api/kernels", limit=5)
    except (UpstreamError, TimeoutError):
        return False
    if status != 200 or not isinstance(kernels, list):
        return False
    return any(k.get("execution_state") == "busy" for k in kernels if isinstance(k, dict))
