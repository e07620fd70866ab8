"""Both admission engines keep the same semantics (the Redis one on a real Redis).

Time is a :class:`ManualClock` value passed as ``now``: leases, bucket
refills and waits are checked exactly, never by sleeping. The Redis engine
runs its Lua on a real server under a private key prefix; its keys are
inspected raw to check nothing is left without an expiry (what a key holds
at a manual-clock time is read from its value, since Redis expires keys on
its own clock).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.policy.engines import Decision, Engine, MemoryEngine, RedisEngine, Slot, Ticket

NOW = 1_800_000_000.0


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if request.param == "memory":
        yield MemoryEngine()
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    yield RedisEngine(client, prefix=f"e{uuid.uuid4().hex[:8]}:")
    await client.aclose()


async def held(engine: Engine, now: float) -> list[str]:
    """The engine's state at ``now``, as names (``live``, ``o:owner``, ``rate:owner``...)."""
    if isinstance(engine, MemoryEngine):
        return engine.keys(now)
    assert isinstance(engine, RedisEngine)
    redis: Any = engine._redis  # the test inspects the engine's own keys
    names = []
    async for key in redis.scan_iter(match=f"{engine.prefix}*"):
        assert await redis.pttl(key) > 0, f"{key} has no expiry"
        name = key[len(engine.prefix):]
        # Redis expires keys on its own clock, which a manual clock cannot move: read what
        # a key holds at ``now`` instead (a bucket whose arrival time has passed is full;
        # its TTL, checked above, ends it for real).
        if name.startswith("rate:"):
            if float((await redis.get(key)).split()[0]) > now:
                names.append(name)
        elif await redis.zcount(key, f"({now!r}", "+inf"):
            names.append(name)
    return sorted(names)


def ticket(n: int, now: float = NOW, owner: str = "o1", subject: str = "", **caps: Any) -> Ticket:
    return Ticket(slot=Slot(f"s{n}", owner, subject), now=now, lease_until=now + 150, **caps)


async def test_caps_admit_exactly_up_to_the_limit(engine: Engine) -> None:
    for n in range(3):
        assert await engine.reserve(ticket(n, max_total=3)) == Decision()
    assert (await engine.reserve(ticket(3, max_total=3))).reason == "capacity"
    await engine.release(Slot("s1", "o1"))
    await engine.release(Slot("s1", "o1"))  # idempotent
    assert (await engine.reserve(ticket(4, max_total=3))).reason == ""
    assert (await engine.reserve(ticket(5, max_total=3))).reason == "capacity"


async def test_each_limit_has_its_reason_and_nothing_is_reserved_on_refusal(
    engine: Engine,
) -> None:
    assert (await engine.reserve(ticket(0, max_owner=1))).reason == ""
    assert (await engine.reserve(ticket(1, max_owner=1))).reason == "owner_sessions"
    # Another owner is not affected by o1's cap, and the refused s1 reserved nothing.
    assert (await engine.reserve(ticket(2, owner="o2", max_owner=1, max_total=2))).reason == ""
    assert (await engine.reserve(ticket(3, owner="o3", max_total=2))).reason == "capacity"
    assert (await engine.reserve(ticket(4, owner="o4", subject="repo", max_subject=1))).reason \
        == ""
    assert (await engine.reserve(ticket(5, owner="o5", subject="repo", max_subject=1))).reason \
        == "spec_capacity"
    assert (await engine.reserve(ticket(6, owner="o6", subject="other", max_subject=1))).reason \
        == ""
    # s0, s2, s4, s6 are spawning.
    assert (await engine.reserve(ticket(7, owner="o7", max_spawns=4))).reason \
        == "spawn_concurrency"


async def test_a_settled_spawn_frees_its_slot_and_holds_the_rest_until_expiry(
    engine: Engine,
) -> None:
    assert (await engine.reserve(ticket(0, max_spawns=1))).reason == ""
    assert (await engine.reserve(ticket(1, max_spawns=1))).reason == "spawn_concurrency"
    await engine.settle(Slot("s0", "o1"), NOW + 1, until=NOW + 86400)
    assert (await engine.reserve(ticket(1, now=NOW + 1, max_spawns=1))).reason == ""
    # Much later: s0 (ready) counts until its expiry, far beyond its first lease;
    # s1 (never settled) stopped counting when its lease ended at NOW + 151.
    later = NOW + 10_000
    assert (await engine.reserve(ticket(2, now=later, max_owner=2))).reason == ""
    assert (await engine.reserve(ticket(3, now=later, max_owner=2))).reason == "owner_sessions"
    # A failed spawn frees only its spawn slot; release frees the rest.
    await engine.settle(Slot("s2", "o1"), later, until=None)
    await engine.release(Slot("s2", "o1"))
    assert (await engine.reserve(ticket(4, now=later, max_owner=2))).reason == ""


async def test_settle_does_not_revive_a_released_session(engine: Engine) -> None:
    assert (await engine.reserve(ticket(0))).reason == ""
    await engine.release(Slot("s0", "o1"))
    await engine.settle(Slot("s0", "o1"), NOW, until=NOW + 86400)
    assert await held(engine, NOW) == []


async def test_leases_of_vanished_sessions_stop_counting(engine: Engine) -> None:
    assert (await engine.reserve(ticket(0, max_total=1))).reason == ""
    # Never settled or released (its replica died): counts until its lease ends.
    assert (await engine.reserve(ticket(1, now=NOW + 149, max_total=1))).reason == "capacity"
    assert (await engine.reserve(ticket(2, now=NOW + 150, max_total=1))).reason == ""


async def test_creation_bucket_is_exact(engine: Engine) -> None:
    caps = {"max_creations": 3, "window": 60.0}  # 3 at once, then one every 20 s
    remaining = []
    for n in range(3):
        decision = await engine.reserve(ticket(n, **caps))
        assert decision.reason == ""
        remaining.append(decision.remaining)
    assert remaining == [2, 1, 0]
    refused = await engine.reserve(ticket(3, **caps))
    assert refused.reason == "creation_rate"
    assert refused.wait == pytest.approx(20.0) and refused.reset == pytest.approx(60.0)
    assert (await engine.reserve(ticket(4, now=NOW + 19.9, **caps))).reason == "creation_rate"
    passed = await engine.reserve(ticket(5, now=NOW + 20, **caps))
    assert passed.reason == "" and passed.remaining == 0
    # A full bucket after a whole window: the burst is back, and the state is gone.
    await engine.release(Slot("s0", "o1"))
    for n in (1, 2, 5):
        await engine.release(Slot(f"s{n}", "o1"))
    assert await held(engine, NOW + 80.0) == []
    assert (await engine.reserve(ticket(6, now=NOW + 80, **caps))).remaining == 2


async def test_a_refused_creation_consumes_no_token(engine: Engine) -> None:
    caps = {"max_creations": 2, "window": 60.0, "max_total": 1}
    assert (await engine.reserve(ticket(0, **caps))).reason == ""
    assert (await engine.reserve(ticket(1, **caps))).reason == "capacity"
    await engine.release(Slot("s0", "o1"))
    assert (await engine.reserve(ticket(2, **caps))).remaining == 0


async def test_state_is_named_and_released(engine: Engine) -> None:
    assert (await engine.reserve(ticket(0, subject="repo", max_subject=5, max_creations=5,
                                        window=50.0))).reason == ""
    assert await held(engine, NOW) == ["live", "o:o1", "p:repo", "rate:o1", "spawn"]
    await engine.release(Slot("s0", "o1", "repo"))
    assert await held(engine, NOW) == ["rate:o1"]
    assert await held(engine, NOW + 10.0) == []  # the bucket refilled: no state at all


async def test_the_bucket_clock_never_runs_backwards(engine: Engine) -> None:
    # Requests reach the engine out of the order their `now` was read (replicas, or
    # concurrent handlers): an earlier stamp must not find the bucket emptier.
    caps = {"max_creations": 2, "window": 60.0}
    assert (await engine.reserve(ticket(0, now=NOW + 0.5, **caps))).reason == ""
    second = await engine.reserve(ticket(1, now=NOW, **caps))
    assert second.reason == "" and second.remaining == 0
    third = await engine.reserve(ticket(2, now=NOW, **caps))
    assert third.reason == "creation_rate" and third.wait == pytest.approx(30.0)
