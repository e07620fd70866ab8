"""Opening Redis from ``BROKER_REDIS_URL``: a server, over TLS or not, or a primary behind Sentinel.

Accepted forms (the ``redis://`` one is what a single-Redis deployment has
always used, and means the same):

* ``redis://[[user]:password@]host:port[/db]`` and ``rediss://...`` (TLS);
  redis-py's own query options pass through, e.g.
  ``?ssl_ca_certs=/etc/redis/ca.pem`` for a private CA, ``ssl_certfile`` /
  ``ssl_keyfile`` for a client certificate.
* ``redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE[/db]``
  (``rediss+sentinel://`` for TLS to sentinels and Redis alike). The password
  is the Redis servers' own; sentinels that require one of their own take
  ``?sentinel_password=``. The other query options are the same as above.

Discovery and failover handling are redis-py's (``redis.asyncio.sentinel``,
docs/protocols.md#redis-sentinel):
each new connection asks the sentinels for the current primary, and a
connection to a primary that was demoted is dropped (a ``ReadOnlyError``
becomes a connection error). So the broker follows a failover without a
restart; requests in between see the store as unavailable (503).

Clients are built without redis-py's own retries: its default retries every
command, writes included, which is not safe for a non-idempotent one (a
stream append). The store retries what it knows to be idempotent
(:mod:`broker.store.redis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
#: Query options that are numbers (the rest are passed to redis-py as strings).
_NUMERIC = {"socket_timeout": float, "socket_connect_timeout": float}


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_password: str | None = None
    #: redis-py connection options from the query (ssl_ca_certs, ...).
    options: dict[str, Any] = field(default_factory=dict)


def _host_port(part: str, url_kind: str) -> tuple[str, int]:
    host, sep, port = part.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{url_kind} names each sentinel as host:port; {part!r} is not")
    return host.strip("[]"), int(port)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[[user]:password@]h:p[,h:p...]/SERVICE[/db][?options]``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SENTINEL_SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    kind = f"{scheme}://"
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(part, kind) for part in hosts.split(",") if part)
    if not sentinels:
        raise ValueError(f"{kind} needs at least one sentinel host:port")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"{kind} ends in /SERVICE_NAME or /SERVICE_NAME/db (the name the "
                         "sentinels monitor)")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"{kind}: the database after the service name is a number, "
                         f"not {parts[1]!r}")
    options: dict[str, Any] = {}
    sentinel_password = None
    for name, values in parse_qs(query).items():
        if name == "sentinel_password":
            sentinel_password = values[-1]
        else:
            options[name] = _NUMERIC.get(name, str)(values[-1])
    return SentinelTarget(
        sentinels=sentinels, service=unquote(parts[0]), db=int(parts[1]) if len(parts) == 2
        else 0, username=username, password=password, tls=_SENTINEL_SCHEMES[scheme.lower()],
        sentinel_password=sentinel_password, options=options)


def check_redis_url(url: str) -> None:
    """Raise ValueError naming what is wrong with a ``BROKER_REDIS_URL`` (empty is fine)."""
    if not url:
        return
    if url.lower().startswith(_PLAIN_SCHEMES):
        parse_url(url)
        return
    if "+sentinel://" in url.lower():
        parse_sentinel_url(url)
        return
    raise ValueError("accepted forms are redis://, rediss:// (TLS), unix:// and "
                     "redis+sentinel://host:port[,host:port...]/SERVICE_NAME[/db]")


class RedisConnector:
    """Makes the store's clients for one URL; owns the Sentinel connections, if any."""

    def __init__(self, url: str) -> None:
        check_redis_url(url)
        self.url = url
        self._sentinel: Sentinel | None = None
        self._service = ""
        if "+sentinel://" in url.lower():
            target = parse_sentinel_url(url)
            tls: dict[str, Any] = {"ssl": True, **target.options} if target.tls else {}
            self._service = target.service
            self._sentinel = Sentinel(
                list(target.sentinels),
                sentinel_kwargs={"password": target.sentinel_password,
                                 "socket_connect_timeout": 2, "socket_timeout": 2, **tls},
                db=target.db, username=target.username, password=target.password,
                **(tls or target.options),
            )

    @property
    def sentinel(self) -> bool:
        """Whether the primary is found through sentinels."""
        return self._sentinel is not None

    def client(self, **options: Any) -> aioredis.Redis:
        """A client with its own connection pool (``options``: timeouts, pool size...)."""
        options = {"retry": Retry(NoBackoff(), 0), **options}
        if self._sentinel is not None:
            client: aioredis.Redis = self._sentinel.master_for(
                self._service, redis_class=aioredis.Redis, **options)
            return client
        return aioredis.Redis.from_url(self.url, **options)

    async def close(self) -> None:
        """Close the connections to the sentinels (the clients close their own pools)."""
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
