"""Limits are exact under concurrency and shared by replicas.

Three broker apps on loopback share one real Redis (the same key prefix:
one cluster) and receive 200 session creations at once, spread round-robin
over the three. Whatever the interleaving, a cap of 50 admits exactly 50;
every refusal is well-formed; and once the sessions end, the limiter has no
key left in Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import BrokerHarness
from tests.limits.conftest import (
    MakeLimited,
    assert_refusal,
    delete_session,
    post_session,
)
from tests.limits.upstream import SpawnGate

CREATIONS = 200
CAP = 50


async def three_replicas(make_limited: MakeLimited, **settings: Any) -> list[BrokerHarness]:
    return [await make_limited(redis=True, **settings) for _ in range(3)]


async def burst(replicas: list[BrokerHarness], count: int,
                headers_for: Any = None) -> list[tuple[BrokerHarness, int, Any, Any]]:
    """``count`` creations at once, round-robin over the replicas."""

    async def one(i: int) -> tuple[BrokerHarness, int, Any, Any]:
        broker = replicas[i % len(replicas)]
        headers = headers_for(i) if headers_for else None
        status, resp_headers, body = await post_session(broker, headers=headers)
        return broker, status, resp_headers, body

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def end_all(results: list[tuple[BrokerHarness, int, Any, Any]]) -> None:
    # Each session is deleted through a replica other than the one that created it.
    created = [(b, body) for b, status, _h, body in results if status == 201]
    others = [b for b, *_ in results]
    await asyncio.gather(*(delete_session(others[(i + 1) % len(others)], body)
                           for i, (_b, body) in enumerate(created)))


async def test_capacity_is_exact_across_three_replicas(
    make_limited: MakeLimited, redis_keys: Any
) -> None:
    replicas = await three_replicas(make_limited, max_sessions=CAP)
    results = await burst(replicas, CREATIONS)
    created = [r for r in results if r[1] == 201]
    refused = [r for r in results if r[1] != 201]
    assert len(created) == CAP and len(refused) == CREATIONS - CAP
    assert all(body["status"] == "ready" for *_x, body in created)
    for _b, status, headers, body in refused:
        assert_refusal(status, headers, body, expect_status=503, reason="capacity")
    # Every replica admitted some (the load really was spread) and the store agrees.
    assert all(any(b is r for b, *_ in created) for r in replicas)
    assert await replicas[0].store.count_live() == CAP
    # Full: one more is refused on any replica; after one ends, exactly one more fits.
    status, headers, body = await post_session(replicas[2])
    assert_refusal(status, headers, body, expect_status=503, reason="capacity")
    await delete_session(replicas[1], created[0][3])
    again = await burst(replicas, 6)
    assert sorted(status for _b, status, *_ in again) == [201] + [503] * 5

    await end_all(created[1:] + [r for r in again if r[1] == 201])
    keys = await redis_keys()
    assert not [k for k in keys if k.startswith("lim:")], keys
    # What remains is only the ended sessions' records and events, each expiring.
    assert {k.split(":", 1)[0] for k in keys} <= {"s", "e"}, keys
    assert all(ttl > 0 for ttl in keys.values()), keys


async def test_per_owner_cap_is_exact_across_three_replicas(
    make_limited: MakeLimited, redis_keys: Any
) -> None:
    owners = [f"198.51.100.{n}" for n in range(1, 11)]
    per_owner = 5
    replicas = await three_replicas(make_limited, max_sessions_per_owner=per_owner,
                                    trusted_proxies=["127.0.0.1/32"])
    results = await burst(replicas, CREATIONS,
                          lambda i: {"X-Forwarded-For": owners[i % len(owners)]})
    created = [r for r in results if r[1] == 201]
    assert len(created) == len(owners) * per_owner == CAP
    for _b, status, headers, body in (r for r in results if r[1] != 201):
        assert_refusal(status, headers, body, expect_status=429, reason="owner_sessions")
    live = await replicas[0].store.list_live()
    per = {owner: sum(1 for s in live if s.owner == owner) for owner in owners}
    assert per == dict.fromkeys(owners, per_owner)

    await end_all(created)
    keys = await redis_keys()
    assert not [k for k in keys if k.startswith("lim:")], keys
    assert all(ttl > 0 for ttl in keys.values()), keys


async def test_creation_rate_is_exact_across_three_replicas(
    make_limited: MakeLimited, redis_keys: Any
) -> None:
    replicas = await three_replicas(make_limited, max_creations_per_owner=30,
                                    creation_window=3600)
    results = await burst(replicas, CREATIONS // 2)
    created = [r for r in results if r[1] == 201]
    assert len(created) == 30
    for _b, status, headers, body in (r for r in results if r[1] != 201):
        assert_refusal(status, headers, body, expect_status=429, reason="creation_rate")
        # At most one token's wait (120 s, jittered). A request stamped a moment before
        # the last token was taken may be told a shorter, still exact, wait.
        assert 1 <= int(headers["Retry-After"]) <= 150
        assert headers["X-RateLimit-Limit"] == "30" and headers["X-RateLimit-Remaining"] == "0"
    remaining = sorted(int(h["X-RateLimit-Remaining"]) for _b, _s, h, _body in created)
    assert remaining == list(range(30))  # each token handed out exactly once
    status, headers, body = await post_session(replicas[1])
    assert_refusal(status, headers, body, expect_status=429, reason="creation_rate")
    assert 119 <= int(headers["Retry-After"]) <= 150

    await end_all(created)
    keys = await redis_keys()
    # The owner's bucket is the only limiter state left, and it expires when full again.
    assert [k for k in keys if k.startswith("lim:")] == ["lim:rate:127.0.0.1"], keys
    assert 0 < keys["lim:rate:127.0.0.1"] <= 3600 * 1000


async def test_concurrent_spawns_are_capped_across_replicas(
    make_limited: MakeLimited, gate: SpawnGate, redis_keys: Any
) -> None:
    gate.opened.clear()
    replicas = await three_replicas(make_limited, max_concurrent_spawns=3)

    async def create_nowait(i: int) -> tuple[int, Any, Any]:
        return await post_session(replicas[i % 3], wait=False)

    results = await asyncio.gather(*(create_nowait(i) for i in range(30)))
    started = [body for status, _h, body in results if status == 201]
    assert len(started) == 3 and all(b["status"] == "pending" for b in started)
    for status, headers, body in (r for r in results if r[0] != 201):
        assert_refusal(status, headers, body, expect_status=429, reason="spawn_concurrency")
    await gate.wait_for_waiting(3)
    gate.opened.set()
    # Once the three spawns are ready their slots are free again.
    for body in started:
        async with replicas[0].http.get(f"{replicas[0].url}/api/v1/sessions/{body['id']}/events",
                                        headers={"Authorization": f"token {body['token']}"}) as r:
            assert b'"phase": "ready"' in await r.read()
    more = await asyncio.gather(*(create_nowait(i) for i in range(3)))
    assert [status for status, *_ in more] == [201, 201, 201]
    for body in [*started, *(b for _s, _h, b in more)]:
        await delete_session(replicas[0], body)
    keys = await redis_keys()
    assert not [k for k in keys if k.startswith("lim:")], keys
