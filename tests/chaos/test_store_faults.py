"""Redis killed (SIGKILL) and restarted under traffic, with and without persistence.

Each test runs its own redis-server (:mod:`tests.redisproc`), never the shared
one, and a broker on the local backend in front of it. Traffic keeps flowing
the whole time; no answer may ever be a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerHarness, MakeBroker, eventually, wait_for_exit
from tests.redisproc import RedisProcess

ORIGIN = "https://book.example.org"
LIMIT = 20.0  # seconds any one phase may take


@contextlib.asynccontextmanager
async def _traffic(broker: BrokerHarness, session: dict[str, Any],
                   seen: set[tuple[int, str]]) -> AsyncIterator[None]:
    """Reads and proxied calls for ``session`` in a loop; every (status, reason) is kept."""
    stop = asyncio.Event()
    headers = {"Authorization": f"token {session['token']}", "Origin": ORIGIN}

    async def loop() -> None:
        while not stop.is_set():
            for url in (f"{broker.url}/api/v1/sessions/{session['id']}",
                        f"{session['base_url']}api/kernels"):
                async with broker.http.get(url, headers=headers) as resp:
                    body = await resp.json(content_type=None)
                    seen.add((resp.status, body.get("reason", "") if isinstance(body, dict)
                              else ""))
            await asyncio.sleep(0.05)  # pacing of the load, not a synchronisation

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def _get(broker: BrokerHarness, session: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
async def test_redis_killed_and_restarted_under_traffic(
    make_broker: MakeBroker, tmp_path: Path, fault_table: Any, persistent: bool
) -> None:
    redis = RedisProcess(tmp_path / "redis", persistent=persistent)
    redis.start()
    try:
        broker = await make_broker(redis_url=redis.url, secret_key="chaos", reap_interval=1,
                                   allowed_origins=[ORIGIN])
        ready = await broker.ready_session()
        ready_pid = int((await broker.store.get(ready["id"])).backend_state["pid"])
        seen: set[tuple[int, str]] = set()
        async with _traffic(broker, ready, seen):
            _, in_flight = await broker.create(wait=False)  # spawning while Redis dies
            redis.kill()

            async def refused() -> tuple[int, dict[str, str], dict[str, Any]] | None:
                async with broker.http.post(f"{broker.url}/api/v1/sessions",
                                            headers={"Origin": ORIGIN}) as resp:
                    answer = (resp.status, dict(resp.headers), await resp.json())
                return answer if answer[0] == 503 else None

            _, headers, body = await eventually(refused)
            assert body["error"] == body["reason"] == "store_unavailable", body
            assert headers["Retry-After"] == "5"
            assert headers["Access-Control-Allow-Origin"] == ORIGIN
            read_status, read_body = await _get(broker, ready)
            assert (read_status, read_body["error"]) == (503, "store_unavailable")

            async def proxied_refused() -> bool:  # once this replica's 2 s cache lapsed
                async with broker.http.get(
                        f"{ready['base_url']}api/kernels",
                        headers={"Authorization": f"token {ready['token']}"}) as resp:
                    return resp.status == 503 and (await resp.json())["error"] == \
                        "store_unavailable"

            await eventually(proxied_refused)
            redis.start()

            async def answered() -> int | None:
                status, _ = await _get(broker, ready)
                return status if status != 503 else None

            after = await eventually(answered)
        assert all(status < 500 or (status, reason) == (503, "store_unavailable")
                   for status, reason in seen), seen
        assert (503, "store_unavailable") in seen

        async def settled() -> tuple[int, dict[str, Any]] | None:
            status, body = await _get(broker, in_flight)
            return None if status == 200 and body["status"] == "pending" else (status, body)

        flight_status, flight = await eventually(settled, 40)
        if persistent:
            assert after == 200
            assert flight_status == 200 and flight["status"] == "ready", flight
            seen_ready = "the spawn in flight ended ready"
            lost = "nothing: every session and the spawn in flight kept"
        else:
            # The records went with Redis: tokens no longer open anything, and the
            # servers they held are stopped by the next sweep (reap interval 1 s).
            assert after == 404
            assert flight_status == 404, flight
            assert await wait_for_exit(ready_pid, LIMIT)
            seen_ready = "the spawn in flight was undone (its record was gone)"
            lost = ("every session record (404 unknown_session afterwards); their servers "
                    "stopped by the next reaper sweep")
        async with broker.http.post(f"{broker.url}/api/v1/sessions",
                                    params={"wait": "true"}) as resp:
            assert resp.status == 201, await resp.text()  # creation works again
        fault_table.record(
            fault="Redis killed and restarted, " + ("append-only file on" if persistent
                                                    else "no persistence"),
            injected="SIGKILL to redis-server under read and proxy traffic with a spawn in "
            "flight; restarted on the same port",
            clients_saw="503 store_unavailable with Retry-After and CORS on create, read and "
            f"proxied calls while down, never 500; then {after} again; {seen_ready}",
            lost=lost,
        )
    finally:
        redis.stop()


async def test_wait_true_through_a_store_outage_gets_the_spawns_outcome(
    make_broker: MakeBroker, tmp_path: Path, fault_table: Any
) -> None:
    """Redis dies while POST ?wait=true waits and stays away past the spawn timeout:
    the answer is the spawn's own failure naming the session (never pending, never
    500), and that failure is recorded once Redis is back."""
    spawn_timeout = 4.0
    redis = RedisProcess(tmp_path / "redis", persistent=True)
    redis.start()
    try:
        broker = await make_broker(redis_url=redis.url, secret_key="chaos",
                                   spawn_timeout=spawn_timeout)
        request = asyncio.create_task(broker.create(wait=True))
        await eventually(broker.store.count_live)  # the session exists: its spawn is under way
        redis.kill()
        status, body = await asyncio.wait_for(request, spawn_timeout + 5 + LIMIT)
        assert status == 504 and body["error"] == body["reason"] == "spawn_timeout", body
        assert body["id"]
        redis.start()

        async def recorded() -> Any:
            session = await broker.store.get(body["id"], include_expired=True)
            return session if session is not None and session.status.terminal else None

        session = await eventually(recorded)
        assert (session.status.value, session.ended_reason) == ("failed", "spawn_timeout")
        fault_table.record(
            fault="Redis down while a spawn is awaited (wait=true)",
            injected="SIGKILL to redis-server (append-only file on) while POST ?wait=true "
            "waited on a spawn; restarted after the spawn timeout",
            clients_saw="504 spawn_timeout naming the session (never pending, never 500); "
            "once Redis was back the session read failed spawn_timeout",
            lost="the session that was spawning (its failure recorded when Redis returned)",
        )
    finally:
        redis.stop()
