"""JupyterHub backend lifecycle: failed spawns, timeouts and expiry leave nothing on the hub.

The profiles used here are :mod:`tests.hubspawner`'s: ``exits`` (the server
process dies at start-up), ``never`` (it never answers), and any unknown
name (refused by the hub's ``apply_user_options`` as bad user_options).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker.models import Status
from tests.conftest import MakeBroker, ManualClock, free_port, pid_alive
from tests.hub.conftest import PREFIX, HubBroker, gone_from_hub, post_session, read_events
from tests.hubfixture import HubConfig, RunningHub, start_hub


@pytest.mark.parametrize(
    ("profile", "hub_says"),
    [("no-such-profile", "No such profile: 'no-such-profile'"),
     ("exits", "exited with code 3")],
    ids=["bad-user-options", "server-exits"],
)
async def test_failed_spawn_is_502_and_leaves_no_user(
    hub: RunningHub, hub_broker: HubBroker, profile: str, hub_says: str
) -> None:
    broker = await hub_broker()
    status, _, body = await post_session(broker, profile=profile)
    assert status == 502, body
    assert body["reason"] == "upstream_failed"
    assert hub_says in body["message"]  # the hub's own message, relayed
    assert await gone_from_hub(hub, f"{PREFIX}{body['id']}")


async def test_spawn_timeout_is_504_and_the_server_is_stopped(
    hub: RunningHub, hub_broker: HubBroker
) -> None:
    broker = await hub_broker(spawn_timeout=2)
    before = set(hub.spawned_pids())
    status, _, body = await post_session(broker, profile="never")
    assert status == 504, body
    assert body["reason"] == "spawn_timeout"
    assert await gone_from_hub(hub, f"{PREFIX}{body['id']}")
    started = set(hub.spawned_pids()) - before
    assert len(started) == 1  # the hub did start a process for it ...
    assert not any(pid_alive(pid) for pid in started)  # ... and it is gone


async def test_expired_session_is_removed_from_the_hub(
    hub: RunningHub, hub_broker: HubBroker
) -> None:
    clock = ManualClock(time.time())
    broker = await hub_broker(clock=clock, session_max_age=600)
    session = await broker.ready_session()
    user = f"{PREFIX}{session['id']}"
    status, listing = await hub.api("GET", f"users/{user}/tokens")
    assert status == 200
    [minted] = [t for t in listing["api_tokens"]
                if t.get("note") == f"jupyter-session-broker session {session['id']}"]
    assert minted["expires_at"] is not None  # the hub token dies with the session too

    headers = {"Authorization": f"token {session['token']}"}
    clock.advance(599)
    assert await broker.manager.reap_once() == 0
    async with broker.http.get(f"{session['base_url']}api/status", headers=headers) as resp:
        assert resp.status == 200
    clock.advance(1)
    async with broker.http.get(f"{session['base_url']}api/status", headers=headers) as resp:
        assert resp.status == 404  # expired: the token opens nothing any more
    assert await hub.user(user) is not None  # until the reaper's sweep
    assert await broker.manager.reap_once() == 1
    assert await hub.user(user) is None
    ended = await broker.store.get(session["id"], include_expired=True)
    assert ended.status is Status.STOPPED and ended.ended_reason == "max_age"


async def test_spawn_the_hub_finishes_before_answering(
    make_broker: MakeBroker, tmp_path: Path
) -> None:
    """With the hub's default slow_spawn_timeout (10 s) a fast spawn is answered 201.

    The progress stream then only says "ready"; the broker must still get the
    server's URL from it and mint its token.
    """
    fast = start_hub(tmp_path / "hub", name="default-timeout",
                     config=HubConfig(slow_spawn_timeout=10))
    try:
        broker = await make_broker(**fast.broker_settings())
        status, _, session = await post_session(broker)
        assert status == 201 and session["status"] == "ready", session
        messages = [e["message"] for e in await read_events(broker, session)]
        assert "Server requested" not in messages  # the hub had nothing left to report
        async with broker.http.get(f"{session['base_url']}api/status",
                                   headers={"Authorization": f"token {session['token']}"}) as resp:
            assert resp.status == 200
        async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                      headers={"Authorization": f"token {session['token']}"}
                                      ) as resp:
            assert resp.status == 204
        assert await fast.user_names(PREFIX) == []
    finally:
        fast.stop()


async def test_ready_reflects_the_hub(hub: RunningHub, hub_broker: HubBroker) -> None:
    broker = await hub_broker()
    async with broker.http.get(f"{broker.url}/ready") as resp:
        assert resp.status == 200
        checks = (await resp.json())["checks"]
    assert any(c["service"] == "backend:jupyterhub" and c["dependency"] == "upstream"
               and c["ok"] for c in checks), checks


async def test_unreachable_hub_is_503_with_retry_after(make_broker: MakeBroker) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    broker = await make_broker(backend="jupyterhub", hub_url=closed, hub_api_token="unused")
    status, headers, body = await post_session(broker)
    assert status == 503, body
    assert body["reason"] == "upstream_unreachable"
    assert int(headers["Retry-After"]) > 0
    # The pod stays ready (its visitors get the JSON 503 above); /ready reports the hub.
    async with broker.http.get(f"{broker.url}/ready") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["dependencies_ok"] is False
    assert any(c["service"] == "backend:jupyterhub" and not c["ok"] for c in body["checks"])


async def test_the_reaper_sweeps_hub_users_no_session_owns(
    hub: RunningHub, hub_broker: HubBroker
) -> None:
    """A user left behind (the hub was down when its session ended) goes at the next sweep."""
    broker = await hub_broker()
    status, _headers, live = await post_session(broker)
    assert status == 201 and live["status"] == "ready"
    leaked = f"{PREFIX}leftover0001"
    assert (await hub.api("POST", f"users/{leaked}"))[0] == 201
    other = "someone-else"  # not the broker's prefix: never touched
    assert (await hub.api("POST", f"users/{other}"))[0] == 201
    try:
        assert await broker.manager.reap_once() == 0  # sweeps are not session stops
        assert await hub.user(leaked) is None
        assert await hub.user(other) is not None
        stored = await broker.store.get(live["id"])
        assert stored.status is Status.READY
        assert await hub.user(stored.backend_state["hub_user"]) is not None
    finally:
        await hub.api("DELETE", f"users/{other}")
        async with broker.http.delete(f"{broker.url}/api/v1/sessions/{live['id']}",
                                      headers={"Authorization": f"token {live['token']}"}):
            pass
