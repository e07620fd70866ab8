"""A small client of the JupyterHub REST API (``{hub}/hub/api/``), as a service.

It knows the API's transport facts and nothing about sessions: every call
carries the service token in the ``Authorization`` header, asks for an
uncompressed reply (the app's shared client does not decompress), and has
an explicit timeout; progress streams have no total timeout but a read
timeout longer than the hub's 8 s keepalive, so a dead connection is
noticed. A hub that cannot be reached (connection refused, timeout, or a
502/503/504 from whatever stands in front of it) is an
:class:`~broker.errors.Unavailable` with ``Retry-After``: the caller may
try again later, nothing is wrong with its request.

The API's facts (routes, answers, the 8 s keepalive):
docs/protocols.md#jupyterhub-rest-api.

Hub messages pass through :func:`broker.logs.scrub` before anyone sees them:
a spawner's error text is not ours and could quote a token.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from broker.errors import Unavailable
from broker.logs import scrub
from broker.sse import json_events

log = logging.getLogger(__name__)

#: Seconds a client should wait after the hub could not be reached.
UNREACHABLE_RETRY_AFTER = 15
#: Read timeout of progress streams: the hub writes a keepalive every 8 s.
_STREAM_READ_TIMEOUT = 60.0
_GATEWAY_ERRORS = frozenset({502, 503, 504})
_JSON = {"Content-Type": "application/json"}


def path_part(name: str) -> str:
    """One URL path segment (user and server names are hub-validated, but be exact)."""
    return quote(name, safe="")


@dataclass(frozen=True)
class HubReply:
    """A hub API answer: status, headers and the parsed JSON body (or None)."""

    status: int
    headers: Mapping[str, str]
    body: Any

    @property
    def message(self) -> str:
        """The hub's human-readable error message (``{"message": ...}``), scrubbed."""
        if isinstance(self.body, dict) and isinstance(self.body.get("message"), str):
            return scrub(self.body["message"])
        return f"HTTP {self.status}"


class HubAPI:
    """Calls to one JupyterHub with one service token."""

    def __init__(self, http: aiohttp.ClientSession, hub_url: str, token: str,
                 *, timeout: float = 30.0) -> None:
        self._http = http
        self._base = hub_url.rstrip("/") + "/hub/api/"
        self._headers = {"Authorization": f"token {token}", "Accept-Encoding": "identity"}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))

    def _unreachable(self, method: str, path: str, why: str) -> Unavailable:
        log.warning("JupyterHub did not answer %s %s: %s", method, path, why)
        return Unavailable("JupyterHub cannot be reached right now; try again soon",
                           reason="upstream_unreachable", retry_after=UNREACHABLE_RETRY_AFTER)

    async def request(self, method: str, path: str, body: Any = None) -> HubReply:
        """One API call. Raises :class:`Unavailable` when the hub does not answer."""
        try:
            async with self._http.request(
                method, self._base + path,
                headers=self._headers if body is None else self._headers | _JSON,
                data=None if body is None else json.dumps(body),
                timeout=self._timeout, allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(method, path, type(exc).__name__) from exc
        if status in _GATEWAY_ERRORS:
            raise self._unreachable(method, path, f"HTTP {status}")
        parsed: Any = None
        if raw.strip():
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
        return HubReply(status, headers, parsed)

    async def events(self, path: str) -> AsyncGenerator[dict[str, Any] | HubReply, None]:
        """Follow an event stream: yields its JSON events, or one HubReply if refused."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.sock_connect,
                                        sock_read=_STREAM_READ_TIMEOUT)
        try:
            async with self._http.get(
                self._base + path, headers=self._headers | {"Accept": "text/event-stream"},
                timeout=timeout, allow_redirects=False,
            ) as resp:
                if resp.status in _GATEWAY_ERRORS:
                    raise self._unreachable("GET", path, f"HTTP {resp.status}")
                if resp.status != 200:
                    raw = await resp.read()
                    parsed: Any = None
                    with contextlib.suppress(ValueError):
                        parsed = json.loads(raw) if raw.strip() else None
                    yield HubReply(resp.status, resp.headers, parsed)
                    return
                async for event in json_events(resp.content):
                    yield event
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable("GET", path, type(exc).__name__) from exc

    async def version(self) -> str:
        """``GET /hub/api/``: the hub's version; raises unless the hub answers 200."""
        reply = await self.request("GET", "")
        if reply.status != 200 or not isinstance(reply.body, dict):
            raise RuntimeError(f"JupyterHub API answered HTTP {reply.status}")
        return str(reply.body.get("version", ""))
