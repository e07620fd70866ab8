"""Where a request's credentials and identity come from.

Clients present their broker session token the way Jupyter clients present a
server token: ``Authorization: token <t>`` (or ``Bearer``), or ``?token=<t>``
(the only option for browser WebSockets and EventSource).

Nothing here reads the application: callers pass the trusted proxy networks
and the configured public URL, so policy stays below the web layer.
"""

from __future__ import annotations

from aiohttp import web

from broker.policy.identity import Network, client_ip, forwarded_proto_host, owner_key


def request_token(request: web.BaseRequest) -> str | None:
    """The broker token a request carries, header first, then query string."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    return request.query.get("token") or None


def request_owner(request: web.BaseRequest, trusted: list[Network]) -> str:
    """The owner identity (client IP, IPv6 /64) of a request; ``trusted``: the proxies whose
    ``X-Forwarded-For`` counts."""
    return owner_key(client_ip(request, trusted))


def public_base(request: web.BaseRequest, public_url: str, trusted: list[Network]) -> str:
    """The broker's external base URL, without a trailing slash: ``public_url`` when
    configured, else what the request (through ``trusted`` proxies) says."""
    if public_url:
        return public_url
    scheme, host = forwarded_proto_host(request, trusted)
    return f"{scheme}://{host}"
