"""The deny list: networks whose requests the broker refuses outright.

Entries come from ``BROKER_DENY_NETWORKS`` (fixed for the process) and from
``BROKER_DENY_LIST_FILE`` (one CIDR or address per line, ``#`` comments),
which is re-read whenever it changes (modification time, size or inode), checked every
``BROKER_DENY_LIST_RELOAD`` seconds: a mounted ConfigMap or a file an
operator edits takes effect without a restart. A file that cannot be read or
parsed keeps the previous list in force (and says so in the log), so a typo
never silently opens the door.

The address checked is the client address as :func:`~broker.policy.identity.client_ip`
resolves it (``X-Forwarded-For`` only from trusted proxies), so a denied
client cannot hide behind a forged header. Lookups cost one hash probe per
distinct prefix length in the list, not one comparison per entry.

A denied request gets 403 ``denied`` (JSON, with CORS headers) before any
handler runs; on ``/build/…`` it gets BinderHub's form, a ``failed`` event
with ``status_code`` 403, because an EventSource cannot read an HTTP error.
Probes and scrapes (``/health``, ``/ready``, ``/metrics``, ``/versions``)
are never refused: they come from the cluster, not from visitors.
Connections already open when an address becomes denied are left alone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from broker import sse
from broker.errors import Forbidden
from broker.policy.identity import Network, client_ip

log = logging.getLogger(__name__)

#: Routes a deny list never applies to (probes, scrapes).
EXEMPT_ROUTES = frozenset({"health", "ready", "metrics", "versions"})
MESSAGE = "Requests from your network are not accepted by this service."


def refusal() -> Forbidden:
    """The refusal a denied client gets (a fresh error each time: errors carry headers)."""
    return Forbidden(MESSAGE, reason="denied")


def parse_entries(lines: Iterable[str], source: str) -> list[Network]:
    """Networks from CIDR/address lines; blank lines and ``#`` comments are skipped."""
    networks: list[Network] = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{source}:{number}: {entry!r} is not an address or network") from None
    return networks


class DenyList:
    """Denied networks, from settings and an optional file reloaded when it changes."""

    def __init__(self, networks: Iterable[str] = (), path: str = "") -> None:
        self._static = parse_entries(networks, "BROKER_DENY_NETWORKS")
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._bad: tuple[int, int, int] | None = None
        self._from_file: list[Network] = []
        # (ip version, prefix length) -> network addresses as integers.
        self._index: dict[tuple[int, int], set[int]] = {}
        self._rebuild()
        if path:
            self.reload()

    def _rebuild(self) -> None:
        index: dict[tuple[int, int], set[int]] = {}
        for net in [*self._static, *self._from_file]:
            index.setdefault((net.version, net.prefixlen), set()).add(
                int(net.network_address))
        self._index = index

    @property
    def active(self) -> bool:
        """Whether any network is denied (checks are skipped entirely otherwise)."""
        return bool(self._index)

    def __len__(self) -> int:
        return sum(len(v) for v in self._index.values())

    def denied(self, address: str) -> bool:
        """Whether an address (as text) lies in a denied network."""
        if not self._index:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        value, version = int(ip), ip.version
        bits = 32 if version == 4 else 128
        for (net_version, prefix), starts in self._index.items():
            if net_version == version and (value >> (bits - prefix) << (bits - prefix)) in starts:
                return True
        return False

    def reload(self) -> bool:
        """Re-read the file if it changed on disk; True when the list changed.

        An unreadable or malformed file keeps the previous entries.
        """
        if not self.path:
            return False
        try:
            st = os.stat(self.path)
            # Inode too: a Kubernetes ConfigMap update swaps a symlink to a new file.
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp in (self._stamp, self._bad):
                return False
            with open(self.path, encoding="utf-8") as fh:
                networks = parse_entries(fh, self.path)
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError):
                self._bad = stamp  # said once per broken version of the file
            log.error("deny list %s not (re)loaded, keeping %d entries: %s", self.path,
                      len(self), exc)
            return False
        self._stamp = stamp
        changed = networks != self._from_file
        self._from_file = networks
        self._rebuild()
        if changed:
            log.info("deny list %s loaded: %d networks", self.path, len(networks))
        return changed

    async def watch(self, interval: float) -> None:
        """Reload the file every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.reload()


def build_failure() -> web.Response:
    """The /build form of the refusal: one BinderHub ``failed`` event, HTTP 200."""
    return sse.response(sse.encode_json(refusal().failed_event()))


def deny_middleware(deny: DenyList, trusted: list[Network],
                    on_refusal: Callable[[web.Request], None]) -> Middleware:
    """The middleware refusing denied clients; ``on_refusal(request)`` counts each refusal.

    It sits inside the error/CORS middleware, so its 403 is the usual JSON
    error with CORS headers for allowed origins.
    """

    @web.middleware
    async def refuse_denied(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (deny.active and request.match_info.route.name not in EXEMPT_ROUTES
                and deny.denied(client_ip(request, trusted))):
            on_refusal(request)
            if request.path.startswith("/build/"):
                return build_failure()
            raise refusal()
        return await handler(request)

    return refuse_denied
