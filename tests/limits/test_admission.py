"""Each admission limit through the real HTTP API, on the memory and the Redis store.

Time-based limits run on a :class:`ManualClock` shared by the app: a bucket
refills when the test advances the clock, never by sleeping.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from broker.store.memory import MemoryStore
from tests.conftest import BrokerHarness, ManualClock
from tests.limits.conftest import (
    ORIGIN,
    MakeLimited,
    assert_refusal,
    delete_session,
    post_session,
)
from tests.limits.upstream import SpawnGate


@pytest.fixture(params=["memory", "redis"])
def on_redis(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "redis")


async def test_creation_rate_is_a_token_bucket_with_exact_waits(
    make_limited: MakeLimited, clock: ManualClock, on_redis: bool
) -> None:
    broker = await make_limited(redis=on_redis, clock=clock, max_creations_per_owner=3,
                                creation_window=60)
    last: dict[str, Any] = {}
    for left in (2, 1, 0):
        status, headers, body = await post_session(broker)
        assert status == 201, body
        last = body  # the reuse index points at the newest session for (owner, spec)
        assert headers["X-RateLimit-Limit"] == "3"
        assert headers["X-RateLimit-Remaining"] == str(left)
        assert "X-RateLimit-Remaining" in headers["Access-Control-Expose-Headers"]
    status, headers, body = await post_session(broker)
    assert_refusal(status, headers, body, expect_status=429, reason="creation_rate")
    assert 20 <= int(headers["Retry-After"]) <= 25  # exactly 20 s, jittered upwards only
    assert f"{headers['Retry-After']} seconds" in body["message"]
    assert headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["X-RateLimit-Reset"]) == math.ceil(clock.now + 60)
    # Reusing a live session does not spend a token.
    status, _h, reused = await post_session(broker, headers={
        "Authorization": f"token {last['token']}"})
    assert status == 200 and reused["id"] == last["id"]
    clock.advance(19)
    assert (await post_session(broker))[0] == 429
    clock.advance(1)
    status, headers, _body = await post_session(broker)
    assert status == 201 and headers["X-RateLimit-Remaining"] == "0"


async def test_owner_sessions_cap_and_release_on_delete(
    make_limited: MakeLimited, on_redis: bool
) -> None:
    broker = await make_limited(redis=on_redis, max_sessions_per_owner=2)
    one = (await post_session(broker, spec="a"))[2]
    two = (await post_session(broker, spec="b"))[2]
    status, headers, body = await post_session(broker, spec="c")
    assert_refusal(status, headers, body, expect_status=429, reason="owner_sessions")
    assert 60 <= int(headers["Retry-After"]) <= 75
    assert "X-RateLimit-Limit" not in headers  # only the creation rate sends those
    # Reuse of a live session passes even at the cap.
    status, _h, again = await post_session(broker, spec="a",
                                           headers={"Authorization": f"token {one['token']}"})
    assert status == 200 and again["id"] == one["id"]
    await delete_session(broker, two)
    assert (await post_session(broker, spec="c"))[0] == 201


async def test_per_spec_caps_follow_repositories_and_patterns(
    make_limited: MakeLimited, on_redis: bool
) -> None:
    broker = await make_limited(redis=on_redis, max_sessions_per_spec=1,
                                spec_quotas=["gh/big/*=2", "gh/free/*=0"])
    assert (await post_session(broker, spec="gh/o/r/main"))[0] == 201
    # The same repository at another ref is the same repository.
    status, headers, body = await post_session(broker, spec="gh/o/r/HEAD")
    assert_refusal(status, headers, body, expect_status=503, reason="spec_capacity")
    assert body["message"] == "Too many users running gh/o/r! Try again soon."
    assert (await post_session(broker, spec="gh/o/other/main"))[0] == 201
    # A listed pattern has its own, higher quota; 0 lifts it.
    assert [(await post_session(broker, spec=f"gh/big/book/v{n}"))[0] for n in range(3)] \
        == [201, 201, 503]
    assert [(await post_session(broker, spec="gh/free/x/main"))[0] for _ in range(3)] \
        == [201, 201, 201]
    # Specs without a spec are not counted per spec.
    assert [(await post_session(broker))[0] for _ in range(2)] == [201, 201]


async def test_capacity_refuses_with_503_and_frees_when_a_session_ends(
    make_limited: MakeLimited, on_redis: bool
) -> None:
    broker = await make_limited(redis=on_redis, max_sessions=2)
    sessions = [(await post_session(broker, spec=f"s{n}"))[2] for n in range(2)]
    status, headers, body = await post_session(broker, spec="s3")
    assert_refusal(status, headers, body, expect_status=503, reason="capacity")
    assert 30 <= int(headers["Retry-After"]) <= 38
    await delete_session(broker, sessions[0])
    assert (await post_session(broker, spec="s3"))[0] == 201


async def test_a_failed_spawn_releases_everything(
    make_limited: MakeLimited, gate: SpawnGate, on_redis: bool
) -> None:
    broker = await make_limited(redis=on_redis, max_sessions=1, max_concurrent_spawns=1)
    gate.fail = True
    status, _h, body = await post_session(broker)
    assert status == 502 and body["reason"] == "upstream_failed"
    gate.fail = False
    assert (await post_session(broker))[0] == 201


async def test_upstream_lost_and_reaper_release_their_sessions(
    make_limited: MakeLimited, clock: ManualClock, on_redis: bool
) -> None:
    broker = await make_limited(redis=on_redis, clock=clock, max_sessions=1,
                                session_idle_timeout=60)
    lost = (await post_session(broker))[2]
    assert (await post_session(broker))[0] == 503
    await broker.manager.on_upstream_lost(lost["id"], "the server died")
    idle = (await post_session(broker))[2]
    assert idle["status"] == "ready"
    clock.advance(61)
    assert (await post_session(broker))[0] == 503  # idle, but not reaped yet: still counts
    assert await broker.manager.reap_once() == 1
    assert (await post_session(broker))[0] == 201


async def test_spawns_in_progress_are_capped(
    make_limited: MakeLimited, gate: SpawnGate, on_redis: bool
) -> None:
    gate.opened.clear()
    broker = await make_limited(redis=on_redis, max_concurrent_spawns=2)
    pending = [(await post_session(broker, wait=False, spec=f"p{n}"))[2] for n in range(2)]
    assert [p["status"] for p in pending] == ["pending", "pending"]
    status, headers, body = await post_session(broker, wait=False, spec="p3")
    assert_refusal(status, headers, body, expect_status=429, reason="spawn_concurrency")
    assert 5 <= int(headers["Retry-After"]) <= 7
    await gate.wait_for_waiting(2)
    gate.opened.set()
    for session in pending:
        waited = await broker.manager.wait(session["id"], 10)
        assert waited is not None and waited.status.value == "ready"
    assert (await post_session(broker, wait=False, spec="p3"))[0] == 201


class FlakyStore(MemoryStore):
    """The real memory store, except that one ``create`` fails as a store outage would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = True

    async def create(self, session: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("store unavailable")
        await super().create(session)


async def test_a_store_failure_never_leaves_a_half_created_session(
    make_limited: MakeLimited,
) -> None:
    store = FlakyStore()
    broker = await make_limited(store=store, max_sessions=1)
    status, _h, body = await post_session(broker)
    assert status == 500 and body["reason"] == "internal" and "Traceback" not in body["message"]
    assert await store.count_live() == 0
    assert (await post_session(broker))[0] == 201  # the slot was given back


async def build_final(broker: BrokerHarness, spec: str) -> dict[str, Any]:
    """The last event of a /build launch as a book page's EventSource sees it."""
    async with broker.http.get(f"{broker.url}/build/{spec}",
                               headers={"Accept": "text/event-stream", "Origin": ORIGIN}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        events = [json.loads(line[5:]) for line in (await resp.text()).splitlines()
                  if line.startswith("data:")]
    return events[-1]


async def test_build_refusals_are_failed_events_with_their_status(
    make_limited: MakeLimited,
) -> None:
    broker = await make_limited(max_creations_per_owner=2, max_sessions_per_spec=1,
                                build_reuse=False)
    assert (await build_final(broker, "gh/o/r/HEAD"))["phase"] == "ready"
    full = await build_final(broker, "gh/o/r/main")
    assert full["phase"] == "failed" and full["status_code"] == 503
    assert "Too many users running gh/o/r" in full["message"]
    # That refusal spent no token: one launch is left, then the rate limit.
    assert (await build_final(broker, "gh/o/other/HEAD"))["phase"] == "ready"
    limited = await build_final(broker, "gh/o/third/HEAD")
    assert limited["phase"] == "failed" and limited["status_code"] == 429
    assert limited["message"].startswith("Rate limit exceeded")


async def test_refusals_are_counted_by_reason(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_sessions=1)
    await post_session(broker)
    await post_session(broker)
    registry = broker.manager.metrics.registry
    assert registry.get_sample_value("broker_limit_refusals_total", {"reason": "capacity"}) == 1
    assert registry.get_sample_value("broker_session_creations_total",
                                     {"outcome": "refused", "reason": "capacity"}) == 1
