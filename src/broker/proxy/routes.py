"""The ``/s/{id}/...`` route: authenticate once, then REST or WebSocket.

One route for every path under a session: aiohttp tries the resources under
a path prefix one after the other, so each extra ``/s/...`` route would cost
every proxied call a match attempt (the UI's pages, when not proxied, are
answered here, :func:`broker.proxy.ui.not_offered`).

With BROKER_JUPYTER_UI on, the same route serves the session's own Jupyter
UI (see :mod:`broker.proxy.ui`): the session cookie authenticates too, a
navigation carrying ``?token=`` is traded for it, and refused navigations get
a page instead of JSON.
"""

from __future__ import annotations

from aiohttp import web

from broker import appkeys
from broker.errors import BadRequest, BrokerError
from broker.models import Session
from broker.paths import (
    CHANNELS,
    TERMINAL_SOCKETS,
    UI_SOCKETS,
    check_remainder,
    check_ui_remainder,
)
from broker.policy.auth import request_token
from broker.proxy import ui
from broker.proxy.rest import forward
from broker.proxy.wsbridge import bridge

routes = web.RouteTableDef()
#: Methods that open a page (a UI path opened while the UI is not proxied).
_READS = ("GET", "HEAD")


@routes.route("*", "/s/{sid}/{tail:.*}", name="jupyter_rest")
async def jupyter(request: web.Request) -> web.StreamResponse:
    """Everything a Jupyter client sends to the session's ``base_url``."""
    sid = request.match_info["sid"]
    settings = request.app[appkeys.SETTINGS]
    if settings.jupyter_ui:
        return await _with_ui(request, sid, settings.jupyter_ui_terminals)
    remainder = _raw_remainder(request, sid)
    if request.method in _READS and (not remainder or ui.PAGES.fullmatch(remainder)):
        # Before the session lookup: whether the session exists is not revealed.
        return ui.not_offered(request)
    session = await request.app[appkeys.MANAGER].ready_session(sid, request_token(request))
    remainder = check_remainder(remainder)
    if CHANNELS.fullmatch(remainder):
        return await _socket(request, session, remainder)
    return await forward(request, session, remainder)


def _raw_remainder(request: web.Request, sid: str) -> str:
    raw = request.raw_path.split("?", 1)[0]
    prefix = f"/s/{sid}/"
    if not raw.startswith(prefix):
        raise BadRequest("The request target is not under the session's path", reason="bad_path")
    return raw[len(prefix):]


async def _socket(request: web.Request, session: Session, remainder: str) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise BadRequest("This endpoint needs a WebSocket upgrade")
    return await bridge(request, session, remainder)


async def _with_ui(request: web.Request, sid: str, terminals: bool) -> web.StreamResponse:
    """The route when the session's Jupyter UI is proxied too."""
    try:
        token = ui.ui_token(request)
        session = await request.app[appkeys.MANAGER].ready_session(sid, token)
        remainder = check_ui_remainder(_raw_remainder(request, sid))
    except BrokerError as error:
        if ui.is_navigation(request):
            return ui.refusal_page(error)
        raise
    assert token is not None  # ready_session refuses a request without one
    if "token" in request.query and ui.is_navigation(request):
        return ui.login(request, sid, token, remainder)
    if (CHANNELS.fullmatch(remainder) or UI_SOCKETS.fullmatch(remainder)
            or (terminals and TERMINAL_SOCKETS.fullmatch(remainder))):
        return await _socket(request, session, remainder)
    if not remainder and ui.is_navigation(request):
        return web.Response(status=302, headers={"Location": f"/s/{sid}/lab"})
    return await forward(request, session, remainder, ui_token=token)
