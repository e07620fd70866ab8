"""The operators' API: ``/api/v1/admin/...``, enabled by ``BROKER_ADMIN_TOKEN``.

Without the setting every admin path answers 404, as if it did not exist.
The admin token is compared in constant time and never logged. Session views
here include the owner (a client IP or /64), which the public API never shows.
"""

from __future__ import annotations

import collections
import hmac
from typing import Any

from aiohttp import web

from broker import appkeys
from broker.backends.federation import FederationBackend
from broker.errors import Forbidden, NotFound, Unauthorized
from broker.models import Session, iso_utc
from broker.policy.auth import request_token

routes = web.RouteTableDef()


def _require_admin(request: web.Request) -> None:
    expected = request.app[appkeys.SETTINGS].admin_token.get_secret_value()
    if not expected:
        raise NotFound("The admin API is not enabled", reason="not_found")
    token = request_token(request)
    if not token:
        raise Unauthorized("The admin token is required")
    # surrogatepass: undecodable bytes in the header are a wrong token, not a 500.
    if not hmac.compare_digest(token.encode(errors="surrogatepass"), expected.encode()):
        raise Forbidden("Wrong admin token", reason="wrong_token")


async def _find(request: web.Request) -> Session:
    """The session named in the path, live or recently ended (admin only)."""
    _require_admin(request)
    session = await request.app[appkeys.MANAGER].store.get(request.match_info["sid"],
                                                        include_expired=True)
    if session is None:
        raise NotFound("No such session", reason="unknown_session")
    return session


def _admin_view(session: Session, now: float) -> dict[str, Any]:
    return {
        "id": session.id,
        "owner": session.owner,
        "backend": session.backend,
        # The BROKER_UPSTREAMS member holding the session ("" without a federation).
        "member": session.backend_state.get("member", ""),
        "status": session.status.value,
        "spec": session.spec,
        "profile": session.profile,
        "created_at": iso_utc(session.created_at),
        "expires_at": iso_utc(session.expires_at),
        "last_activity": iso_utc(session.last_activity or session.created_at),
        "age_seconds": round(now - session.created_at, 1),
        "idle_seconds": round(now - (session.last_activity or session.created_at), 1),
        "message": session.message,
        "ended_reason": session.ended_reason,
    }


@routes.get("/api/v1/admin/sessions", name="admin_list_sessions")
async def list_sessions(request: web.Request) -> web.Response:
    """Every live session (``?owner=`` to filter), newest first."""
    _require_admin(request)
    manager = request.app[appkeys.MANAGER]
    owner = request.query.get("owner")
    now = manager.clock()
    sessions = await manager.store.list_live()
    views = [_admin_view(s, now) for s in sessions if owner is None or s.owner == owner]
    views.sort(key=lambda v: v["age_seconds"])
    return web.json_response({"sessions": views, "count": len(views)})


@routes.delete("/api/v1/admin/sessions", name="admin_stop_owner_sessions")
async def stop_owner_sessions(request: web.Request) -> web.Response:
    """Stop every live session of one owner: ``?owner=<ip or /64>`` (required)."""
    _require_admin(request)
    owner = request.query.get("owner")
    if not owner:
        raise NotFound("Name the owner: ?owner=<client IP or IPv6 /64>", reason="bad_request")
    manager = request.app[appkeys.MANAGER]
    stopped = 0
    for session in await manager.store.list_live():
        if session.owner == owner:
            await manager.stop(session, "admin")
            stopped += 1
    return web.json_response({"owner": owner, "stopped": stopped})


@routes.get("/api/v1/admin/sessions/{sid}", name="admin_get_session")
async def get_session(request: web.Request) -> web.Response:
    """One session, live or recently ended."""
    session = await _find(request)
    return web.json_response(_admin_view(session, request.app[appkeys.MANAGER].clock()))


@routes.delete("/api/v1/admin/sessions/{sid}", name="admin_stop_session")
async def stop_session(request: web.Request) -> web.Response:
    """Stop one session now (its clients see ``ended_reason: admin``)."""
    session = await _find(request)
    manager = request.app[appkeys.MANAGER]
    if not session.status.terminal:
        await manager.stop(session, "admin")
    return web.Response(status=204)


@routes.get("/api/v1/admin/usage", name="admin_usage")
async def usage(request: web.Request) -> web.Response:
    """Live usage against the configured limits; the busiest owners first."""
    _require_admin(request)
    manager = request.app[appkeys.MANAGER]
    settings = request.app[appkeys.SETTINGS]
    now = manager.clock()
    live = [s for s in await manager.store.list_live() if not s.expired(now)]
    owners = collections.Counter(s.owner for s in live)
    statuses = collections.Counter(s.status.value for s in live)
    return web.json_response({
        "sessions_live": len(live),
        "by_status": dict(statuses),
        "limits": {
            "max_sessions": settings.max_sessions,
            "max_sessions_per_owner": settings.max_sessions_per_owner,
            "max_sessions_per_spec": settings.max_sessions_per_spec,
            "spec_quotas": settings.spec_quotas,
            "max_creations_per_owner": settings.max_creations_per_owner,
            "creation_window": settings.creation_window,
            "max_concurrent_spawns": settings.max_concurrent_spawns,
            "max_kernels_per_session": settings.max_kernels_per_session,
            "session_max_age": settings.session_max_age,
            "session_idle_timeout": settings.session_idle_timeout,
        },
        "top_specs": [{"spec": spec, "sessions": n} for spec, n in
                      collections.Counter(s.spec for s in live if s.spec).most_common(20)],
        "capacity_used": (len(live) / settings.max_sessions) if settings.max_sessions else None,
        "top_owners": [{"owner": o, "sessions": n} for o, n in owners.most_common(20)],
        "this_replica": {
            "websockets_open": manager.open_connections(),
            "spawn_queue": manager.spawn_queue.snapshot(),
        },
    })


@routes.get("/api/v1/admin/upstreams", name="admin_upstreams")
async def upstreams(request: web.Request) -> web.Response:
    """The federation's members (BROKER_UPSTREAMS): health, sessions and share.

    Health is this replica's last check; sessions are counted from the store
    every health interval (plus what this replica placed since). Without
    BROKER_UPSTREAMS the list is empty: there is one upstream, BROKER_BACKEND.
    """
    _require_admin(request)
    backend = request.app[appkeys.BACKEND]
    if not isinstance(backend, FederationBackend):
        return web.json_response({"federation": False, "backend": backend.name,
                                  "members": []})
    settings = request.app[appkeys.SETTINGS]
    return web.json_response({
        "federation": True,
        "affinity": settings.upstreams_affinity,
        "health_interval": settings.upstreams_health_interval,
        "members": backend.snapshot(),
    })


@routes.get("/api/v1/admin/pools", name="admin_pools")
async def pools(request: web.Request) -> web.Response:
    """The warm pools (BROKER_POOL): size, aim, entries; an empty list without pools."""
    _require_admin(request)
    return web.json_response({"pools": await request.app[appkeys.POOL].describe()})


@routes.delete("/api/v1/admin/pools", name="admin_drain_pools")
async def drain_pools(request: web.Request) -> web.Response:
    """Stop every unclaimed pool entry, of any pool (before an uninstall); claimed
    sessions stay. Refills go on while BROKER_POOL names pools: empty it first.
    """
    _require_admin(request)
    return web.json_response({"stopped": await request.app[appkeys.POOL].drain()})
