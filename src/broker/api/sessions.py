"""The native session API: ``/api/v1/sessions``.

``POST`` creates (201) or reuses (200) a session, ``GET`` describes it,
``DELETE`` stops it, ``GET .../events`` streams its spawn progress as
server-sent events. Everything but creation needs the session's token. The
body shapes are the contract documented in docs/api.md and by ``openapi.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web

from broker import appkeys
from broker.errors import BadRequest, BrokerError
from broker.models import Session, Status, iso_utc
from broker.policy.apikeys import OWNER_PREFIX
from broker.policy.auth import public_base, request_owner, request_token
from broker.sessions import SessionRequest
from broker.sse import ClientGone, EventStream, client_gone, ticking

routes = web.RouteTableDef()

#: Profile and kernel names (also used by the execute API).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")
_SPEC_MAX = 1024
#: Seconds between checks that a client waiting on POST ?wait=true is still there.
_GONE_CHECK = 0.5

T = TypeVar("T")


async def while_connected(request: web.Request, waiting: Awaitable[T]) -> T:
    """``await waiting``, but raise ConnectionResetError as soon as the client has left
    (the middleware records that as 499).

    aiohttp does not cancel a handler whose client disconnects (handler
    cancellation is off by default, and on purpose: a stop must not be cut
    short), and a handler that writes nothing until the end never hears of it.
    A client that left while its spawn waits in the queue should leave the
    queue (:meth:`~broker.sessions.SessionManager.following`), so the
    connection is looked at every :data:`_GONE_CHECK` seconds.
    """

    async def look() -> None:
        if client_gone(request):
            raise ClientGone("the client went away")

    return await ticking(waiting, _GONE_CHECK, look)


def session_body(
    request: web.Request, session: Session, token: str | None = None
) -> dict[str, Any]:
    """The client view of a session: never the upstream URL, token or owner."""
    base = public_base(request, request.app[appkeys.SETTINGS].public_url,
                       request.app[appkeys.TRUSTED])
    base_url = f"{base}/s/{session.id}/"
    body: dict[str, Any] = {
        "id": session.id,
        "status": session.status.value,
        "backend": session.backend,
        "spec": session.spec,
        "base_url": base_url,
        "ws_url": "ws" + base_url[4:],
        "created_at": iso_utc(session.created_at),
        "expires_at": iso_utc(session.expires_at),
        "last_activity": iso_utc(session.last_activity or session.created_at),
        "message": session.message,
    }
    if session.profile:
        body["profile"] = session.profile
    if session.kernel_name:
        body["kernel_name"] = session.kernel_name
    if session.ended_reason:
        body["ended_reason"] = session.ended_reason
    if token is not None:
        body["token"] = token
    return body


def json_object(raw: bytes, allowed: set[str], *, empty_ok: bool,
                shape: str = "a JSON object") -> dict[str, Any]:
    """A request body as a JSON object with no keys beyond ``allowed`` (400 otherwise).

    ``empty_ok``: an empty body means ``{}``; otherwise it is refused like
    any other non-object, with "The body must be {shape}".
    """
    data: Any = {} if empty_ok else None
    if raw.strip():
        try:
            data = json.loads(raw)
            # A lone surrogate (a "\ud800" escape) is valid JSON but not Unicode:
            # no store or upstream can encode it, so it is refused here, once.
            json.dumps(data, ensure_ascii=False).encode()
        except RecursionError as exc:  # nesting deeper than the parser's stack
            raise BadRequest("The body is nested too deeply") from exc
        except UnicodeDecodeError as exc:
            raise BadRequest("The body is not valid UTF-8") from exc
        except UnicodeEncodeError as exc:
            raise BadRequest("The body holds a string that is not valid Unicode (a lone "
                             "surrogate)") from exc
        except ValueError as exc:
            raise BadRequest(f"The body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"The body must be {shape}")
    unknown = set(data) - allowed
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}")
    return data


async def parse_session_request(request: web.Request) -> SessionRequest:
    """Validate the optional JSON body of a creation request."""
    data = json_object(await request.read(), {"spec", "profile", "kernel_name"}, empty_ok=True)
    values: dict[str, str] = {}
    for field in ("spec", "profile", "kernel_name"):
        value = data.get(field) or ""
        if not isinstance(value, str):
            raise BadRequest(f"'{field}' must be a string")
        values[field] = value.strip()
    if len(values["spec"]) > _SPEC_MAX or any(ord(c) < 32 for c in values["spec"]):
        raise BadRequest("'spec' is too long or contains control characters")
    for field in ("profile", "kernel_name"):
        if values[field] and not NAME.match(values[field]):
            raise BadRequest(f"'{field}' may only contain letters, digits, '.', '_' and '-'")
    key = request.app[appkeys.MANAGER].limiter.api_keys.from_request(request)
    owner = key.owner if key is not None else request_owner(request, request.app[appkeys.TRUSTED])
    return SessionRequest(owner=owner, **values)


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


@routes.post("/api/v1/sessions", name="sessions_create")
async def create_session(request: web.Request) -> web.Response:
    """Create a session, or reuse the caller's live one for the same spec."""
    manager = request.app[appkeys.MANAGER]
    wanted = await parse_session_request(request)
    # An API key holder's Authorization is the key: its session token comes as ?token=.
    presented = (request.query.get("token") if wanted.owner.startswith(OWNER_PREFIX)
                 else request_token(request))
    limit_headers: dict[str, str] = {}
    session, token, reused = await manager.create(
        wanted, presented, on_admitted=lambda admission: limit_headers.update(
            admission.headers))
    if _flag(request, "wait") and session.status is Status.PENDING:
        with manager.following(session.id):
            waited, final = await while_connected(request, manager.wait_outcome(
                session.id, spawning=None if reused else session))
        session = waited or session
        if session.status is Status.PENDING:
            # Never answer "pending" to a client that asked to wait: the spawn is still
            # going (its outcome not recorded yet). Name the session, and hand a new one's
            # token over (this is its only chance), so the client can follow or delete it.
            error = BrokerError("The session did not finish starting within the wait limit",
                                reason="wait_timeout")
            error.status = 504
            body = error.body() | {"id": session.id}
            if not reused:
                body["token"] = token
            return web.json_response(body, status=504, headers=limit_headers)
        if session.status is Status.FAILED:
            error = BrokerError(session.message or "The session failed to start",
                                reason=session.ended_reason or "upstream_failed")
            error.status = _failure_status(session.ended_reason, final)
            retry_after = (final or {}).get("retry_after")
            if isinstance(retry_after, int):
                error.headers["Retry-After"] = str(retry_after)
            body = error.body() | {"id": session.id}
            return web.json_response(body, status=error.status,
                                     headers=error.headers | limit_headers)
    return web.json_response(
        session_body(request, session, token),
        status=200 if reused else 201,
        headers={"Location": f"/api/v1/sessions/{session.id}", **limit_headers},
    )


def _failure_status(reason: str, final: dict[str, Any] | None = None) -> int:
    """The failed spawn's own status when its event has one, else one by reason."""
    status = (final or {}).get("status_code")
    if isinstance(status, int) and 400 <= status <= 599:
        return status
    return {"spawn_timeout": 504, "capacity": 503, "rate_limited": 429}.get(reason, 502)


@routes.get("/api/v1/sessions/{sid}", name="session_get")
async def get_session(request: web.Request) -> web.Response:
    """Describe a session (its status tells a client whether and why it ended)."""
    manager = request.app[appkeys.MANAGER]
    session = await manager.authenticate(request.match_info["sid"], request_token(request))
    return web.json_response(session_body(request, session))


@routes.delete("/api/v1/sessions/{sid}", name="session_delete")
async def delete_session(request: web.Request) -> web.Response:
    """Stop a session now; its server and kernels go away."""
    manager = request.app[appkeys.MANAGER]
    session = await manager.authenticate(request.match_info["sid"], request_token(request))
    if not session.status.terminal:
        await manager.stop(session, "deleted")
    return web.Response(status=204)


@routes.get("/api/v1/sessions/{sid}/events", name="session_events")
async def session_events(request: web.Request) -> web.StreamResponse:
    """Progress of a session's spawn as server-sent events, ending at ready/failed."""
    manager = request.app[appkeys.MANAGER]
    session = await manager.authenticate(request.match_info["sid"], request_token(request))
    stream = EventStream(request)
    await stream.start()
    try:
        with manager.following(session.id):
            async for event in manager.events(session.id):
                if event is None:
                    await stream.keepalive()
                else:
                    await stream.send_json(event)
    except BrokerError as error:  # the stream already started: say so in it, then end
        await stream.send_json({"phase": "error", **error.body()})
    await stream.end()
    return stream.response
