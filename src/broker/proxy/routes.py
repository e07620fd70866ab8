"""The ``/s/{id}/...`` route: authenticate once, then REST or WebSocket."""

from __future__ import annotations

from aiohttp import web

from broker import keys
from broker.errors import BadRequest
from broker.policy.auth import request_token
from broker.proxy.paths import CHANNELS, check_remainder
from broker.proxy.rest import forward
from broker.proxy.wsbridge import bridge

routes = web.RouteTableDef()


@routes.route("*", "/s/{sid}/{tail:.*}", name="jupyter_rest")
async def jupyter(request: web.Request) -> web.StreamResponse:
    """Everything a Jupyter client sends to the session's ``base_url``."""
    sid = request.match_info["sid"]
    session = await request.app[keys.MANAGER].ready_session(sid, request_token(request))
    raw = request.raw_path.split("?", 1)[0]
    prefix = f"/s/{sid}/"
    if not raw.startswith(prefix):
        raise BadRequest("The request target is not under the session's path", reason="bad_path")
    remainder = check_remainder(raw[len(prefix):])
    if CHANNELS.fullmatch(remainder):
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise BadRequest("The kernel channels endpoint needs a WebSocket upgrade")
        return await bridge(request, session, remainder)
    return await forward(request, session, remainder)
