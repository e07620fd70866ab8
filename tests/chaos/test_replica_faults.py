"""A replica SIGKILLed under traffic: two ``session-broker serve`` processes on the
local backend over one Redis; the survivor serves the dead one's sessions, and
no server outlives its record by more than one reap interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore
from tests.brokerproc import broker_process
from tests.conftest import marked_for, pid_alive, wait_for_exit
from tests.kernelproto import execute

SECRET = "chaos-replicas"
REAP_INTERVAL = 1.0


def _auth(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"token {session['token']}"}


async def _create(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(f"{url}/api/v1/sessions", params={"wait": "true"}) as resp:
        body = await resp.json()
        assert resp.status == 201 and body["status"] == "ready", body
        return dict(body)


def _session_url(session: dict[str, Any], replica: str) -> str:
    """``session``'s base URL on a given replica (base_url names the one that created it)."""
    return f"{replica}/s/{session['id']}/"


@contextlib.asynccontextmanager
async def _traffic(http: aiohttp.ClientSession, urls: list[str], session: dict[str, Any],
                   seen: dict[str, set[int | str]]) -> AsyncIterator[None]:
    """Proxied calls for ``session`` through every replica in turn, statuses kept per replica."""
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            for url in urls:
                try:
                    async with http.get(f"{_session_url(session, url)}api/kernels",
                                        headers=_auth(session)) as resp:
                        seen.setdefault(url, set()).add(resp.status)
                except aiohttp.ClientError:
                    seen.setdefault(url, set()).add("unreachable")
            await asyncio.sleep(0.05)  # pacing of the load, not a synchronisation

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_a_killed_replica_leaves_its_sessions_to_the_other(
    redis_url: str, tmp_path: Path, fault_table: Any
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    env = {"BROKER_REDIS_URL": redis_url, "BROKER_REDIS_PREFIX": prefix,
           "BROKER_SECRET_KEY": SECRET, "BROKER_REAP_INTERVAL": str(REAP_INTERVAL),
           "BROKER_MAX_SESSIONS_PER_OWNER": "0"}
    store = RedisStore(redis_url, TokenCipher(SECRET), prefix=prefix)
    seen: dict[str, set[int | str]] = {}
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        stack.push_async_callback(store.close)
        a = await stack.enter_async_context(broker_process(
            tmp_path, env | {"BROKER_LOCAL_ROOT_DIR": str(tmp_path / "a")}))
        b = await stack.enter_async_context(broker_process(
            tmp_path, env | {"BROKER_LOCAL_ROOT_DIR": str(tmp_path / "b")}))
        kept, deleted, dropped = [await _create(http, a.url) for _ in range(3)]
        pids = {s["id"]: int((await store.get(s["id"])).backend_state["pid"])
                for s in (kept, deleted, dropped)}
        async with http.post(f"{kept['base_url']}api/kernels", json={"name": "python3"},
                             headers=_auth(kept)) as resp:
            assert resp.status == 201
            kernel = (await resp.json())["id"]
        channels = f"api/kernels/{kernel}/channels"
        params = {"session_id": "chaos", "token": kept["token"]}
        async with http.ws_connect(f"{_session_url(kept, a.url)}{channels}",
                                   params=params) as ws:
            await execute(ws, "x = 41")

        async with _traffic(http, [a.url, b.url], kept, seen):
            a.proc.send_signal(signal.SIGKILL)
            await a.proc.wait()
            # B's reaper runs every second meanwhile: it must not take A's servers for dead.
            async with http.ws_connect(f"{_session_url(kept, b.url)}{channels}",
                                       params=params) as ws:
                result = await execute(ws, "print(x + 1)")
            assert result.stdout == "42\n"
        assert seen[b.url] == {200}, seen
        assert all(pid_alive(pid) for pid in pids.values())  # A's servers outlived A

        async with http.delete(f"{b.url}/api/v1/sessions/{deleted['id']}",
                               headers=_auth(deleted)) as resp:
            assert resp.status == 204
        assert await wait_for_exit(pids[deleted["id"]])

        await store.delete(dropped["id"])  # the record is gone (expired, Redis lost it)
        # B's next sweep stops the server: within one reap interval (+ the sweep itself).
        assert await wait_for_exit(pids[dropped["id"]], REAP_INTERVAL + 10)

        async with http.get(f"{b.url}/api/v1/sessions/{kept['id']}",
                            headers=_auth(kept)) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"
        async with http.delete(f"{b.url}/api/v1/sessions/{kept['id']}",
                               headers=_auth(kept)) as resp:
            assert resp.status == 204
        assert await wait_for_exit(pids[kept["id"]])
    leftovers = [pid for pid in pids.values() if pid_alive(pid)]
    assert leftovers == []
    fault_table.record(
        fault="Replica killed (SIGKILL) under traffic, local backend, shared Redis",
        injected="SIGKILL to one of two `session-broker serve` replicas while its session "
        "was used through both",
        clients_saw="the other replica answered 200 throughout and ran the dead replica's "
        "kernel with its state; a delete through it stopped the dead replica's server",
        lost="nothing; a server whose record was removed was stopped by the next reap sweep",
    )


async def test_waiting_on_a_spawn_whose_replica_died_ends_in_504_naming_it(
    redis_url: str, tmp_path: Path, fault_table: Any
) -> None:
    """A replica dies mid-spawn; its client reuses the pending session through the
    other replica with ?wait=true. Nobody will finish that spawn before the reaper
    calls it lost, so the wait ends in 504 wait_timeout naming the session, never in
    a 200 that says "pending"; a delete then stops whatever the dead spawn started."""
    spawn_timeout = 3
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    env = {"BROKER_REDIS_URL": redis_url, "BROKER_REDIS_PREFIX": prefix,
           "BROKER_SECRET_KEY": SECRET, "BROKER_REAP_INTERVAL": str(REAP_INTERVAL),
           "BROKER_SPAWN_TIMEOUT": str(spawn_timeout), "BROKER_MAX_SESSIONS_PER_OWNER": "0"}
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        a = await stack.enter_async_context(broker_process(
            tmp_path, env | {"BROKER_LOCAL_ROOT_DIR": str(tmp_path / "a")}))
        b = await stack.enter_async_context(broker_process(
            tmp_path, env | {"BROKER_LOCAL_ROOT_DIR": str(tmp_path / "b")}))
        async with http.post(f"{a.url}/api/v1/sessions") as resp:
            pending = await resp.json()
        a.proc.send_signal(signal.SIGKILL)  # a server takes seconds to start: mid-spawn
        await a.proc.wait()
        assert pending["status"] == "pending", pending

        async with http.post(f"{b.url}/api/v1/sessions", params={"wait": "true"},
                             headers=_auth(pending)) as resp:
            status, body = resp.status, await resp.json()
        assert status == 504, body
        assert body["error"] == body["reason"] == "wait_timeout" and body["id"] == pending["id"]
        assert "token" not in body  # a reuse: the client has its token already

        async with http.delete(f"{b.url}/api/v1/sessions/{pending['id']}",
                               headers=_auth(pending)) as resp:
            assert resp.status == 204
        leftovers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                     if marked_for(pid, pending["id"])]
        for pid in leftovers:
            assert await wait_for_exit(pid)
    fault_table.record(
        fault="Replica killed (SIGKILL) during a spawn, the client waits through another",
        injected="SIGKILL to the replica running a spawn; the client reused the pending "
        "session through the other replica with POST ?wait=true",
        clients_saw="504 wait_timeout naming the session (never 200 pending); a delete "
        "through the other replica stopped what the dead spawn had started",
        lost="the session that was spawning",
    )
