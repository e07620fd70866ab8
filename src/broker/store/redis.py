"""Redis session store: shared by every replica, so any replica serves any session.

Keys (all under ``BROKER_REDIS_PREFIX``):

=====================  =====================================================
``s:{id}``             hash: the session record (upstream token encrypted);
                       TTL = remaining max age + grace, or the retention of a
                       terminal session
``live``               sorted set of non-terminal session ids by expires_at
                       (capacity counts and the reaper's work list)
``o:{owner}``          sorted set of one owner's live session ids; TTL =
                       that of the owner's longest-lived record (never
                       shortened by a later, shorter session)
``r:{reuse key}``      string: id of the live session for (owner, spec);
                       TTL = remaining max age
``e:{id}``             stream of the session's progress events (the newest
                       ``MAX_EVENTS``); TTL follows the session record
``pool:{name}``        list: ids of a warm pool's ready entries, oldest
                       first; a claim is one LPOP (:mod:`broker.pool`)
=====================  =====================================================

Every write that must not resurrect a deleted session (save, touch,
publish) is a Lua script that first checks the record exists, so a late
write can never leave a key without a TTL behind; save also refuses to take
a failed/stopped record back to a live status.

When Redis cannot be reached (refused, reset, timed out, still loading its
data, a read-only replica after a failover), every operation raises
:class:`~broker.errors.Unavailable` with reason ``store_unavailable`` and a
``Retry-After``: clients get a well-formed 503, never a 500, and callers that
must record an outcome (the spawn) know to retry (:func:`store_unavailable`).

High availability (``BROKER_REDIS_URL`` may name a Sentinel-watched primary,
:mod:`broker.store.connect`):

* An operation whose effect is the same when applied twice (every read;
  create, save, touch, delete and lock release, which write whole values) is
  retried once, at once, on a fresh connection when the first attempt hits an
  outage: after a failover, each pooled connection to the old primary fails
  once, and the retry reaches the new one. Appends (progress events, token
  hashes) and lock takes are not retried here.
* With ``wait_replicas`` > 0, session writes (create, save, delete, token
  hashes) return only after ``WAIT`` saw that many replicas acknowledge
  them, or ``wait_timeout`` passed (logged): a session the client was told
  about survives the primary's loss.
* Session ends are announced on the ``{prefix}ended`` pub/sub channel, so
  every replica closes the session's WebSockets (:meth:`RedisStore.follow_ends`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from broker.backoff import Backoff
from broker.errors import Unavailable
from broker.models import Clock, Session, system_clock
from broker.store.base import EXPIRY_GRACE, FINAL_PHASES, MAX_EVENTS, TERMINAL_RETENTION
from broker.store.connect import RedisConnector
from broker.store.crypto import TokenCipher

log = logging.getLogger(__name__)

# KEYS: record, live, owner, reuse   ARGV: id, expires_at, record ttl, reuse ttl, field, value...
# The owner index lives as long as the owner's longest-lived session: a
# session with a shorter max age must not shorten it.
_CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4])
return 1
"""

# KEYS: record, live, owner, reuse, previous owner
# ARGV: id, expires_at, record ttl, reuse ttl, previous owner, field, value...
# A claimed pool entry: rebound only while it is still a ready entry of its pool.
_ADOPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'ready' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[5] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4])
return 1
"""

# KEYS: record, live, owner, reuse, events   ARGV: id, terminal(0/1), retention, field, value...
# A terminal record is never taken back to a live status (a stale copy saved
# by a spawn that lost a race with a stop).
_SAVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == '0' then
  local status = redis.call('HGET', KEYS[1], 'status')
  if status == 'failed' or status == 'stopped' then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('EXPIRE', KEYS[5], ARGV[3]) end
end
return 1
"""

# KEYS: record   ARGV: token hash, most hashes the list may hold (a full list refuses)
_APPEND_HASH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'ready' then return 0 end
local raw = redis.call('HGET', KEYS[1], 'extra_token_hashes')
local list = {}
if raw and raw ~= '' then list = cjson.decode(raw) end
if #list >= tonumber(ARGV[2]) then return 0 end
table.insert(list, ARGV[1])
local parts = {}
for i, h in ipairs(list) do parts[i] = '"' .. h .. '"' end
redis.call('HSET', KEYS[1], 'extra_token_hashes', '[' .. table.concat(parts, ',') .. ']')
return 1
"""

# KEYS: record   ARGV: when
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_activity', ARGV[1])
return 1
"""

# KEYS: record, live, owner, reuse, events   ARGV: id
_DELETE = """
redis.call('DEL', KEYS[1], KEYS[5])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS: record, events   ARGV: maxlen, payload
_PUBLISH = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], '*', 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# KEYS: lock   ARGV: holder (delete only a lock this instance still holds)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Seconds a client is told to wait when the store is unreachable.
STORE_RETRY_AFTER = 5
#: Redis trouble that says "the store is not usable right now", not "this request is wrong".
_OUTAGES = (
    redis_errors.ConnectionError,  # refused, reset, closed; BusyLoadingError is one too
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica promoted or demoted under us
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    OSError,
    TimeoutError,
)


@contextlib.contextmanager
def store_unavailable() -> Iterator[None]:
    """Turn a Redis outage raised inside the block into a 503 ``store_unavailable``.

    Also used around the Redis admission engine's calls (the session manager),
    so one mapping covers every Redis call a request makes.
    """
    try:
        yield
    except redis_errors.MaxConnectionsError:
        raise  # our own pool is full: the caller decides (see subscribe)
    except _OUTAGES as exc:
        raise Unavailable("The session store cannot be reached right now; try again soon",
                          reason="store_unavailable", retry_after=STORE_RETRY_AFTER) from exc


P = ParamSpec("P")
T = TypeVar("T")


def _mapped(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A store method whose Redis outages surface as :func:`store_unavailable` says."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        with store_unavailable():
            return await method(*args, **kwargs)

    return call


def _retried(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Like :func:`_mapped`, for an idempotent method: one more attempt after an outage.

    The failed connection was dropped from the pool, so the second attempt
    opens a new one (through the sentinels: to the current primary).
    """

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except redis_errors.MaxConnectionsError:
            raise
        except _OUTAGES:
            pass
        except Unavailable as exc:  # from a store method it calls (delete's read)
            if exc.reason != "store_unavailable":
                raise
        with store_unavailable():
            return await method(*args, **kwargs)

    return call


#: Connections of the main pool (lookups, writes, Lua scripts); each is held briefly.
_MAX_CONNECTIONS = 200

#: Longest single XREAD block; kept under the socket timeout.
_BLOCK_MS = 4000
#: WAIT's timeout while replicas are known to be short (see RedisStore._acked).
_SHORT_WAIT_MS = 10
#: Pauses between attempts to subscribe to session ends again.
_RESUBSCRIBE = Backoff(start=0.1, cap=2.0)


class RedisStore:
    """A :class:`~broker.store.base.SessionStore` on Redis (redis-py asyncio)."""

    def __init__(
        self,
        url: str,
        cipher: TokenCipher,
        *,
        prefix: str = "broker:",
        clock: Clock = system_clock,
        max_subscribers: int = 256,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self._connector = RedisConnector(url)
        # Typed loosely: redis-py's overloads for decode_responses=True do not
        # narrow bytes|str to str, and every reply here is text.
        self._redis: Any = self._connector.client(
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=(_BLOCK_MS / 1000) + 5,
            health_check_interval=30,
            max_connections=_MAX_CONNECTIONS,
        )
        # Progress streams block on XREAD, each holding a connection for seconds:
        # they get a pool of their own, so followers of pending sessions can
        # never starve session lookups, admission or the reaper.
        self._blocking: Any = self._connector.client(
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=(_BLOCK_MS / 1000) + 5,
            max_connections=max_subscribers,
        )
        self._wait_replicas = wait_replicas
        self._wait_ms = max(1, int(wait_timeout * 1000))
        #: Whether the last WAIT fell short (logged once per change, not per write).
        self._short = False
        self._cipher = cipher
        self._clock = clock
        self._p = prefix
        self._create = self._redis.register_script(_CREATE)
        self._adopt = self._redis.register_script(_ADOPT)
        self._save = self._redis.register_script(_SAVE)
        self._touch = self._redis.register_script(_TOUCH)
        self._add_token = self._redis.register_script(_APPEND_HASH)
        self._delete = self._redis.register_script(_DELETE)
        self._publish = self._redis.register_script(_PUBLISH)
        self._release = self._redis.register_script(_RELEASE)
        #: Identifies this store instance (replica) as a lock holder.
        self._holder = uuid.uuid4().hex

    @property
    def prefix(self) -> str:
        """The prefix of every key this store writes (``BROKER_REDIS_PREFIX``)."""
        return self._p

    @property
    def redis(self) -> aioredis.Redis:
        """The shared connection pool (limits and locks reuse it)."""
        redis: aioredis.Redis = self._redis
        return redis

    # -- keys ---------------------------------------------------------------
    def _k(self, kind: str, name: str = "") -> str:
        return f"{self._p}{kind}:{name}" if name else f"{self._p}{kind}"

    def _keys(self, session: Session) -> list[str]:
        return [
            self._k("s", session.id),
            self._k("live"),
            self._k("o", session.owner),
            self._k("r", session.reuse_key),
            self._k("e", session.id),
        ]

    def _flat_record(self, session: Session) -> list[str]:
        """The record as Lua script arguments: field, value, field, value..."""
        return [item for pair in session.to_record(self._cipher.encrypt).items() for item in pair]

    def _decode(self, record: dict[str, str]) -> Session | None:
        return Session.from_record(record, self._cipher.decrypt) if record else None

    async def _acked(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a session write; with ``wait_replicas``, return once replicas have it.

        ``WAIT`` counts the writes of its own connection, so the script and
        the WAIT share one (a single-connection client on the pool). Fewer
        acknowledgements than asked within the timeout leave the write in
        place (it happened on the primary; refusing now would only turn a
        stored session into an error the client retries): logged once per
        change between "replicated" and "short". While short (a replica down,
        or a new primary after a failover that has none yet), writes wait
        only :data:`_SHORT_WAIT_MS`: enough to notice replicas answering
        again, without slowing every session write by the full timeout.
        """
        if not self._wait_replicas:
            return await script(keys=keys, args=args)
        wait_ms = min(self._wait_ms, _SHORT_WAIT_MS) if self._short else self._wait_ms
        async with self._redis.client() as conn:
            result = await script(keys=keys, args=args, client=conn)
            acked = int(await conn.execute_command("WAIT", self._wait_replicas, wait_ms))
        short = acked < self._wait_replicas
        if short != self._short:
            self._short = short
            if short:
                log.warning("only %d of %d Redis replicas acknowledged a session write within "
                            "%d ms: a failover now could lose it", acked, self._wait_replicas,
                            self._wait_ms)
            else:
                log.info("Redis replicas acknowledge session writes again")
        return result

    # -- protocol -------------------------------------------------------------
    @_retried
    async def create(self, session: Session) -> None:
        remaining = max(1, math.ceil(session.expires_at - self._clock()))
        fields = self._flat_record(session)
        await self._acked(
            self._create, self._keys(session)[:4],
            [session.id, repr(session.expires_at), remaining + int(EXPIRY_GRACE), remaining,
             *fields],
        )

    @_retried
    async def get(self, session_id: str, *, include_expired: bool = False) -> Session | None:
        session = self._decode(await self._redis.hgetall(self._k("s", session_id)))
        if session is None:
            return None
        if not include_expired and not session.status.terminal and session.expired(self._clock()):
            return None
        return session

    @_retried
    async def save(self, session: Session) -> None:
        fields = self._flat_record(session)
        terminal = "1" if session.status.terminal else "0"
        await self._acked(
            self._save, self._keys(session),
            [session.id, terminal, int(TERMINAL_RETENTION), *fields],
        )

    @_retried
    async def touch(self, session_id: str, when: float) -> None:
        await self._touch(keys=[self._k("s", session_id)], args=[repr(when)])

    @_mapped
    async def add_token_hash(self, session_id: str, token_hash: str, keep: int) -> bool:
        added = await self._acked(self._add_token, [self._k("s", session_id)],
                                  [token_hash, keep])
        return bool(added)

    @_retried
    async def delete(self, session_id: str) -> None:
        session = await self.get(session_id, include_expired=True)
        if session is None:
            await self._redis.zrem(self._k("live"), session_id)
            await self._redis.delete(self._k("e", session_id))
            return
        await self._acked(self._delete, self._keys(session), [session_id])

    @_retried
    async def find_reusable(self, reuse_key: str) -> str | None:
        session_id = await self._redis.get(self._k("r", reuse_key))
        if not session_id:
            return None
        session = await self.get(session_id)
        if session is None or session.status.terminal:
            return None
        return str(session_id)

    async def _load_many(self, ids: list[str]) -> list[Session]:
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.hgetall(self._k("s", session_id))
            records = await pipe.execute()
        sessions = []
        vanished = []
        for session_id, record in zip(ids, records, strict=True):
            session = self._decode(record)
            if session is None:
                vanished.append(session_id)
            elif not session.status.terminal:
                sessions.append(session)
        if vanished:  # records that outlived their grace: drop the dangling index entries
            await self._redis.zrem(self._k("live"), *vanished)
        return sessions

    @_retried
    async def list_live(self) -> list[Session]:
        return await self._load_many(list(await self._redis.zrange(self._k("live"), 0, -1)))

    @_retried
    async def list_owner(self, owner: str) -> list[Session]:
        ids = await self._redis.zrangebyscore(self._k("o", owner), f"({self._clock()!r}", "+inf")
        return await self._load_many(list(ids))

    @_retried
    async def count_live(self) -> int:
        return int(await self._redis.zcount(self._k("live"), f"({self._clock()!r}", "+inf"))

    @_mapped
    async def publish(self, session_id: str, event: dict[str, Any]) -> None:
        await self._publish(
            keys=[self._k("s", session_id), self._k("e", session_id)],
            args=[MAX_EVENTS, json.dumps(event)],
        )

    async def subscribe(
        self, session_id: str, *, keepalive: float = 15.0
    ) -> AsyncIterator[dict[str, Any] | None]:
        stream = self._k("e", session_id)
        last = "0-0"
        silent_ms = 0
        with store_unavailable():
            if not await self._redis.exists(self._k("s", session_id)):
                return  # at once, not after a blocking read on a stream that never comes
        while True:
            block = min(_BLOCK_MS, max(1, int(keepalive * 1000) - silent_ms))
            try:
                with store_unavailable():
                    reply = await self._blocking.xread({stream: last}, count=100, block=block)
            except redis_errors.MaxConnectionsError as exc:  # its own pool is full
                raise Unavailable("Too many progress streams are open right now; try again "
                                  "soon", reason="streams_busy", retry_after=5) from exc
            if not reply:
                with store_unavailable():
                    if not await self._redis.exists(self._k("s", session_id)):
                        return
                silent_ms += block
                if silent_ms >= keepalive * 1000:
                    silent_ms = 0
                    yield None
                continue
            silent_ms = 0
            entries: list[tuple[str, dict[str, str]]] = reply[0][1]
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields["data"])
                yield event
                if event.get("phase") in FINAL_PHASES:
                    return

    @_mapped
    async def adopt(self, session: Session, previous_owner: str) -> bool:
        remaining = max(1, math.ceil(session.expires_at - self._clock()))
        adopted = await self._adopt(
            keys=[*self._keys(session)[:4], self._k("o", previous_owner)],
            args=[session.id, repr(session.expires_at), remaining + int(EXPIRY_GRACE),
                  remaining, previous_owner, *self._flat_record(session)],
        )
        return bool(adopted)

    @_mapped
    async def pool_push(self, pool: str, session_id: str) -> None:
        await self._redis.rpush(self._k("pool", pool), session_id)

    @_mapped
    async def pool_take(self, pool: str) -> str | None:
        taken = await self._redis.lpop(self._k("pool", pool))
        return str(taken) if taken else None

    @_mapped
    async def pool_ids(self, pool: str) -> list[str]:
        return [str(i) for i in await self._redis.lrange(self._k("pool", pool), 0, -1)]

    @_mapped
    async def pool_remove(self, pool: str, session_id: str) -> bool:
        return bool(await self._redis.lrem(self._k("pool", pool), 1, session_id))

    @_mapped
    async def try_lock(self, name: str, ttl: float) -> bool:
        taken = await self._redis.set(self._k("lock", name), self._holder, nx=True,
                                      px=max(1, int(ttl * 1000)))
        return bool(taken)

    @_retried
    async def release_lock(self, name: str) -> None:
        await self._release(keys=[self._k("lock", name)], args=[self._holder])

    @_retried
    async def announce_end(self, session_id: str, reason: str) -> None:
        await self._redis.publish(self._k("ended"),
                                  json.dumps({"id": session_id, "reason": reason}))

    async def follow_ends(self) -> AsyncIterator[tuple[str, str] | None]:
        """Session ends announced by any replica, as (session id, reason); runs until cancelled.

        Yields None after each (re)subscription: ends announced while this
        replica was not subscribed (an outage, a failover) were missed, and
        the caller checks the sessions it holds connections for. Pub/sub
        messages are replicated, so the subscription may sit on any node that
        follows the primary; a lost connection is resubscribed with backoff
        (through the sentinels: to the current primary).
        """
        pauses = _RESUBSCRIBE.delays()
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._k("ended"))
                yield None
                pauses = _RESUBSCRIBE.delays()  # subscribed: the next loss starts over
                while True:
                    # Blocks on the socket until a message or the timeout: no polling.
                    message = await pubsub.get_message(timeout=_BLOCK_MS / 1000)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        data = json.loads(message["data"])
                        yield str(data["id"]), str(data["reason"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignoring a malformed session-end message")
            except _OUTAGES as exc:
                log.warning("session-end subscription lost (%s: %s); subscribing again",
                            type(exc).__name__, exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(next(pauses))  # backoff towards Redis, not a synchronisation

    @_retried
    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._blocking.aclose()
        await self._redis.aclose()
        await self._connector.close()
