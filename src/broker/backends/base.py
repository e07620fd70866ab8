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

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp

from broker.models import ProgressEvent, Session

#: Called by a backend when a ready session's server dies on its own:
#: (session id, human-readable reason).
LostCallback = Callable[[str, str], Awaitable[None]]


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

    async def health(self) -> None:
        """Raise if the backend cannot spawn right now (for /ready)."""

    async def close(self) -> None:
        """Release the backend's own resources at shutdown."""


async def server_answers(http: aiohttp.ClientSession, base_url: str, token: str,
                         limit: float = 10.0) -> bool:
    """Whether a Jupyter server at ``base_url`` answers ``api/status`` for ``token``.

    The one liveness probe every backend uses for ``is_alive``: it asks the
    server itself, so a reused or reconciled session is never a stale cache
    entry. Any failure (refused, timeout, non-200) means "not alive".
    """
    if not base_url:
        return False
    try:
        async with http.get(
            f"{base_url}api/status",
            headers={"Authorization": f"token {token}", "Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(total=limit),
            allow_redirects=False,
        ) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
