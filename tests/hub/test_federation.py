"""Federation over real JupyterHubs (BROKER_UPSTREAMS): share by weight, a member going
down, and a member's refusal passing the spawn on.

Where spawning is not the point, sessions ask for the spawner's ``fast`` profile
(a minimal server answering ``api/status``; see tests/hubspawner.py); the
member-down test runs a real jupyterhub-singleuser with a kernel, because what
it asserts is what that kernel's WebSocket client reads.
"""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from broker import appkeys
from tests.binderstandin import BinderStandin
from tests.conftest import BrokerHarness, MakeBroker, eventually
from tests.hubfixture import RunningHub

ADMIN = "federation-admin-token"


def member(hub: RunningHub, name: str, weight: int, **extra: Any) -> dict[str, Any]:
    """A BROKER_UPSTREAMS entry for a test hub."""
    return {"name": name, "backend": "jupyterhub", "hub_url": hub.api_url,
            "hub_public_url": hub.public_url, "hub_api_token": hub.service_token,
            "weight": weight, **extra}


async def federated(make_broker: MakeBroker, members: list[dict[str, Any]],
                    **overrides: Any) -> BrokerHarness:
    return await make_broker(upstreams=json.dumps(members), admin_token=ADMIN, **overrides)


async def admin(broker: BrokerHarness, path: str) -> Any:
    async with broker.http.get(f"{broker.url}/api/v1/admin/{path}",
                               headers={"Authorization": f"token {ADMIN}"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def member_of(broker: BrokerHarness, session_id: str) -> str:
    return str((await admin(broker, f"sessions/{session_id}"))["member"])


async def delete(broker: BrokerHarness, session: dict[str, Any]) -> None:
    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status in (200, 204), await resp.text()


def spawns(broker: BrokerHarness, name: str, outcome: str) -> float:
    value = broker.app[appkeys.METRICS].registry.get_sample_value(
        "broker_upstream_spawns_total", {"member": name, "outcome": outcome})
    return float(value or 0)


async def test_weights_share_new_sessions(make_broker: MakeBroker, hub: RunningHub,
                                          second_hub: RunningHub) -> None:
    """Two hubs weighted 3:1 receive 40 new sessions within +-15% of 30:10."""
    broker = await federated(make_broker, [member(hub, "a", 3), member(second_hub, "b", 1)])
    sessions: list[dict[str, Any]] = []
    try:
        for _ in range(4):  # 10 at a time: the hubs' spawns overlap, the machine is small
            sessions += await asyncio.gather(*(broker.ready_session(profile="fast")
                                               for _ in range(10)))
        placed = collections.Counter([await member_of(broker, s["id"]) for s in sessions])
        assert 25.5 <= placed["a"] <= 34.5 and 8.5 <= placed["b"] <= 11.5, placed
        assert len(await second_hub.user_names("broker-")) == placed["b"]
        view = {m["name"]: m for m in (await admin(broker, "upstreams"))["members"]}
        assert view["a"]["healthy"] and view["b"]["healthy"]
        assert view["a"]["sessions"] == placed["a"] and view["b"]["sessions"] == placed["b"]
        assert spawns(broker, "a", "ready") == placed["a"]
    finally:
        await asyncio.gather(*(delete(broker, s) for s in sessions))


async def test_refusing_member_passes_the_spawn_on(make_broker: MakeBroker, hub: RunningHub,
                                                   limited_hub: RunningHub) -> None:
    """A member answering 429 (its active_server_limit is reached) sends the request to
    the next member, and what it started is removed from it."""
    broker = await federated(make_broker, [member(limited_hub, "limited", 10),
                                           member(hub, "a", 1)])
    first = await broker.ready_session(profile="fast")
    second: dict[str, Any] | None = None
    try:
        assert await member_of(broker, first["id"]) == "limited"
        async with broker.http.get(f"{broker.url}/versions") as resp:
            assert (await resp.json())["backend"] == "federation"
        second = await broker.ready_session(profile="fast")  # "limited" is tried first again
        assert await member_of(broker, second["id"]) == "a"
        assert spawns(broker, "limited", "refused") == 1
        # The refused attempt's hub user is stopped in the background.
        await eventually(lambda: _only_user(limited_hub, second["id"]), 30)
    finally:
        await asyncio.gather(*(delete(broker, s) for s in (first, second) if s))


async def _only_user(hub: RunningHub, session_id: str) -> bool:
    return f"broker-{session_id}" not in await hub.user_names("broker-")


async def test_any_replica_routes_and_stops_through_the_sessions_member(
        make_broker: MakeBroker, hub: RunningHub, second_hub: RunningHub,
        redis_url: str) -> None:
    """The member is stored with the session: another replica (its own rotation, its own
    health view) proxies to it and stops it on the right hub."""
    shared = {"redis_url": redis_url, "secret_key": "federation-replicas",
              "redis_prefix": f"f{uuid.uuid4().hex[:8]}:"}
    members = [member(second_hub, "b", 1), member(hub, "a", 1)]
    first = await federated(make_broker, members, **shared)
    other = await federated(make_broker, members, **shared)
    session = await first.ready_session(profile="fast")  # first pick of a fresh rotation: b
    assert await member_of(other, session["id"]) == "b"
    auth = {"Authorization": f"token {session['token']}"}
    through_other = session["base_url"].replace(first.url, other.url)
    async with other.http.get(f"{through_other}api/status", headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    await delete(other, session)
    assert f"broker-{session['id']}" not in await second_hub.user_names("broker-")


async def test_a_binderhub_member_refusing_passes_to_a_hub_member(
        make_broker: MakeBroker, hub: RunningHub, tmp_path: Path) -> None:
    """A mixed federation: the BinderHub (stand-in) answers 429 (its launch rate limit),
    the hub member starts the session; the BinderHub's health is its /versions."""
    binder = BinderStandin(tmp_path / "binderhub", rate_limit=0)  # every launch: 429
    await binder.start()
    try:
        broker = await federated(make_broker, [
            {"name": "binder", "backend": "binderhub", "binder_url": binder.url, "weight": 1},
            member(hub, "a", 1)], upstreams_health_interval=1.0)
        session = await broker.ready_session(spec="gh/org/repo/HEAD", profile="fast")
        try:
            assert await member_of(broker, session["id"]) == "a"
            assert spawns(broker, "binder", "refused") == 1 and len(binder.launches) == 1
            view = {m["name"]: m for m in (await admin(broker, "upstreams"))["members"]}
            assert view["binder"]["healthy"] and view["binder"]["backend"] == "binderhub"
        finally:
            await delete(broker, session)
        await binder.close()
        await eventually(lambda: _unhealthy(broker, "binder"), 20)
    finally:
        await binder.close()


async def _unhealthy(broker: BrokerHarness, name: str) -> bool:
    view = {m["name"]: m for m in (await admin(broker, "upstreams"))["members"]}
    return not view[name]["healthy"]


async def test_member_down_ends_its_sessions_and_routes_to_the_other(
        make_broker: MakeBroker, hub: RunningHub, second_hub: RunningHub) -> None:
    """Stopping one hub (which stops its servers): every new session goes to the other hub,
    and the stopped hub's session ends as upstream_down, which its clients read: REST and a
    kernel WebSocket reconnect get 404 session_ended naming it, its event stream the reason.

    The kernel WebSocket open at the time is closed, with a close frame and reason, when
    its server dies (the hub stops its servers before it exits), usually before the
    federation notices; its reconnect is what carries ``upstream_down``.
    """
    interval = 1.0
    doomed = second_hub  # stopped here: the next test asking for it gets a new one
    try:
        broker = await federated(make_broker, [member(doomed, "b", 1), member(hub, "a", 1)],
                                 upstreams_health_interval=interval)
        session = await broker.ready_session()  # a real server: the first pick is "b"
        assert await member_of(broker, session["id"]) == "b"
        kernel = await broker.start_kernel(session)
        auth = {"Authorization": f"token {session['token']}"}
        channels = f"{session['ws_url']}api/kernels/{kernel}/channels"
        async with broker.http.ws_connect(channels, headers=auth) as ws:
            await asyncio.to_thread(doomed.stop)
            new = [await broker.ready_session(profile="fast") for _ in range(2)]
            try:
                assert [await member_of(broker, s["id"]) for s in new] == ["a"] * 2
                async with asyncio.timeout(30):
                    while (closed := await ws.receive()).type not in (
                            aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        pass
                # Whichever comes first: the broker losing the kernel's end as its server
                # stops, or the federation ending the session. Never a bare disconnect.
                assert (closed.data, closed.extra) in (
                    (1011, "kernel connection lost"), (1000, "session ended: upstream_down"))
                ended = await eventually(lambda: _ended(broker, session), 10 * interval + 20)
                assert ended["status"] == "failed" and ended["ended_reason"] == "upstream_down"
                for url in (f"{session['base_url']}api/status", channels.replace("ws", "http", 1)):
                    async with broker.http.get(url, headers=auth) as resp:
                        assert resp.status == 404, url
                        body = await resp.json()
                        assert body["reason"] == "session_ended"
                        assert "upstream_down" in body["message"]
                view = {m["name"]: m for m in (await admin(broker, "upstreams"))["members"]}
                assert not view["b"]["healthy"] and view["a"]["healthy"]
            finally:
                await asyncio.gather(*(delete(broker, s) for s in new))
    finally:
        await asyncio.to_thread(doomed.stop)


async def _ended(broker: BrokerHarness, session: dict[str, Any]) -> dict[str, Any] | None:
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        body: dict[str, Any] = await resp.json()
        return body if body.get("status") in ("failed", "stopped") else None
