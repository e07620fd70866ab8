"""Owner identity: which visitor a request belongs to.

The owner is the key for session reuse and per-owner limits. It is the
client's IP address, taken from ``X-Forwarded-For`` only when the TCP peer is
one of ``BROKER_TRUSTED_PROXIES`` (walking the header from the right, past
every trusted hop, so a client cannot forge its way in by prepending
addresses). IPv6 clients are grouped by /64, the block one subscriber
usually holds, so rotating privacy addresses do not multiply a quota.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> list[Network]:
    """Networks from CIDR strings (validated already by Settings)."""
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip().strip('"')
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> bool:
    return any(address in net for net in nets)


def client_ip(request: web.BaseRequest, trusted: list[Network]) -> str:
    """The visitor's address, believing forwarding headers only from trusted proxies."""
    peer = _parse_ip(request.remote or "")
    if peer is None:
        return request.remote or "unknown"
    if not trusted or not _trusted(peer, trusted):
        return str(peer)
    headers = request.headers.getall("X-Forwarded-For", [])
    hops = [hop for header in headers for hop in header.split(",")]
    for hop in reversed(hops):
        address = _parse_ip(hop)
        if address is None:
            break  # garbage from an untrusted hop: stop at the last trusted one
        peer = address
        if not _trusted(address, trusted):
            break
    return str(peer)


def owner_key(ip: str) -> str:
    """The owner identity for an address: itself for IPv4, its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def forwarded_proto_host(request: web.BaseRequest, trusted: list[Network]) -> tuple[str, str]:
    """Scheme and host the client used, honouring X-Forwarded-* from trusted proxies."""
    scheme, host = request.scheme, request.host
    peer = _parse_ip(request.remote or "")
    if trusted and peer is not None and _trusted(peer, trusted):
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip() or scheme
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
    return scheme, host
