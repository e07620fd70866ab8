"""JupyterHub backend: each session is a server spawned by an existing JupyterHub.

The broker acts as a JupyterHub service (BROKER_HUB_API_TOKEN; scopes
``admin:users``, ``servers``, ``tokens``). For a session it:

1. creates a hub user named ``{prefix}{session id}`` — or, with
   BROKER_HUB_NAMED_SERVERS, uses one user per owner,
   ``{prefix}owner-{hash of the owner}``, and a named server per session
   called ``s{session id}``;
2. starts the server with ``user_options`` built from the session
   (``profile``, ``spec``; what they mean is the hub's spawner's business);
3. follows the hub's progress event stream (not polling) and relays its
   messages as the session's progress events, up to ``ready`` or ``failed``;
4. mints a token scoped to that one server (``access:servers!user=…`` or
   ``…!server=user/name``) that expires with the session, and proxies to
   ``{public url}/user/{name}/[{server}/]`` with it in the Authorization
   header (the hub ignores ``?token=`` on REST calls).

The hub's calls, answers, scopes and refusals this relies on are in
docs/protocols.md#jupyterhub-rest-api.

Invariants:

* The hub user and server names are in the first progress event's
  ``backend_state``, persisted before the hub is asked for anything, so
  :meth:`JupyterHubBackend.stop` cleans up after any replica, a failed or
  abandoned spawn included; without that state the names are derived again.
* ``stop`` leaves nothing on the hub: the server is stopped (a pending spawn
  is cancelled by the hub), then the user is deleted — in named-server mode
  the server is removed, its token revoked, and the owner's user deleted
  once it has no server left. Per-owner user operations are serialised
  within a replica so a stop cannot delete a user another spawn just used.
* Hub refusals become broker errors, with the reasons the rest of the
  broker (and its metrics) use: ``concurrent_spawn_limit`` (429 with
  ``Retry-After``) → 429 ``rate_limited`` with the hub's Retry-After;
  ``active_server_limit`` (429 without it) → 503 ``capacity``; hub
  unreachable → 503 ``upstream_unreachable``; a failed spawn → 502
  ``upstream_failed`` with the hub's message. Spawn timeouts are the session
  manager's (BROKER_SPAWN_TIMEOUT → 504 ``spawn_timeout``, then ``stop``).
* Upstream tokens go only into the session (encrypted at rest by the store)
  and into Authorization headers; they are never logged.
* ``close`` stops nothing: sessions live in the shared store and outlive
  this replica. The hub does not tell anyone when a server dies, so
  ``on_lost`` is never called; a dead server is noticed by ``is_alive``
  (session reuse) and by the proxy (502).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from broker.backends.base import (
    BackendContext,
    Liveness,
    LostCallback,
    probe_server,
    public_message,
)
from broker.backends.hubapi import HubAPI, HubReply, path_part
from broker.backoff import Backoff, poll, retry_after_seconds
from broker.errors import BrokerError, RateLimited, Unavailable, UpstreamFailed
from broker.models import Clock, ProgressEvent, Session, system_clock
from broker.store.locks import ClusterLocks

if TYPE_CHECKING:
    from broker.settings import Settings
    from broker.upstream.session import UpstreamAccess
    from broker.upstreams import UpstreamMember

log = logging.getLogger(__name__)

#: Retry-After for ``active_server_limit`` (the hub says "try again in a few minutes").
CAPACITY_RETRY_AFTER = 60
#: Retry-After for ``concurrent_spawn_limit`` when the hub's header cannot be read.
_SPAWN_LIMIT_DEFAULT = 30
#: How long ``stop`` waits for the hub to finish stopping a server (202).
_STOP_LIMIT = 60.0
#: Pauses between looks at the user model while a stop finishes.
_STOP_BACKOFF = Backoff(start=0.1, cap=1.0)


def user_options(session: Session) -> dict[str, str]:
    """The spawn request body: what the visitor asked for, for the hub's spawner to judge.

    Sent as the bare body, which every JupyterHub takes as ``user_options``
    (6.x also accepts ``{"user_options": ...}``, which 5.x would misread).
    """
    options = {}
    if session.profile:
        options["profile"] = session.profile
    if session.spec:
        options["spec"] = session.spec
    return options


class JupyterHubBackend:
    """A :class:`~broker.backends.base.Backend` spawning through a JupyterHub's REST API."""

    name = "jupyterhub"

    def __init__(
        self,
        http: aiohttp.ClientSession,
        upstream: UpstreamAccess,
        *,
        hub_url: str,
        api_token: str,
        public_url: str = "",
        user_prefix: str = "broker-",
        named_servers: bool = False,
        request_timeout: float = 30.0,
        clock: Clock = system_clock,
        on_lost: LostCallback | None = None,
        locks: ClusterLocks | None = None,
    ) -> None:
        """``http``: the client for the hub's REST API; ``upstream``: the app's client to
        the user servers behind the hub's proxy (liveness probes). ``locks``: shared by
        the replicas (in the store), so named servers put one owner's sessions on one hub
        user without two replicas creating them at once."""
        self._upstream = upstream
        self._hub = HubAPI(http, hub_url, api_token, timeout=request_timeout)
        self._public = (public_url or hub_url).rstrip("/")
        #: Hosts whose URLs never reach a client: the hub's message "Server ready at
        #: /user/{name}/" names where the upstream server lives (see public_message).
        self._hosts = tuple({URL(u).raw_authority for u in (hub_url, public_url) if u})
        self._prefix = user_prefix
        self._named = named_servers
        self._clock = clock
        self.on_lost = on_lost
        self._request_timeout = request_timeout
        #: Serialise server creation per hub user across replicas (named servers put
        #: one owner's sessions on one user).
        self.locks = locks if locks is not None else ClusterLocks(None)

    # -- naming ---------------------------------------------------------------
    def names(self, session: Session) -> tuple[str, str]:
        """(hub user, server name) of a session; server name "" is the default server."""
        if self._named:
            digest = hashlib.sha256(session.owner.encode()).hexdigest()[:12]
            # Server names must be slugs starting with a letter (JupyterHub 6).
            return f"{self._prefix}owner-{digest}", f"s{session.id}"
        return f"{self._prefix}{session.id}", ""

    def _state_names(self, session: Session) -> tuple[str, str]:
        state = session.backend_state
        if "hub_user" in state:
            return state["hub_user"], state.get("hub_server", "")
        return self.names(session)

    @staticmethod
    def _server_path(user: str, server: str) -> str:
        if server:
            return f"users/{path_part(user)}/servers/{path_part(server)}"
        return f"users/{path_part(user)}/server"

    def _upstream_url(self, user: str, server: str, ready_url: str) -> str:
        """The server's URL behind the hub's proxy: the hub's path on the public origin."""
        if ready_url and URL(ready_url).is_absolute():
            url = ready_url  # e.g. a hub with subdomain_host
        elif ready_url.startswith("/"):
            url = str(URL(self._public).origin()) + ready_url
        else:
            url = f"{self._public}/user/{path_part(user)}/" + (
                f"{path_part(server)}/" if server else "")
        return url if url.endswith("/") else url + "/"

    def _user_lock(self, user: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Serialise changes to one hub user (its creation, servers, deletion) across replicas.

        Held for a few hub calls only (never a spawn's progress): the lock
        expires after four request timeouts, so a replica that died holding it
        blocks the user's next session for at most that long.
        """
        return self.locks.hold(
            f"hub-user:{user}", ttl=self._request_timeout * 4 + 10,
            wait=self._request_timeout * 2, through_outages=True,
            busy=lambda: UpstreamFailed("JupyterHub is still busy with this user's other "
                                        "servers; try again", reason="upstream_failed"))

    # -- spawning -----------------------------------------------------------------
    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        user, server = self.names(session)
        state = {"hub_user": user, "hub_server": server}
        yield ProgressEvent("launching", "Asking JupyterHub for a server", progress=0,
                            backend_state=state)
        async with self._user_lock(user):
            await self._ensure_user(user)
            await self._start_server(session, user, server)
        log.info("session %s: JupyterHub is starting %s/%s", session.id, user, server)
        ready_url: str | None = None
        progress_path = self._server_path(user, server) + "/progress"
        async with contextlib.aclosing(self._hub.events(progress_path)) as events:
            async for event in events:
                if isinstance(event, HubReply):
                    raise UpstreamFailed(
                        f"JupyterHub is not starting the server: {event.message}",
                        reason="upstream_failed")
                if event.get("failed"):
                    message = public_message(str(event.get("message") or "Spawn failed"),
                                             self._hosts)
                    raise UpstreamFailed(f"JupyterHub could not start the server: {message}",
                                         reason="upstream_failed")
                if event.get("ready"):
                    ready_url = str(event.get("url") or "")
                    break
                if event.get("message"):
                    progress = event.get("progress")
                    yield ProgressEvent(
                        "launching", public_message(str(event["message"]), self._hosts),
                        progress=progress if isinstance(progress, int) else None)
        if ready_url is None:
            raise UpstreamFailed("JupyterHub's progress stream ended before the server was ready",
                                 reason="upstream_failed")
        token, token_id = await self._mint_token(session, user, server)
        yield ProgressEvent(
            "ready", "The server is ready", progress=100,
            upstream_url=self._upstream_url(user, server, ready_url), upstream_token=token,
            backend_state=state | {"hub_token_id": token_id},
        )

    async def _ensure_user(self, user: str) -> None:
        reply = await self._hub.request("POST", f"users/{path_part(user)}")
        if reply.status not in (201, 409):  # 409: it exists (the owner's user, or a retry)
            raise self._refused("create the hub user", reply)

    async def _start_server(self, session: Session, user: str, server: str) -> None:
        path = self._server_path(user, server)
        reply = await self._hub.request("POST", path, user_options(session))
        if reply.status == 404 and server:
            # The owner's user was deleted by a stop on another replica in between.
            await self._ensure_user(user)
            reply = await self._hub.request("POST", path, user_options(session))
        if reply.status in (201, 202):  # started, or pending: the progress stream tells
            return
        if reply.status == 429:
            if "Retry-After" in reply.headers:  # concurrent_spawn_limit: the hub suggests a delay
                suggested = retry_after_seconds(reply.headers["Retry-After"])
                seconds = (_SPAWN_LIMIT_DEFAULT if suggested is None
                           else max(1, math.ceil(suggested)))
                raise RateLimited(
                    f"JupyterHub is starting too many servers at once; try again in "
                    f"{seconds} seconds", retry_after=seconds)
            raise Unavailable(  # active_server_limit: no room until servers stop
                "JupyterHub has no room for another server; try again in a few minutes",
                reason="capacity", retry_after=CAPACITY_RETRY_AFTER)
        raise self._refused("start the server", reply)

    def _refused(self, action: str, reply: HubReply) -> BrokerError:
        if reply.status in (401, 403):
            log.error("JupyterHub refused to %s (HTTP %d: %s): check the broker service's "
                      "role scopes (admin:users, servers, tokens)", action, reply.status,
                      reply.message)
            return UpstreamFailed(f"The broker is not allowed to {action} on JupyterHub",
                                  reason="upstream_failed")
        return UpstreamFailed(f"JupyterHub could not {action}: {reply.message}",
                              reason="upstream_failed")

    async def _mint_token(self, session: Session, user: str, server: str) -> tuple[str, str]:
        """A token for this one server, expiring when the session does."""
        scope = (f"access:servers!server={user}/{server}" if server
                 else f"access:servers!user={user}")
        expires_in = max(1, math.ceil(session.expires_at - self._clock()))
        reply = await self._hub.request("POST", f"users/{path_part(user)}/tokens", {
            "note": f"jupyter-session-broker session {session.id}",
            "expires_in": expires_in,
            "scopes": [scope],
        })
        body = reply.body if isinstance(reply.body, dict) else {}
        if reply.status != 201 or not isinstance(body.get("token"), str):
            raise self._refused("issue a token for the server", reply)
        return body["token"], str(body.get("id", ""))

    # -- lifecycle ------------------------------------------------------------------
    async def is_alive(self, session: Session) -> bool:
        return await self.probe(session) is Liveness.ALIVE

    async def probe(self, session: Session) -> Liveness:
        """One liveness probe of the server through the hub's proxy."""
        return await probe_server(self._upstream, session.upstream_url, session.upstream_token,
                                  10.0)

    async def stop(self, session: Session) -> None:
        user, server = self._state_names(session)
        async with self._user_lock(user):
            await self._stop_server(user, server)
            if server:
                await self._revoke(user, session.backend_state.get("hub_token_id", ""))
                if any(s.get("pending") or s.get("ready")
                       for s in (await self._servers(user)).values()):
                    return  # the owner's other sessions still use this user
            await self._delete_user(user)
        log.info("session %s: removed %s/%s from JupyterHub", session.id, user, server)

    async def _stop_server(self, user: str, server: str) -> None:
        reply = await self._hub.request("DELETE", self._server_path(user, server),
                                        {"remove": True} if server else None)
        if reply.status == 202:  # stopping (and, for a named server, removed afterwards)
            await self._until_gone(user, server)
        elif reply.status not in (204, 404):  # 404: no such user or server, nothing to stop
            raise UpstreamFailed(f"JupyterHub did not stop the server: {reply.message}",
                                 reason="hub_stop_failed")

    async def _delete_user(self, user: str) -> None:
        reply = await self._hub.request("DELETE", f"users/{path_part(user)}")
        if reply.status == 400:  # "in the process of stopping": wait, then once more
            await self._until_gone(user, "")
            reply = await self._hub.request("DELETE", f"users/{path_part(user)}")
        if reply.status not in (204, 404):
            raise UpstreamFailed(f"JupyterHub did not delete the user: {reply.message}",
                                 reason="hub_stop_failed")

    async def _revoke(self, user: str, token_id: str) -> None:
        """Revoke a named server's token now (it would expire with the session anyway)."""
        if not token_id:
            return
        reply = await self._hub.request(
            "DELETE", f"users/{path_part(user)}/tokens/{path_part(token_id)}")
        if reply.status not in (204, 404):
            log.warning("could not revoke token %s of %s: %s", token_id, user, reply.message)

    async def _servers(self, user: str) -> dict[str, Any]:
        """The user's server models by name, stopped ones included ({} if the user is gone)."""
        reply = await self._hub.request(
            "GET", f"users/{path_part(user)}?include_stopped_servers=1")
        if reply.status == 404 or not isinstance(reply.body, dict):
            return {}
        servers = reply.body.get("servers")
        return servers if isinstance(servers, dict) else {}

    async def _until_gone(self, user: str, server: str) -> None:
        """Wait until the hub finished stopping (a named server: also removed it).

        The hub has no event for a finished stop (its progress stream covers
        spawns only), so this polls the user model with backoff, bounded.
        """

        async def gone() -> bool | None:
            entry = (await self._servers(user)).get(server)
            if entry is None or (not server and not entry.get("pending")
                                 and not entry.get("ready")):
                return True
            return None

        # The timeout also cuts a request in flight: the hub may hang rather than answer.
        async with asyncio.timeout(_STOP_LIMIT):
            await poll(gone, _STOP_BACKOFF)

    async def sweep(self, live_sessions: Callable[[], Awaitable[list[Session]]]) -> int:
        """Remove this broker's hub users (named servers) that no live session owns.

        ``stop`` can fail while the hub is unreachable, and a replica can die
        mid-spawn; the reaper calls this so nothing the broker created stays
        on the hub for longer than a sweep. The hub is listed *before* the
        store: every user or server seen then belongs to a session the store
        already knows, so a spawn starting meanwhile is never swept.
        """
        found: dict[str, list[str]] = {}
        offset = 0
        while True:
            reply = await self._hub.request(
                "GET", f"users?name_filter={path_part(self._prefix)}&include_stopped_servers=1"
                f"&offset={offset}&limit={_SWEEP_PAGE}")
            page = reply.body if reply.status == 200 and isinstance(reply.body, list) else []
            for model in page:
                name = str(model.get("name", ""))
                if name.startswith(self._prefix):
                    found[name] = [str(n) for n in (model.get("servers") or {})]
            if len(page) < _SWEEP_PAGE:
                break
            offset += _SWEEP_PAGE
        if not found:
            return 0
        owned: dict[str, set[str]] = {}
        for session in await live_sessions():
            user, server = self._state_names(session)
            owned.setdefault(user, set()).add(server)
        removed = 0
        for user, servers in found.items():
            if user in owned and (not self._named or not set(servers) - owned[user]):
                continue
            async with self._user_lock(user):
                if self._named:
                    for server in set(servers) - owned.get(user, set()) - {""}:
                        await self._stop_server(user, server)
                        removed += 1
                    if user in owned:
                        continue
                else:
                    await self._stop_server(user, "")
                    removed += 1
                await self._delete_user(user)
            log.warning("removed %s from JupyterHub: no live session owns it", user)
        return removed

    async def health(self) -> None:
        await self._hub.version()

    async def close(self) -> None:
        """Nothing to release: the HTTP client is the app's, the servers the sessions'."""


#: Users per page when the sweep lists the hub's users.
_SWEEP_PAGE = 200


def create(context: BackendContext) -> JupyterHubBackend:
    """BROKER_BACKEND=jupyterhub, from the BROKER_HUB_* settings (the registry's factory)."""
    return configured(context.settings, context)


def configured(config: Settings | UpstreamMember, context: BackendContext) -> JupyterHubBackend:
    """A backend from the BROKER_HUB_* settings or a federation member's same fields
    (without the prefix)."""
    return JupyterHubBackend(
        context.http, context.upstream,
        hub_url=config.hub_url,
        api_token=config.hub_api_token.get_secret_value(),
        public_url=config.hub_public_url,
        user_prefix=config.hub_user_prefix,
        named_servers=config.hub_named_servers,
        request_timeout=context.settings.upstream_timeout,
        clock=context.clock,  # token lifetimes follow the sessions' clock
        locks=context.locks,
    )
