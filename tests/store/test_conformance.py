"""One conformance suite for every :class:`~broker.store.base.SessionStore`.

Each test runs against ``MemoryStore`` and ``RedisStore`` (a real
``redis-server``, see ``tests/conftest.py``) and checks the contract written
in :mod:`broker.store.base`. Time is a :class:`ManualClock`: expiry is tested
by advancing it, never by sleeping. Redis TTLs run on Redis's own clock, so
for Redis the retention tests read the TTLs the store set instead.

Tests whose name says ``redis`` inspect raw Redis state with a client of
their own (bytes, no decoding) under the store's unique key prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.errors import Unavailable
from broker.models import Session, Status, hash_token, new_session_id, new_token
from broker.store.base import EXPIRY_GRACE, MAX_EVENTS, TERMINAL_RETENTION, SessionStore
from broker.store.crypto import TokenCipher
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore
from tests.conftest import ManualClock, free_port

#: Slack for TTLs read back from Redis (seconds elapse between write and read).
TTL_SLACK = 5
#: Upper bound for anything that should happen "at once" (a loaded CI box).
PROMPT = 3.0


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> SessionStore:
    """Each store under test, on the shared ``clock``."""
    fixture: SessionStore = request.getfixturevalue(f"{request.param}_store")
    return fixture


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client of the test's own: raw bytes, so nothing is decoded for us."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    await client.aclose()


@pytest.fixture
async def raw_view(
    store: SessionStore, request: pytest.FixtureRequest
) -> AsyncIterator[aioredis.Redis | None]:
    """``raw`` when ``store`` is the Redis one, else None."""
    if not isinstance(store, RedisStore):
        yield None
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield client
    await client.aclose()


def make_session(clock: ManualClock, *, max_age: float = 600.0, **fields: Any) -> Session:
    values: dict[str, Any] = {
        "id": new_session_id(),
        "token_hash": hash_token(new_token()),
        "owner": "alice",
        "backend": "local",
        "created_at": clock(),
        "expires_at": clock() + max_age,
        "spec": "gh/org/repo/main",
        "last_activity": clock(),
        "message": "Waiting to launch",
    }
    values.update(fields)
    return Session(**values)


async def prefix_keys(raw: aioredis.Redis, store: RedisStore) -> dict[str, int]:
    """Every key under the store's prefix, with its TTL in seconds (-1: none)."""
    found: dict[str, int] = {}
    async for key in raw.scan_iter(match=f"{store.prefix}*", count=1000):
        found[key.decode()] = await raw.ttl(key)
    return found


async def collect(
    store: SessionStore, session_id: str, *, keepalive: float = 15.0, limit: float = PROMPT
) -> list[dict[str, Any] | None]:
    """Everything one subscription yields, failing if it does not end within ``limit``."""

    async def run() -> list[dict[str, Any] | None]:
        return [item async for item in store.subscribe(session_id, keepalive=keepalive)]

    return await asyncio.wait_for(run(), limit)


# -- records ----------------------------------------------------------------------


async def test_create_get_round_trips_every_field(store: SessionStore, clock: ManualClock) -> None:
    session = make_session(
        clock,
        profile="gpu",
        kernel_name="python3",
        status=Status.READY,
        last_activity=clock() + 1.25,
        upstream_url="http://127.0.0.1:40001/user/x/",
        upstream_token="upstream-sécret-token",
        backend_state={"pid": "4242", "hub_user": "brk-ü", "empty": ""},
        message="Ready: «ok»",
        ended_reason="",
    )
    await store.create(session)
    got = await store.get(session.id)
    assert got == session
    assert got is not session
    # Returned sessions are copies: mutating one never changes what is stored.
    got.backend_state["pid"] = "1"
    got.status = Status.STOPPED
    again = await store.get(session.id)
    assert again == session


async def test_unknown_session_is_none(store: SessionStore) -> None:
    assert await store.get("nope") is None
    assert await store.get("nope", include_expired=True) is None
    assert await store.find_reusable("no-such-key") is None


async def test_redis_stores_upstream_token_encrypted_and_never_the_broker_token(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    broker_token = new_token()
    upstream_token = "UPSTREAM-" + new_token()
    session = make_session(clock, token_hash=hash_token(broker_token),
                           upstream_token=upstream_token)
    await redis_store.create(session)
    await redis_store.publish(session.id, {"phase": "waiting", "message": "queued"})

    # redis-py types replies loosely (bytes | str | None); this client returns bytes.
    client: Any = raw
    record = await client.hgetall(f"{redis_store.prefix}s:{session.id}")
    stored = record[b"upstream_token"].decode()
    assert stored and stored != upstream_token
    assert TokenCipher("test-secret").decrypt(stored) == upstream_token
    assert record[b"token_hash"].decode() == hash_token(broker_token)

    everything = b""  # every value under the prefix, read by type (DUMP may compress)
    for key in await prefix_keys(raw, redis_store):
        kind = await client.type(key)
        if kind == b"hash":
            everything += b"".join(k + v for k, v in (await client.hgetall(key)).items())
        elif kind == b"stream":
            for _id, fields in await client.xrange(key):
                everything += b"".join(k + v for k, v in fields.items())
        elif kind == b"zset":
            everything += b"".join(await client.zrange(key, 0, -1))
        else:
            everything += await client.get(key) or b""
    assert session.id.encode() in everything  # the dump did read the stored values
    assert upstream_token.encode() not in everything
    assert broker_token.encode() not in everything


async def test_redis_store_with_another_secret_cannot_read_tokens(
    redis_url: str, redis_store: RedisStore, clock: ManualClock
) -> None:
    session = make_session(clock, upstream_token="tok")
    await redis_store.create(session)
    other = RedisStore(redis_url, TokenCipher("another-secret"), prefix=redis_store.prefix,
                       clock=clock)
    try:
        with pytest.raises(ValueError, match="BROKER_SECRET_KEY"):
            await other.get(session.id)
    finally:
        await other.close()


def test_cipher_with_a_different_secret_raises_a_clear_value_error() -> None:
    ciphertext = TokenCipher("one").encrypt("upstream-token")
    assert TokenCipher("one").decrypt(ciphertext) == "upstream-token"
    with pytest.raises(ValueError, match="BROKER_SECRET_KEY differs between replicas"):
        TokenCipher("two").decrypt(ciphertext)
    # Without a secret each cipher has a random key of its own.
    with pytest.raises(ValueError, match="cannot decrypt an upstream token"):
        TokenCipher().decrypt(TokenCipher().encrypt("x"))


# -- expiry -----------------------------------------------------------------------


async def test_expired_sessions_are_hidden_but_listed_for_the_reaper(
    store: SessionStore, clock: ManualClock
) -> None:
    session = make_session(clock, max_age=600)
    await store.create(session)

    clock.advance(599.5)
    assert await store.get(session.id) == session
    assert await store.count_live() == 1
    assert [s.id for s in await store.list_owner("alice")] == [session.id]
    assert await store.find_reusable(session.reuse_key) == session.id

    clock.advance(0.5)  # exactly expires_at: expired
    assert await store.get(session.id) is None
    assert await store.get(session.id, include_expired=True) == session
    assert await store.count_live() == 0
    assert await store.list_owner("alice") == []
    assert await store.find_reusable(session.reuse_key) is None
    assert [s.id for s in await store.list_live()] == [session.id]


async def test_indexes_count_owners_separately(store: SessionStore, clock: ManualClock) -> None:
    a1 = make_session(clock, spec="one")
    a2 = make_session(clock, spec="two", max_age=60)
    b1 = make_session(clock, owner="bob")
    for session in (a1, a2, b1):
        await store.create(session)
    assert await store.count_live() == 3
    assert {s.id for s in await store.list_owner("alice")} == {a1.id, a2.id}
    assert [s.id for s in await store.list_owner("bob")] == [b1.id]
    assert await store.list_owner("carol") == []

    clock.advance(60)  # a2 expires
    assert await store.count_live() == 2
    assert [s.id for s in await store.list_owner("alice")] == [a1.id]
    assert {s.id for s in await store.list_live()} == {a1.id, a2.id, b1.id}


async def test_memory_record_outlives_max_age_by_the_grace_only(clock: ManualClock) -> None:
    store = MemoryStore(TokenCipher(), clock=clock)
    session = make_session(clock, max_age=600)
    await store.create(session)
    clock.advance(600 + EXPIRY_GRACE - 1)
    assert await store.get(session.id, include_expired=True) == session
    assert [s.id for s in await store.list_live()] == [session.id]
    clock.advance(1)
    assert await store.get(session.id, include_expired=True) is None
    assert await store.list_live() == []


async def test_redis_keys_expire_with_the_session(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    session = make_session(clock, max_age=600)
    await redis_store.create(session)
    await redis_store.publish(session.id, {"phase": "waiting"})
    p = redis_store.prefix
    ttls = await prefix_keys(raw, redis_store)
    assert set(ttls) == {f"{p}s:{session.id}", f"{p}e:{session.id}", f"{p}live",
                         f"{p}o:alice", f"{p}r:{session.reuse_key}"}
    lasts = 600 + EXPIRY_GRACE
    assert lasts - TTL_SLACK <= ttls[f"{p}s:{session.id}"] <= lasts
    assert lasts - TTL_SLACK <= ttls[f"{p}e:{session.id}"] <= lasts
    assert lasts - TTL_SLACK <= ttls[f"{p}o:alice"] <= lasts
    assert 600 - TTL_SLACK <= ttls[f"{p}r:{session.reuse_key}"] <= 600
    assert ttls[f"{p}live"] == -1  # the one global index, cleaned by the store itself


async def test_redis_owner_index_outlives_the_owners_longest_session(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    long = make_session(clock, max_age=7200, spec="long")
    short = make_session(clock, max_age=60, spec="short")
    await redis_store.create(long)
    await redis_store.create(short)  # must not shorten the index under `long`
    ttl = await raw.ttl(f"{redis_store.prefix}o:alice")
    assert ttl >= 7200 + EXPIRY_GRACE - TTL_SLACK
    assert {s.id for s in await redis_store.list_owner("alice")} == {long.id, short.id}


# -- save, touch, terminal states --------------------------------------------------


async def test_save_persists_changes(store: SessionStore, clock: ManualClock) -> None:
    session = make_session(clock)
    await store.create(session)
    session.status = Status.READY
    session.upstream_url = "http://127.0.0.1:40002/"
    session.upstream_token = "up"
    session.backend_state = {"pid": "7"}
    session.message = "Ready"
    await store.save(session)
    assert await store.get(session.id) == session
    assert await store.count_live() == 1
    assert [s.status for s in await store.list_owner("alice")] == [Status.READY]
    assert [s.status for s in await store.list_live()] == [Status.READY]
    assert await store.find_reusable(session.reuse_key) == session.id


@pytest.mark.parametrize("status", [Status.FAILED, Status.STOPPED])
async def test_terminal_session_leaves_indexes_but_stays_readable(
    store: SessionStore, clock: ManualClock, status: Status, raw_view: aioredis.Redis | None
) -> None:
    session = make_session(clock)
    await store.create(session)
    await store.publish(session.id, {"phase": "waiting"})
    clock.advance(10)
    session.status = status
    session.ended_reason = "idle"
    await store.save(session)

    assert await store.count_live() == 0
    assert await store.list_live() == []
    assert await store.list_owner("alice") == []
    assert await store.find_reusable(session.reuse_key) is None
    got = await store.get(session.id)
    assert got is not None
    assert (got.status, got.ended_reason) == (status, "idle")

    if isinstance(store, RedisStore):  # Redis expires on its own clock: read the TTLs
        assert raw_view is not None
        p = store.prefix
        ttls = await prefix_keys(raw_view, store)
        assert set(ttls) == {f"{p}s:{session.id}", f"{p}e:{session.id}"}
        for ttl in ttls.values():
            assert TERMINAL_RETENTION - TTL_SLACK <= ttl <= TERMINAL_RETENTION
        return
    clock.advance(TERMINAL_RETENTION - 1)
    assert await store.get(session.id) is not None
    clock.advance(1)
    assert await store.get(session.id) is None
    assert await store.get(session.id, include_expired=True) is None


async def test_terminal_status_is_never_left(store: SessionStore, clock: ManualClock) -> None:
    # A spawn that read the session before a stop on another replica saves its stale copy.
    session = make_session(clock)
    await store.create(session)
    stale = dataclasses.replace(session, backend_state={})
    session.status = Status.STOPPED
    session.ended_reason = "user"
    await store.save(session)

    stale.status = Status.READY
    stale.upstream_url = "http://127.0.0.1:40003/"
    await store.save(stale)
    got = await store.get(session.id)
    assert got is not None
    assert (got.status, got.ended_reason) == (Status.STOPPED, "user")
    assert await store.count_live() == 0
    assert await store.list_live() == []
    assert await store.find_reusable(session.reuse_key) is None


async def test_touch_updates_last_activity_only(store: SessionStore, clock: ManualClock) -> None:
    session = make_session(clock, status=Status.READY, upstream_token="t")
    await store.create(session)
    await store.touch(session.id, clock() + 123.5)
    got = await store.get(session.id)
    assert got == dataclasses.replace(session, last_activity=clock() + 123.5)
    await store.touch("unknown", clock())
    assert await store.get("unknown", include_expired=True) is None


async def test_writes_after_delete_never_resurrect(
    store: SessionStore, clock: ManualClock, raw_view: aioredis.Redis | None
) -> None:
    session = make_session(clock)
    await store.create(session)
    await store.publish(session.id, {"phase": "waiting"})
    await store.delete(session.id)

    session.status = Status.READY
    await store.save(session)
    await store.touch(session.id, clock())
    await store.publish(session.id, {"phase": "ready"})
    session.status = Status.STOPPED
    await store.save(session)

    assert await store.get(session.id, include_expired=True) is None
    assert await store.list_live() == []
    assert await store.count_live() == 0
    assert await store.find_reusable(session.reuse_key) is None
    assert await collect(store, session.id) == []
    if isinstance(store, RedisStore):
        assert raw_view is not None
        assert await prefix_keys(raw_view, store) == {}


async def test_memory_writes_after_retention_never_resurrect(clock: ManualClock) -> None:
    store = MemoryStore(TokenCipher(), clock=clock)
    session = make_session(clock)
    await store.create(session)
    session.status = Status.FAILED
    await store.save(session)
    clock.advance(TERMINAL_RETENTION)
    await store.save(session)  # must not start a new retention period
    await store.touch(session.id, clock())
    await store.publish(session.id, {"phase": "failed"})
    assert await store.get(session.id, include_expired=True) is None
    assert await collect(store, session.id) == []


# -- reuse index ------------------------------------------------------------------


async def test_find_reusable_follows_the_newest_live_session(
    store: SessionStore, clock: ManualClock
) -> None:
    older = make_session(clock)
    await store.create(older)
    assert await store.find_reusable(older.reuse_key) == older.id
    other_spec = make_session(clock, spec="another")
    await store.create(other_spec)
    assert await store.find_reusable(other_spec.reuse_key) == other_spec.id

    newer = make_session(clock)
    assert newer.reuse_key == older.reuse_key
    await store.create(newer)
    assert await store.find_reusable(older.reuse_key) == newer.id
    # Ending or deleting the older session leaves the newer one's mapping alone.
    older.status = Status.STOPPED
    await store.save(older)
    assert await store.find_reusable(older.reuse_key) == newer.id
    await store.delete(older.id)
    assert await store.find_reusable(older.reuse_key) == newer.id

    newer.status = Status.FAILED
    await store.save(newer)
    assert await store.find_reusable(newer.reuse_key) is None
    await store.delete(other_spec.id)
    assert await store.find_reusable(other_spec.reuse_key) is None


# -- delete -----------------------------------------------------------------------


async def test_delete_removes_everything(
    store: SessionStore, clock: ManualClock, raw_view: aioredis.Redis | None
) -> None:
    sessions = [
        make_session(clock),
        make_session(clock),  # same reuse key as the first
        make_session(clock, owner="bob", spec="x", upstream_token="t"),
        make_session(clock, max_age=5),
    ]
    for session in sessions:
        await store.create(session)
        await store.publish(session.id, {"phase": "waiting", "message": "queued"})
    sessions[2].status = Status.STOPPED
    await store.save(sessions[2])
    await store.touch(sessions[0].id, clock() + 1)
    clock.advance(10)  # the last one is now expired but not reaped

    for session in sessions:
        await store.delete(session.id)
    await store.delete(sessions[0].id)  # twice is harmless

    for session in sessions:
        assert await store.get(session.id, include_expired=True) is None
        assert await store.find_reusable(session.reuse_key) is None
        assert await collect(store, session.id) == []
    assert await store.list_live() == []
    assert await store.list_owner("alice") == []
    assert await store.count_live() == 0
    if isinstance(store, RedisStore):
        assert raw_view is not None
        assert await prefix_keys(raw_view, store) == {}


async def test_redis_every_key_has_a_ttl_except_live(
    redis_store: RedisStore, raw: aioredis.Redis, clock: ManualClock
) -> None:
    ready = make_session(clock, owner="o1")
    stopped = make_session(clock, owner="o2")
    pending = make_session(clock, owner="o3", spec="s", max_age=30)
    for session in (ready, stopped, pending):
        await redis_store.create(session)
        await redis_store.publish(session.id, {"phase": "waiting"})
    ready.status = Status.READY
    await redis_store.save(ready)
    await redis_store.touch(ready.id, clock())
    await redis_store.publish(ready.id, {"phase": "ready"})
    stopped.status = Status.STOPPED
    await redis_store.save(stopped)
    await redis_store.publish(stopped.id, {"phase": "stopped"})

    ttls = await prefix_keys(raw, redis_store)
    assert len(ttls) == 11  # 3 records, 3 streams, live, 2 owners, 2 reuse keys
    no_ttl = sorted(key for key, ttl in ttls.items() if ttl < 0)
    assert no_ttl == [f"{redis_store.prefix}live"]


# -- events -----------------------------------------------------------------------


async def test_subscribe_replays_then_follows_concurrent_publishes(
    store: SessionStore, clock: ManualClock
) -> None:
    session = make_session(clock)
    await store.create(session)
    early: list[dict[str, Any]] = [
        {"phase": "waiting", "message": "queued"}, {"phase": "launching", "progress": 10}
    ]
    late: list[dict[str, Any]] = [
        {"phase": "launching", "progress": 50}, {"phase": "ready", "message": "done"}
    ]
    for event in early:
        await store.publish(session.id, event)

    replayed = [asyncio.Event(), asyncio.Event()]
    received: list[list[dict[str, Any] | None]] = [[], []]

    async def follow(n: int) -> None:
        async for item in store.subscribe(session.id, keepalive=30):
            received[n].append(item)
            if len(received[n]) == len(early):
                replayed[n].set()

    followers = [asyncio.create_task(follow(n)) for n in range(2)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in replayed)), PROMPT)
    assert not any(task.done() for task in followers)

    async def publish_late() -> None:
        for event in late:
            await store.publish(session.id, event)

    await asyncio.wait_for(asyncio.gather(publish_late(), *followers), PROMPT)
    assert received == [early + late, early + late]


@pytest.mark.parametrize("final", ["ready", "failed", "stopped"])
async def test_subscribe_stops_after_a_final_phase(
    store: SessionStore, clock: ManualClock, final: str
) -> None:
    session = make_session(clock)
    await store.create(session)
    await store.publish(session.id, {"phase": "waiting"})
    await store.publish(session.id, {"phase": final})
    await store.publish(session.id, {"phase": "launching", "message": "after the end"})
    assert await collect(store, session.id, keepalive=30) == [
        {"phase": "waiting"}, {"phase": final}
    ]


async def test_subscribe_yields_none_after_keepalive_seconds_of_silence(
    store: SessionStore, clock: ManualClock
) -> None:
    keepalive = 0.2
    session = make_session(clock)
    await store.create(session)
    await store.publish(session.id, {"phase": "waiting"})
    stream = store.subscribe(session.id, keepalive=keepalive)
    loop = asyncio.get_running_loop()
    try:
        assert await asyncio.wait_for(anext(stream), PROMPT) == {"phase": "waiting"}
        started = loop.time()
        assert await asyncio.wait_for(anext(stream), PROMPT) is None
        assert loop.time() - started >= keepalive * 0.9
        assert await asyncio.wait_for(anext(stream), PROMPT) is None  # and again
        # Still following after keepalives.
        await store.publish(session.id, {"phase": "ready"})
        item = await asyncio.wait_for(anext(stream), PROMPT)
        while item is None:  # a keepalive may fall due before the event arrives
            item = await asyncio.wait_for(anext(stream), PROMPT)
        assert item == {"phase": "ready"}
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), PROMPT)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_subscribe_to_unknown_session_ends_at_once(store: SessionStore) -> None:
    # The default keepalive is long: ending must not wait for a keepalive tick.
    assert await collect(store, "no-such-session", keepalive=15.0, limit=PROMPT) == []


async def test_subscribe_ends_when_the_session_is_deleted(
    store: SessionStore, clock: ManualClock
) -> None:
    keepalive = 1.0
    session = make_session(clock)
    await store.create(session)
    await store.publish(session.id, {"phase": "waiting"})
    got_first = asyncio.Event()
    received: list[dict[str, Any] | None] = []

    async def follow() -> None:
        async for item in store.subscribe(session.id, keepalive=keepalive):
            received.append(item)
            got_first.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(got_first.wait(), PROMPT)
    await store.delete(session.id)
    # Redis notices at its next keepalive check; neither store yields a keepalive
    # for a session that is gone.
    await asyncio.wait_for(task, keepalive + PROMPT)
    assert received == [{"phase": "waiting"}]


async def test_event_cap_keeps_the_final_event(store: SessionStore, clock: ManualClock) -> None:
    session = make_session(clock)
    await store.create(session)
    for n in range(MAX_EVENTS + 20):
        await store.publish(session.id, {"phase": "launching", "n": n})
    await store.publish(session.id, {"phase": "failed", "message": "out of memory"})
    events = await collect(store, session.id, keepalive=30)
    assert events[-1] == {"phase": "failed", "message": "out of memory"}
    assert len(events) <= MAX_EVENTS + 1
    numbers = [event["n"] for event in events[:-1] if event is not None]
    assert numbers == sorted(numbers)
    assert len(numbers) == len(events) - 1


async def test_publish_to_unknown_session_is_dropped(
    store: SessionStore, raw_view: aioredis.Redis | None
) -> None:
    await store.publish("ghost", {"phase": "waiting"})
    assert await collect(store, "ghost") == []
    if isinstance(store, RedisStore):
        assert raw_view is not None
        assert await prefix_keys(raw_view, store) == {}


async def test_ping_fails_only_when_the_store_is_unusable(store: SessionStore) -> None:
    await store.ping()
    if isinstance(store, RedisStore):
        gone = RedisStore(f"redis://127.0.0.1:{free_port()}/0", TokenCipher("x"))
        try:
            with pytest.raises(Unavailable) as refused:  # a 503, never a bare Redis error
                await gone.ping()
            assert refused.value.reason == "store_unavailable"
            assert refused.value.headers["Retry-After"] == "5"
        finally:
            await gone.close()


# -- locks (one reaper at a time across replicas) ---------------------------------------


async def test_lock_excludes_a_second_holder_until_released(store: SessionStore) -> None:
    assert await store.try_lock("reaper", ttl=60)
    assert not await store.try_lock("reaper", ttl=60)  # held, also by ourselves
    assert await store.try_lock("other", ttl=60)  # locks are independent
    await store.release_lock("reaper")
    assert await store.try_lock("reaper", ttl=60)
    await store.release_lock("reaper")
    await store.release_lock("other")


async def test_redis_lock_is_shared_by_replicas_and_expires(
    redis_url: str, clock: ManualClock
) -> None:
    prefix = "lock-test-" + str(id(clock)) + ":"
    first = RedisStore(redis_url, TokenCipher("k"), prefix=prefix, clock=clock)
    second = RedisStore(redis_url, TokenCipher("k"), prefix=prefix, clock=clock)
    try:
        assert await first.try_lock("reaper", ttl=0.3)
        assert not await second.try_lock("reaper", ttl=0.3)
        await second.release_lock("reaper")  # not the holder: no effect
        assert not await second.try_lock("reaper", ttl=0.3)
        # A holder that vanished without releasing blocks nobody for long.
        deadline = asyncio.get_running_loop().time() + 5
        while not await second.try_lock("reaper", ttl=30):
            assert asyncio.get_running_loop().time() < deadline, "lock never expired"
            await asyncio.sleep(0.05)
        await second.release_lock("reaper")
        assert await first.try_lock("reaper", ttl=30)
        await first.release_lock("reaper")
    finally:
        await first.close()
        await second.close()


# -- extra tokens (a cookie-proven /build reuse hands each launch its own token) ---------


async def test_token_hashes_are_appended_atomically_and_only_to_ready_sessions(
    store: SessionStore, clock: ManualClock
) -> None:
    session = make_session(clock)
    await store.create(session)
    assert not await store.add_token_hash(session.id, "a" * 64, 3)  # still pending
    session.status = Status.READY
    await store.save(session)
    # Many concurrent mints (as from several replicas): every one is kept, up to the cap.
    hashes = [f"{i:064x}" for i in range(3)]
    assert all(await asyncio.gather(*(store.add_token_hash(session.id, h, 3) for h in hashes)))
    stored = await store.get(session.id)
    assert sorted(stored.extra_token_hashes) == sorted(hashes)
    # A full list refuses: dropping a hash would invalidate a token already handed out.
    assert not await store.add_token_hash(session.id, "f" * 64, 3)
    stored = await store.get(session.id)
    assert sorted(stored.extra_token_hashes) == sorted(hashes)
    assert stored.token_hash == session.token_hash  # the first token is untouched
    assert not await store.add_token_hash("no-such-session", "b" * 64, 3)


async def test_redis_progress_streams_cannot_starve_the_store(
    redis_url: str, clock: ManualClock
) -> None:
    """Followers of a pending session block on XREAD in a pool of their own:
    past its size a follower gets a clean 503, and lookups keep working."""
    from broker.errors import Unavailable

    store = RedisStore(redis_url, TokenCipher("k"), prefix="streams-" + str(id(clock)) + ":",
                       clock=clock, max_subscribers=2)
    try:
        session = make_session(clock)
        await store.create(session)
        await store.publish(session.id, {"phase": "waiting"})
        followers = [store.subscribe(session.id, keepalive=30) for _ in range(3)]
        assert (await anext(followers[0]))["phase"] == "waiting"
        assert (await anext(followers[1]))["phase"] == "waiting"
        # Both now hold a blocking read; the third cannot get a connection.
        pending = [asyncio.ensure_future(anext(f)) for f in followers[:2]]
        pool = store._blocking.connection_pool
        for _ in range(500):  # until both hold a blocking read (redis-py offers no event)
            if len(pool._in_use_connections) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(pool._in_use_connections) == 2
        with pytest.raises(Unavailable) as refused:
            await anext(followers[2])
            await anext(followers[2])
        assert refused.value.status == 503 and refused.value.reason == "streams_busy"
        assert (await store.get(session.id)) is not None  # the main pool is untouched
        await store.publish(session.id, {"phase": "ready"})
        done = await asyncio.wait_for(asyncio.gather(*pending), 10)
        assert [e["phase"] for e in done] == ["ready", "ready"]
    finally:
        await store.close()


async def test_pool_claims_are_one_step_and_never_repeat(store: SessionStore) -> None:
    ids = [new_session_id() for _ in range(5)]
    for entry_id in ids:
        await store.pool_push("default", entry_id)
    assert await store.pool_ids("default") == ids
    taken = await asyncio.gather(*(store.pool_take("default") for _ in range(8)))
    assert sorted(t for t in taken if t is not None) == sorted(ids)  # each id exactly once
    assert taken.count(None) == 3
    assert await store.pool_ids("default") == []
    await store.pool_push("default", ids[0])
    assert await store.pool_remove("default", ids[0]) is True
    assert await store.pool_remove("default", ids[0]) is False  # someone else took it


async def test_adopt_rebinds_only_a_ready_entry_of_its_pool(
        store: SessionStore, clock: ManualClock) -> None:
    entry = make_session(clock, owner="pool:default", status=Status.READY)
    await store.create(entry)
    claimed = dataclasses.replace(entry, owner="alice", token_hash=hash_token(new_token()),
                                  expires_at=clock() + 900)
    assert await store.adopt(claimed, "pool:default") is True
    assert [s.id for s in await store.list_owner("alice")] == [entry.id]
    assert await store.list_owner("pool:default") == []
    assert await store.find_reusable(claimed.reuse_key) == entry.id
    assert (await store.get(entry.id)).expires_at == claimed.expires_at
    # Already claimed (no longer the pool's): a second claim of it changes nothing.
    again = dataclasses.replace(claimed, owner="bob")
    assert await store.adopt(again, "pool:default") is False
    assert (await store.get(entry.id)).owner == "alice"
    # An entry that ended (reaped, drained) is never revived by a claim.
    ended = make_session(clock, owner="pool:default", status=Status.READY)
    await store.create(ended)
    ended.status = Status.STOPPED
    await store.save(ended)
    revived = dataclasses.replace(ended, owner="alice", status=Status.READY)
    assert await store.adopt(revived, "pool:default") is False
    assert (await store.get(ended.id, include_expired=True)).status is Status.STOPPED
