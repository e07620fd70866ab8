"""One session's upstream Jupyter server, as the broker reaches it.

:class:`UpstreamAccess` is the application's single access to session servers
(one keep-alive HTTP pool, one TLS context); :meth:`UpstreamAccess.for_session`
gives the :class:`SessionUpstream` of a session, which knows three things
its callers must not get wrong on their own:

* the base URL: every request and WebSocket is addressed by a *remainder*
  relative to the session's server, joined by :func:`broker.paths.join`,
  which refuses anything that would leave it (``..`` in any spelling,
  encoded separators, a query or fragment smuggled into the path);
* the token: the ``Authorization`` header is added here, so no caller
  holds or forwards it, and it never goes anywhere but the session's own
  server (backends' liveness probes, :func:`broker.backends.base.probe_server`,
  come through here too);
* the transport: REST calls go over :class:`~broker.upstream.http.UpstreamPool`,
  WebSockets over :func:`~broker.upstream.websocket.connect`, both with
  ``TCP_NODELAY`` and the same timeouts.

What comes back (headers, bodies) is the caller's to filter: the REST proxy
forwards only allowlisted headers and withholds bodies that carry the token.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from yarl import URL

from broker.models import Session
from broker.paths import join
from broker.upstream.http import UpstreamError, UpstreamPool, UpstreamResponse
from broker.upstream.websocket import L, UpstreamSocket, connect

#: JSON answers read by :meth:`SessionUpstream.json` are refused above this size.
JSON_LIMIT = 16 << 20


class UpstreamAccess:
    """The application's access to session upstreams (an app key; closed at shutdown)."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 300.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        #: Default per-read timeout of requests (BROKER_UPSTREAM_TIMEOUT).
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self._ssl = ssl_context
        #: The keep-alive HTTP client (also for tests and metrics: its idle count).
        self.http = UpstreamPool(connect_timeout=connect_timeout, ssl_context=ssl_context)

    def for_session(self, session: Session) -> SessionUpstream:
        """The access object of ``session``'s server (cheap: made per call)."""
        return self.server(session.upstream_url, session.upstream_token)

    def server(self, base_url: str, token: str) -> SessionUpstream:
        """The access object of the server at ``base_url`` (a backend probing a server
        it started, before any session holds it)."""
        return SessionUpstream(self, base_url, token)

    def ssl_context(self) -> ssl.SSLContext:
        """The one TLS context of ``https``/``wss`` upstreams (made on first use)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def close(self) -> None:
        """Close idle connections (open WebSockets belong to their owners)."""
        await self.http.close()


class SessionUpstream:
    """A session's server: requests and WebSockets by remainder, with its token."""

    __slots__ = ("_auth", "_upstreams", "base")

    def __init__(self, upstreams: UpstreamAccess, base: str, token: str) -> None:
        self._upstreams = upstreams
        #: The server's base URL (ends with ``/``).
        self.base = base
        self._auth = ("Authorization", f"token {token}")

    def url(self, remainder: str) -> URL:
        """The absolute URL of ``remainder`` inside the server (else ``BadRequest``)."""
        return join(self.base, remainder)

    async def request(self, method: str, remainder: str,
                      headers: Iterable[tuple[str, str]] = (), body: bytes | None = None, *,
                      query: str | None = None,
                      read_timeout: float | None = None) -> UpstreamResponse:
        """Send one request; returns once the status and headers are in.

        ``headers`` are the caller's choice (the REST proxy's allowlist);
        the token is added here. ``query``: the raw query string, without
        ``?``. Raises ``BadRequest`` for a remainder outside the server,
        :class:`~broker.upstream.http.UpstreamError` or ``TimeoutError``.
        """
        url = join(self.base, remainder)
        sent = [*headers, self._auth]
        return await self._upstreams.http.request(
            method, url, sent, body, query=query,
            read_timeout=self._upstreams.read_timeout if read_timeout is None
            else read_timeout)

    async def json(self, method: str, remainder: str, payload: Any = None, *,
                   query: str | None = None, limit: float | None = None) -> tuple[int, Any]:
        """A call with a JSON body (``payload``, unless None) and answer: (status, data).

        ``data`` is None when the answer is not JSON. The whole call is bounded
        by ``limit`` seconds (default: the read timeout). Raises
        :class:`~broker.upstream.http.UpstreamError` or ``TimeoutError``.
        """
        headers = [("Accept", "application/json")]
        body = None
        if payload is not None:
            headers.append(("Content-Type", "application/json"))
            body = json.dumps(payload).encode()
        async with asyncio.timeout(self._upstreams.read_timeout if limit is None else limit):
            async with await self.request(method, remainder, headers, body,
                                          query=query) as response:
                if (response.content_length or 0) > JSON_LIMIT:
                    raise UpstreamError("the upstream's JSON answer is too large")
                raw = await response.read()
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, None

    async def websocket(self, remainder: str, *, leg: Callable[[], L],
                        protocols: Sequence[str] = (), query: str = "",
                        limit: float | None = None) -> UpstreamSocket[L]:
        """Open the server's WebSocket at ``remainder`` (``query``: raw, without ``?``).

        ``leg`` is the protocol the connection continues with after its
        handshake (the relay's leg, or the agent's message socket). Raises
        ``BadRequest`` for a remainder outside the server,
        :class:`~broker.upstream.websocket.HandshakeRefused`,
        ``ConnectionError``, ``OSError`` or ``TimeoutError``.
        """
        url = join(self.base, remainder)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        if query:  # byte for byte, as the caller has it
            url = URL(f"{url}?{query}", encoded=True)
        upstreams = self._upstreams
        return await connect(
            url, [self._auth], protocols, leg=leg,
            limit=upstreams.read_timeout if limit is None else limit,
            ssl_context=upstreams.ssl_context() if url.scheme == "wss" else None)
