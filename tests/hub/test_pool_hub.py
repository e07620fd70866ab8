"""Warm pools on the real JupyterHub: shared by replicas, refused refills, restart, shrinking.

Entries are real hub users with running servers; the autouse ``no_leftovers``
guard checks that every test ends with none left on the hub.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp

from tests.brokerproc import broker_process
from tests.conftest import BrokerHarness, MakeBroker, eventually
from tests.hub.conftest import PREFIX
from tests.hubfixture import RunningHub
from tests.test_pool import ADMIN, filled

SECRET = "pool-test-secret"


async def _drain(broker: BrokerHarness) -> int:
    async with broker.http.delete(f"{broker.url}/api/v1/admin/pools",
                                  headers={"Authorization": f"token {ADMIN}"}) as resp:
        assert resp.status == 200
        return int((await resp.json())["stopped"])


async def _hub_servers(hub: RunningHub) -> list[str]:
    """The broker's hub users that have a running server."""
    names = []
    for name in await hub.user_names(PREFIX):
        model = await hub.user(name) or {}
        if model.get("servers"):
            names.append(name)
    return names


def _env(hub: RunningHub, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {f"BROKER_{k.upper()}": str(v) for k, v in hub.broker_settings().items()}
    env.update({"BROKER_REDIS_URL": redis_url, "BROKER_REDIS_PREFIX": prefix,
                "BROKER_SECRET_KEY": SECRET, "BROKER_ADMIN_TOKEN": ADMIN,
                "BROKER_MAX_SESSIONS_PER_OWNER": "0", **extra})
    return env


async def test_two_replicas_claim_a_pool_of_five_exactly_five_times(
        pool_hub: RunningHub, make_broker: MakeBroker, redis_url: str, tmp_path: Path) -> None:
    """Five hits, fifteen ordinary spawns; the hub (five servers at most) then refuses the
    misses and the refills at once, so the spawns are seen started without loading the
    machine with fifteen servers, and the refill's refusal backs off."""
    prefix = f"pool2r{os.getpid()}:"
    env = _env(pool_hub, redis_url, prefix, BROKER_POOL="default=5",
               BROKER_POOL_REFILL_CONCURRENCY="5", BROKER_POOL_WARM_KERNEL="false",
               BROKER_POOL_CHECK_INTERVAL="0.2")
    admin = {"Authorization": f"token {ADMIN}"}
    async with broker_process(tmp_path, env) as first, broker_process(tmp_path, env) as second, \
            aiohttp.ClientSession() as http:
        async def view(url: str) -> dict[str, Any]:
            async with http.get(f"{url}/api/v1/admin/pools", headers=admin) as resp:
                return dict((await resp.json())["pools"][0])

        async def full() -> bool:
            return (await view(first.url))["ready"] == 5

        await eventually(full, 90)

        async def create(url: str) -> dict[str, Any]:
            async with http.post(f"{url}/api/v1/sessions") as resp:
                body: dict[str, Any] = await resp.json()
                assert resp.status == 201, body
                return body

        made = await asyncio.gather(*(create(url) for url in [first.url, second.url] * 10))
        hits = [s for s in made if s["status"] == "ready"]
        spawns = [s for s in made if s["status"] == "pending"]
        assert len(hits) == 5 and len(spawns) == 15, [s["status"] for s in made]
        assert len({s["id"] for s in hits}) == 5

        async def status(session: dict[str, Any]) -> str:
            async with http.get(session_url(session),
                                headers={"Authorization": f"token {session['token']}"}) as resp:
                return str((await resp.json())["status"])

        async def misses_ended() -> bool:
            return all([await status(s) == "failed" for s in spawns])

        await eventually(misses_ended, 60)  # the full hub refused them: 503 capacity

        async def refill_backed_off() -> bool:
            views = [await view(first.url), await view(second.url)]
            return any(v["refill_paused_seconds"] > 0 for v in views)

        await eventually(refill_backed_off, 60)
        # Nothing leaked: the hub holds exactly the five claimed servers.
        assert sorted(await _hub_servers(pool_hub)) == sorted(f"{PREFIX}{s['id']}" for s in hits)
        await asyncio.gather(*(_delete(http, s) for s in hits))
    # Both replicas are gone; entries a refill may have started since are drained.
    cleaner = await make_broker(**pool_hub.broker_settings(
        redis_url=redis_url, redis_prefix=prefix, secret_key=SECRET, admin_token=ADMIN))
    await _drain(cleaner)


async def _delete(http: aiohttp.ClientSession, session: dict[str, Any]) -> None:
    async with http.delete(session_url(session),
                           headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 204


def session_url(session: dict[str, Any]) -> str:
    """The session's own resource URL (base_url is .../s/{id}/)."""
    base = session["base_url"].split("/s/")[0]
    return f"{base}/api/v1/sessions/{session['id']}"


async def test_entries_survive_a_restart_and_shrinking_stops_the_surplus(
        hub: RunningHub, make_broker: MakeBroker, redis_url: str, tmp_path: Path) -> None:
    prefix = f"poolsh{os.getpid()}:"
    env = _env(hub, redis_url, prefix, BROKER_POOL="default=2", BROKER_POOL_WARM_KERNEL="false",
               BROKER_POOL_REFILL_CONCURRENCY="2", BROKER_POOL_CHECK_INTERVAL="0.2")
    async with broker_process(tmp_path, env) as big, aiohttp.ClientSession() as http:
        async def two_ready() -> bool:
            async with http.get(f"{big.url}/api/v1/admin/pools",
                                headers={"Authorization": f"token {ADMIN}"}) as resp:
                return bool((await resp.json())["pools"][0]["ready"] == 2)

        await eventually(two_ready, 60)
    assert len(await _hub_servers(hub)) == 2  # a broker restart leaves the entries running
    # The same store, a smaller pool (a new release): the entries are found again, and
    # the surplus one is stopped on the hub.
    small = await make_broker(**hub.broker_settings(
        redis_url=redis_url, redis_prefix=prefix, secret_key=SECRET, admin_token=ADMIN,
        pool=["default=1"], pool_warm_kernel=False, pool_check_interval=0.2))

    async def one_left() -> bool:
        return len(await _hub_servers(hub)) == 1

    await eventually(one_left, 30)
    await filled(small, "default", 1)
    assert await _drain(small) == 1
