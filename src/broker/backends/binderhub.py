"""BinderHub backend: sessions launched through a BinderHub's ``/build`` event stream.

``spawn`` opens ``{BROKER_BINDER_URL}/build/{provider}/{spec}`` (the session's
spec, still percent-encoded) with ``Accept: text/event-stream`` and relays
BinderHub's phases as the session's progress; the final ``ready`` event's
``url`` and ``token`` become the session's upstream, which only the broker
ever sees. What BinderHub sends, and when: docs/protocols.md#binderhub-launch-api.

Invariants:

* The broker closes the build stream as soon as ``ready`` or ``failed``
  arrives: BinderHub holds it open ~60 s after a launch, and the spawn must
  not wait for that.
* ``:keepalive`` comments, events without a phase (raw build log lines),
  unknown phases and data that is not JSON never end or fail a spawn. Only
  a ``failed`` (or repo2docker's ``failure``) event does, or the stream
  ending or going silent (``BROKER_BINDER_READ_TIMEOUT``) before ``ready``.
  The backend never yields ``failed`` itself; it raises, and the session
  manager records the failure.
* A ``failed`` event becomes a broker error carrying BinderHub's own
  message: ``status_code`` 429 → 429 (Retry-After from "Try again in N
  seconds"), the quota messages ("Too many users ...") → 503 ``capacity``,
  anything else → 502.
* BinderHub has no stop call. With ``BROKER_BINDER_HUB_API_TOKEN`` the
  backend asks the BinderHub's JupyterHub to stop the server; without it the
  hub's culler does, later. The session ends for its clients either way.
* BinderHub's messages reach clients (progress, failures) only through
  :func:`public_message`: a hub server path (``Server ready at
  /user/owner-repo-x1y2/``), any URL on the BinderHub's or its hub's host,
  and anything token-shaped are rewritten, so the upstream server's
  location and secrets stay with the broker.
* The ready event's public fields (image, repo_url, binder_ref_url,
  binder_persistent_request) are kept in ``backend_state`` under
  ``public:``-prefixed keys, so the broker's own ``/build`` can repeat them;
  nothing else in ``backend_state`` is ever shown to a client.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from broker.backends.base import (
    MAX_MESSAGE,
    BackendContext,
    LostCallback,
    public_message,
    server_answers,
)
from broker.errors import BrokerError, RateLimited, Unavailable, UpstreamFailed
from broker.models import ProgressEvent, Session
from broker.specs import parse_spec
from broker.sse import json_events

if TYPE_CHECKING:
    from broker.settings import Settings
    from broker.upstream.session import UpstreamAccess
    from broker.upstreams import UpstreamMember

log = logging.getLogger(__name__)

#: BinderHub's phases in launch order, with a rough progress percentage.
PHASES = {
    "waiting": 5,
    "fetching": 10,
    "building": 30,
    "pushing": 60,
    "built": 70,
    "launching": 80,
}
#: Phases that end a launch unsuccessfully (``failure`` comes from repo2docker logs).
FAILED_PHASES = frozenset({"failed", "failure"})
#: Fields of BinderHub's ready event that are not secret, repeated by the broker's /build.
PUBLIC_READY_FIELDS = ("image", "repo_url", "binder_ref_url", "binder_persistent_request")
PUBLIC_PREFIX = "public:"
_RETRY_IN = re.compile(r"try again in (\d+) seconds?", re.IGNORECASE)
#: BinderHub's quota refusals: per repository, and for the whole BinderHub.
_QUOTA = re.compile(r"too many users", re.IGNORECASE)
_HUB_USER_PATH = re.compile(r"^(?P<base>.*?)/user/(?P<user>[^/]+)/(?:(?P<server>[^/]+)/)?$")
def failure_error(event: dict[str, Any], hosts: tuple[str, ...] = ()) -> BrokerError:
    """The broker error for a BinderHub ``failed`` event, keeping its (public) message."""
    message = public_message(str(event.get("message") or ""), hosts)
    message = message or "BinderHub could not launch the server"
    status = event.get("status_code")
    if status == 429:
        match = _RETRY_IN.search(message)
        return RateLimited(message, retry_after=float(match.group(1)) if match else 60)
    if _QUOTA.search(message):
        return Unavailable(message, reason="capacity", retry_after=30)
    return UpstreamFailed(message)


def _http_error(status: int, text: str, hosts: tuple[str, ...] = ()) -> BrokerError:
    """An HTTP-level refusal (before any event): BinderHub's auth, a proxy, a 404."""
    text = public_message(text[:200], hosts)
    detail = f"BinderHub answered HTTP {status}" + (f": {text}" if text else "")
    if status == 429:
        return RateLimited(detail, retry_after=60)
    if status == 503:
        return Unavailable(detail, reason="capacity", retry_after=30)
    return UpstreamFailed(detail)


def hub_location(server_url: str) -> tuple[str, str, str] | None:
    """(hub base URL, user, server name) of a ``{hub}/user/{name}[/{server}]/`` URL."""
    parts = urlsplit(server_url)
    match = _HUB_USER_PATH.match(parts.path)
    if match is None:
        return None
    base = f"{parts.scheme}://{parts.netloc}{match['base']}"
    return base, match["user"], match["server"] or ""


class BinderHubBackend:
    """A :class:`~broker.backends.base.Backend` launching through BinderHub."""

    name = "binderhub"

    def __init__(
        self,
        http: aiohttp.ClientSession,
        upstream: UpstreamAccess,
        *,
        binder_url: str,
        hub_url: str = "",
        hub_api_token: str = "",
        connect_timeout: float = 10.0,
        read_timeout: float = 90.0,
        request_timeout: float = 30.0,
        on_lost: LostCallback | None = None,
    ) -> None:
        """``http``: the client for BinderHub's and its hub's APIs; ``upstream``: the
        app's client to the servers it launches (liveness probes)."""
        self._http = http
        self._upstream = upstream
        self._binder = binder_url.rstrip("/")
        self._hub_url = hub_url.rstrip("/")
        self._hub_token = hub_api_token
        # The stream: no total (a build takes what it takes, within the
        # manager's spawn timeout), but a bound on silence between bytes.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._request_timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=connect_timeout
        )
        # Reuse waits for this answer: a hung server must not hold a launch long.
        self._alive_timeout = aiohttp.ClientTimeout(total=min(request_timeout, 10.0))
        self.on_lost = on_lost
        #: Hosts whose URLs never reach a client (see public_message).
        self._hosts = tuple({URL(u).raw_authority for u in (self._binder, self._hub_url) if u})

    # -- spawning ---------------------------------------------------------------------
    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        spec = parse_spec(session.spec)  # a malformed spec never reaches BinderHub
        url = URL(f"{self._binder}/build/{spec.path}", encoded=True)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        visitor = _forwardable_ip(session.owner)
        if visitor:
            # BinderHub rate-limits per client address; behind a proxy chain it
            # trusts, this lets it see the visitor instead of the broker.
            headers["X-Forwarded-For"] = visitor
        yield ProgressEvent("waiting", f"Asking BinderHub to launch {spec.path}", progress=0)
        try:
            async with self._http.get(url, headers=headers, timeout=self._stream_timeout) as resp:
                if resp.status != 200:
                    raise _http_error(resp.status, (await resp.text(errors="replace")).strip(),
                                      self._hosts)
                phase = "waiting"
                async for event in json_events(resp.content):
                    raw_phase = str(event.get("phase") or "").strip().lower()
                    if raw_phase in FAILED_PHASES:
                        resp.close()
                        raise failure_error(event, self._hosts)
                    if raw_phase == "ready":
                        resp.close()  # BinderHub would hold the stream open ~60 s more
                        yield self._ready(event)
                        return
                    # Unknown phases and phase-less log lines continue the current phase.
                    phase = raw_phase if raw_phase in PHASES else phase
                    message = public_message(str(event.get("message") or ""), self._hosts)
                    yield ProgressEvent(phase, message, progress=PHASES[phase])
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamFailed(
                "BinderHub did not accept a connection in time", reason="upstream_unreachable"
            ) from exc
        except TimeoutError as exc:
            raise UpstreamFailed(
                "BinderHub's build stream went silent", reason="upstream_unreachable"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(
                f"BinderHub is unreachable: {exc.__class__.__name__}",
                reason="upstream_unreachable",
            ) from exc
        raise UpstreamFailed("BinderHub ended the build stream before the server was ready")

    def _ready(self, event: dict[str, Any]) -> ProgressEvent:
        url = str(event.get("url") or "")
        token = str(event.get("token") or "")
        if not url.startswith(("http://", "https://")) or not token:
            raise UpstreamFailed("BinderHub's ready event lacks the server URL or token")
        if not url.endswith("/"):
            url += "/"
        state = {
            PUBLIC_PREFIX + name: str(event[name])[:MAX_MESSAGE]
            for name in PUBLIC_READY_FIELDS
            if isinstance(event.get(name), str) and event[name]
        }
        location = hub_location(url)
        if location is not None:
            state["hub_url"], state["hub_user"], state["hub_server"] = location
        return ProgressEvent(
            "ready",
            "Jupyter server is ready",
            progress=100,
            upstream_url=url,
            upstream_token=token,
            backend_state=state,
        )

    # -- lifecycle ----------------------------------------------------------------------
    async def is_alive(self, session: Session) -> bool:
        return await server_answers(self._upstream, session.upstream_url, session.upstream_token,
                                    self._alive_timeout.total or 10.0)

    async def stop(self, session: Session) -> None:
        user = session.backend_state.get("hub_user", "")
        if not user:
            return  # never got a server (BinderHub's hub culls a launch we abandoned)
        if not self._hub_token:
            log.debug("no hub token: the server of session %s is left to the hub's culler",
                      session.id)
            return
        hub = self._hub_url or session.backend_state.get("hub_url", "")
        server = session.backend_state.get("hub_server", "")
        path = f"users/{quote(user, safe='')}/" + (
            f"servers/{quote(server, safe='')}" if server else "server"
        )
        try:
            async with self._http.delete(
                URL(f"{hub}/hub/api/{path}", encoded=True),
                headers={"Authorization": f"token {self._hub_token}"},
                timeout=self._request_timeout,
            ) as resp:
                if resp.status not in (202, 204, 404):
                    log.warning("the hub refused to stop %s's server: HTTP %s", user,
                                resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not reach the hub to stop %s's server: %s", user, exc)

    async def health(self) -> None:
        async with self._http.get(f"{self._binder}/health",
                                  timeout=self._request_timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"BinderHub /health answered HTTP {resp.status}")

    async def close(self) -> None:
        """Nothing to release: servers outlive this replica (other replicas serve them)."""


def _forwardable_ip(owner: str) -> str:
    """The owner as an address BinderHub can read, or '' (an IPv6 /64 owner is a network)."""
    try:
        return str(ipaddress.ip_address(owner))
    except ValueError:
        return ""


def create(context: BackendContext) -> BinderHubBackend:
    """BROKER_BACKEND=binderhub, from the BROKER_BINDER_* settings (the registry's factory)."""
    return configured(context.settings, context)


def configured(config: Settings | UpstreamMember, context: BackendContext) -> BinderHubBackend:
    """A backend from the BROKER_BINDER_* settings or a federation member's same fields
    (without the prefix)."""
    return BinderHubBackend(
        context.http, context.upstream,
        binder_url=config.binder_url,
        hub_url=config.binder_hub_url,
        hub_api_token=config.binder_hub_api_token.get_secret_value(),
        connect_timeout=config.binder_connect_timeout,
        read_timeout=config.binder_read_timeout,
        request_timeout=context.settings.upstream_timeout,
    )
