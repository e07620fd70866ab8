"""The BinderHub-compatible launch endpoint: ``GET /build/{provider}/{spec}``.

thebe and MyST books configured with ``binder.url = <broker>`` open this
through the browser's ``EventSource``, which can send neither a body nor
headers. The answer is BinderHub's event stream, whatever the backend:

* always HTTP 200 ``text/event-stream`` with unnamed ``data: {json}`` events
  and ``:keepalive`` comments every ``BROKER_BUILD_KEEPALIVE`` seconds;
  refusals are ``failed`` events carrying ``status_code`` (400 malformed
  spec or missing ``Accept``, 429 rate/owner limits, 503 capacity, 502
  upstream), as BinderHub sends them. An ``EventSource`` cannot read an
  HTTP error status, only events. CORS headers come from the middleware.
* A malformed spec is refused before anything is created or spawned.
* The stream ends right after ``ready`` or ``failed``. ``ready`` carries
  ``url`` = the broker's ``/s/{id}/`` and ``token`` = a broker token, plus
  BinderHub's other ready fields where they are known.

The stream's format is docs/protocols.md#binderhub-launch-api; what a thebe
page needs from it (and from the server behind ``url``) is
docs/protocols.md#thebe-and-myst-pages.

Reuse needs proof, never an address or an Origin, which everyone behind
one NAT shares (a classroom would otherwise share one kernel):

* a broker token presented (``Authorization: token ...`` or ``?token=``):
  the owner's live session for the spec that this token opens comes back
  with that same token, and nothing is minted;
* with ``BROKER_BUILD_VISITOR_COOKIE``, the visitor cookie the broker set on
  an earlier launch (a secret only that browser holds): the session comes
  back with a freshly minted token (:meth:`~broker.sessions.SessionManager.issue_token`),
  at most :data:`~broker.models.MAX_EXTRA_TOKENS` times; after that the
  visitor gets a new session rather than an older token being forgotten.

Anything else starts a new session. thebe itself never needs either: it
keeps ``{baseUrl, token}`` in localStorage and reuses that without calling
``/build``. Its ``EventSource`` is opened without ``withCredentials``, so a
page on another origin never sends the cookie; the cookie helps only pages
served from the broker's own origin (hence ``SameSite=Lax``, path ``/build``).
With ``BROKER_BUILD_REUSE=false`` every launch is a new session.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
from typing import Any

from aiohttp import web

from broker import appkeys
from broker.backends.binderhub import PUBLIC_PREFIX
from broker.errors import BadRequest, BrokerError, Unavailable
from broker.models import Session, Status, new_token
from broker.policy.auth import public_base, request_owner, request_token
from broker.policy.identity import client_ip, forwarded_proto_host
from broker.sessions import SessionManager, SessionRequest
from broker.settings import Settings
from broker.specs import BuildSpec, parse_spec
from broker.sse import EventStream

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

VISITOR_COOKIE = "broker_visitor"
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_\-]{32,64}$")
_PREFIX = "/build/"
#: Launch attempts when a reused session ends between its ready event and
#: the minting of a token for it (a second attempt starts a new session).
_ATTEMPTS = 2
#: Fields of a spawn queue 'waiting' event passed through to /build clients.
_QUEUE_FIELDS = ("queue_position", "queue_wait")


class _Stream:
    """One /build response: BinderHub's event format (unnamed JSON events), nothing else."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream

    async def event(self, data: dict[str, Any]) -> None:
        if "message" in data and not str(data["message"]).endswith("\n"):
            data["message"] = f"{data['message']}\n"  # BinderHub's messages are log lines
        await self.stream.send_json(data)

    async def keepalive(self) -> None:
        await self.stream.keepalive()

    async def failed(self, error: BrokerError) -> None:
        await self.event(error.failed_event())


def visitor_identity(request: web.Request, settings: Settings) -> tuple[str, str]:
    """(visitor key, cookie value to set or ''): which browser, below the owner, is launching.

    Only the broker's own visitor cookie identifies a browser; without
    ``BROKER_BUILD_VISITOR_COOKIE`` the key is '' (no identity, no reuse
    without a token). A browser without the cookie is given one; its key is
    then new, so it proves nothing until the cookie comes back.
    """
    if not settings.build_visitor_cookie:
        return "", ""
    origin = request.headers.get("Origin", "").rstrip("/").lower()
    cookie, new_cookie = request.cookies.get(VISITOR_COOKIE, ""), ""
    if not _COOKIE_VALUE.match(cookie):
        cookie = new_cookie = new_token()
    material = json.dumps(["build", origin, cookie]).encode()
    return "build:" + hashlib.sha256(material).hexdigest()[:32], new_cookie


def profile_for(spec: str, pairs: list[str]) -> str:
    """The profile of the first ``pattern=profile`` pair matching the spec, or ''."""
    for pair in pairs:
        pattern, _, profile = pair.partition("=")
        if fnmatch.fnmatchcase(spec, pattern.strip()):
            return profile.strip()
    return ""


def _raw_spec(request: web.Request) -> str:
    """``provider/spec`` from the raw path, so ``%2F`` stays escaped (as in BinderHub)."""
    raw = request.raw_path.split("?", 1)[0]
    if not raw.startswith(_PREFIX):
        raise BadRequest("The launch URL is not under /build/", reason="bad_spec")
    return raw[len(_PREFIX):]


def ready_event(
    request: web.Request, session: Session, token: str, spec: BuildSpec
) -> dict[str, Any]:
    """BinderHub's ready event, pointing at the broker instead of the upstream."""
    base = public_base(request, request.app[appkeys.SETTINGS].public_url,
                       request.app[appkeys.TRUSTED])
    url = f"{base}/s/{session.id}/"
    state = session.backend_state

    def known(name: str, fallback: str = "") -> str:
        return state.get(PUBLIC_PREFIX + name, "") or fallback

    fields = {
        "phase": "ready",
        "message": f"server running at {url}",
        "url": url,
        "token": token,
        "image": known("image"),
        "repo_url": known("repo_url", spec.repo_url),
        "binder_ref_url": known("binder_ref_url", spec.ref_url),
        "binder_launch_host": f"{base}/",
        "binder_request": spec.binder_request,
        "binder_persistent_request": known("binder_persistent_request", spec.binder_request),
        "binder_client_ip": client_ip(request, request.app[appkeys.TRUSTED]),
    }
    return {name: value for name, value in fields.items() if value}


def _failure(event: dict[str, Any]) -> BrokerError:
    """A session's own failed/stopped event as the error a /build client sees."""
    message = str(event.get("message") or "The session could not be started")
    if event.get("phase") == "stopped":
        return Unavailable(f"The session ended before it was ready: {message}",
                           reason="session_ended", retry_after=5)
    error = BrokerError(message, reason=str(event.get("reason") or "upstream_failed"))
    status = event.get("status_code")
    error.status = status if isinstance(status, int) and 400 <= status < 600 else 502
    return error


async def _follow(
    request: web.Request,
    stream: _Stream,
    manager: SessionManager,
    session: Session,
    token: str | None,
    spec: BuildSpec,
) -> bool:
    """Relay one session's launch to the stream; False if it must be retried afresh."""
    keepalive = request.app[appkeys.SETTINGS].build_keepalive
    with manager.following(session.id):
        return await _relay(request, stream, manager, session, token, spec, keepalive)


async def _relay(request: web.Request, stream: _Stream, manager: SessionManager,
                 session: Session, token: str | None, spec: BuildSpec, keepalive: float) -> bool:
    """The body of :func:`_follow`, while the visitor counts as following the session."""
    async for event in manager.events(session.id, keepalive=keepalive):
        if event is None:
            await stream.keepalive()
            continue
        phase = str(event.get("phase") or "")
        if phase == "ready":
            if token is None:
                token = await manager.issue_token(session.id)
            current = await manager.store.get(session.id)
            if token is None or current is None or current.status is not Status.READY:
                return False
            await stream.event(ready_event(request, current, token, spec))
            return True
        if phase in ("failed", "stopped"):
            await stream.failed(_failure(event))
            return True
        # BinderHub's fields, plus the spawn queue's place and estimated wait when queued.
        await stream.event({"phase": phase, "message": event.get("message", "")}
                           | {k: event[k] for k in _QUEUE_FIELDS if k in event})
    await stream.failed(Unavailable("The session ended before it was ready",
                                    reason="session_ended", retry_after=5))
    return True


async def _launch(request: web.Request, stream: _Stream, wanted: SessionRequest,
                  spec: BuildSpec, *, cookie_proof: bool) -> None:
    """Reuse on proof (a token, else the visitor cookie), or start a new session."""
    manager = request.app[appkeys.MANAGER]
    settings = request.app[appkeys.SETTINGS]
    presented = request_token(request) if settings.build_reuse else None
    for _attempt in range(_ATTEMPTS):
        token: str | None
        if presented:
            session, token, reused = await manager.create(wanted, presented)
        elif settings.build_reuse and cookie_proof:
            session, token, reused = await manager.launch(wanted)
        else:
            session, token, reused = await manager.create(wanted)
        if reused:
            await stream.event({"phase": "launching",
                                "message": "Found your running session, reconnecting..."})
        if await _follow(request, stream, manager, session, token, spec):
            return
        log.info("session %s ended while being reused; launching afresh", session.id)
    await stream.failed(Unavailable("The session ended while it was being reused; try again",
                                    reason="session_ended", retry_after=5))


# No HEAD: a link checker's HEAD request must not launch a session.
@routes.get("/build/{provider}/{spec:.+}", name="build", allow_head=False)
async def build(request: web.Request) -> web.StreamResponse:
    """Launch a session for a spec (on proof, the visitor's own again) as BinderHub's stream."""
    settings = request.app[appkeys.SETTINGS]
    events = EventStream(request)
    visitor, new_cookie = visitor_identity(request, settings)
    if new_cookie:
        scheme, _host = forwarded_proto_host(request, request.app[appkeys.TRUSTED])
        events.response.set_cookie(VISITOR_COOKIE, new_cookie, path="/build", httponly=True,
                                   samesite="Lax", secure=scheme == "https",
                                   max_age=settings.session_max_age)
    stream = _Stream(events)
    try:
        await events.start()
        try:
            if "text/event-stream" not in request.headers.get("Accept", ""):
                raise BadRequest("The launch endpoint answers Accept: text/event-stream only")
            spec = parse_spec(_raw_spec(request))
            owner = request_owner(request, request.app[appkeys.TRUSTED])
            wanted = SessionRequest(owner=owner, spec=spec.path,
                                    profile=profile_for(spec.path, settings.build_profiles),
                                    visitor=visitor)
            await _launch(request, stream, wanted, spec,
                          cookie_proof=bool(visitor) and not new_cookie)
        except BrokerError as error:
            log.log(logging.INFO if error.expected else logging.ERROR,
                    "/build %s refused: %s (%s)", request.match_info.get("provider", ""),
                    error.reason, error.message)
            await stream.failed(error)
        await events.end()
    except ConnectionResetError:
        log.info("a /build client left before its launch finished")
    return events.response
