"""Where a request's credentials and identity come from.

Clients present their broker session token the way Jupyter clients present a
server token: ``Authorization: token <t>`` (or ``Bearer``), or ``?token=<t>``
(the only option for browser WebSockets and EventSource).
"""

from __future__ import annotations

from aiohttp import web

from broker import appkeys
from broker.policy.identity import client_ip, forwarded_proto_host, owner_key


def request_token(request: web.BaseRequest) -> str | None:
    """The broker token a request carries, header first, then query string."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return request.query.get("token") or None


def request_owner(request: web.Request) -> str:
    """The owner identity (client IP, IPv6 /64) of a request."""
    return owner_key(client_ip(request, request.app[appkeys.TRUSTED]))


def public_base(request: web.Request) -> str:
    """The broker's external base URL, without a trailing slash."""
    settings = request.app[appkeys.SETTINGS]
    if settings.public_url:
        return settings.public_url
    scheme, host = forwarded_proto_host(request, request.app[appkeys.TRUSTED])
    return f"{scheme}://{host}"
