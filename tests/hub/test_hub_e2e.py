"""End to end through the broker on a real JupyterHub: progress, kernels, isolation.

Every session here is a real hub user with a real ``jupyterhub-singleuser``
behind configurable-http-proxy; the broker reaches it at the hub's public
(proxy) URL while it talks to the hub's API at the hub's own address.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Any

import aiohttp
import pytest

from tests.conftest import BrokerHarness, pid_alive
from tests.hub.conftest import PREFIX, HubBroker, read_events
from tests.hubfixture import RunningHub
from tests.kernelproto import V1, execute


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


async def _hub_token(broker: BrokerHarness, session_id: str) -> tuple[str, str]:
    """(upstream URL, upstream token) the broker keeps for a session (never a client's)."""
    stored = await broker.store.get(session_id, include_expired=True)
    return stored.upstream_url, stored.upstream_token


async def test_session_spawns_with_progress_and_runs_code(
    hub: RunningHub, hub_broker: HubBroker
) -> None:
    broker = await hub_broker()
    async with broker.http.post(f"{broker.url}/api/v1/sessions") as resp:
        assert resp.status == 201
        session = await resp.json()
    assert session["status"] == "pending"

    events = await read_events(broker, session)
    assert events[-1]["phase"] == "ready", events
    messages = [e["message"] for e in events]
    # The hub's own progress messages, relayed from its event stream.
    assert "Server requested" in messages, messages
    assert any(e.get("progress") == 0 and e["phase"] == "launching" for e in events)
    user = f"{PREFIX}{session['id']}"
    # Nothing a client reads names where the upstream server lives.
    assert not [m for m in messages if "/user/" in m or user in m], messages

    model = await hub.user(user)
    assert model is not None and model["servers"][""]["ready"] is True
    pid = int(model["servers"][""]["state"]["pid"])

    kernel = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel}/channels"
    for subprotocol in (None, V1):  # JSON text frames, then v1 binary frames
        async with broker.http.ws_connect(
            url, params={"session_id": f"s-{subprotocol}", "token": session["token"]},
            protocols=[subprotocol] if subprotocol else [],
        ) as ws:
            assert ws.protocol == subprotocol
            result = await execute(ws, "print(6*7)")
        assert result.stdout == "42\n"
        assert result.reply["status"] == "ok"
    # Reuse first asks the server, through the hub's proxy, whether it still answers.
    status, again = await broker.create(token=session["token"])
    assert status == 200 and again["id"] == session["id"]

    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers=_auth(session["token"])) as resp:
        assert resp.status == 204
    assert await hub.user(user) is None  # server stopped and user deleted on the hub
    assert not pid_alive(pid)


async def test_sessions_cannot_reach_each_other(
    hub: RunningHub, hub_broker: HubBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    broker = await hub_broker()
    (status_a, a), (status_b, b) = await asyncio.gather(broker.create(), broker.create())
    assert (status_a, a["status"], status_b, b["status"]) == (201, "ready", 201, "ready")
    seen: list[str] = [json.dumps(a), json.dumps(b)]  # everything a client was shown

    # A's broker token opens nothing of B's, on REST or on the kernel WebSocket.
    kernel_b = await broker.start_kernel(b)
    for path in ("api/status", "api/kernels", f"api/kernels/{kernel_b}"):
        async with broker.http.get(f"{b['base_url']}{path}", headers=_auth(a["token"])) as resp:
            assert resp.status == 403, path
            seen.append(await resp.text() + str(resp.headers))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await broker.http.ws_connect(f"{b['ws_url']}api/kernels/{kernel_b}/channels",
                                     params={"session_id": "x", "token": a["token"]})
    assert refused.value.status == 403

    # The hub enforces it too: A's hub token is scoped to A's server only.
    url_a, token_a = await _hub_token(broker, a["id"])
    url_b, token_b = await _hub_token(broker, b["id"])
    async with broker.http.get(f"{url_b}api/status", headers=_auth(token_a),
                               allow_redirects=False) as resp:
        assert resp.status == 403
    async with broker.http.get(f"{url_a}api/status", headers=_auth(token_a)) as resp:
        assert resp.status == 200

    # B's hub token: one server, expiring with the session.
    user_b = f"{PREFIX}{b['id']}"
    status, listing = await hub.api("GET", f"users/{user_b}/tokens")
    assert status == 200
    minted = [t for t in listing["api_tokens"]
              if t.get("note") == f"jupyter-session-broker session {b['id']}"]
    assert len(minted) == 1
    access = [s for s in minted[0]["scopes"] if s.startswith("access:servers")]
    assert access == [f"access:servers!user={user_b}"]
    expires = datetime.datetime.fromisoformat(minted[0]["expires_at"].replace("Z", "+00:00"))
    session_end = datetime.datetime.fromisoformat(b["expires_at"].replace("Z", "+00:00"))
    assert abs((expires - session_end).total_seconds()) < 30

    # Everything B's client could see: REST through the proxy, session views, events.
    for path in ("api/status", "api/kernels"):
        async with broker.http.get(f"{b['base_url']}{path}", headers=_auth(b["token"])) as resp:
            assert resp.status == 200
            seen.append(await resp.text() + str(resp.headers))
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{b['id']}",
                               headers=_auth(b["token"])) as resp:
        seen.append(await resp.text() + str(resp.headers))
    seen.append(json.dumps(await read_events(broker, b)))
    for session in (a, b):
        async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                      headers=_auth(session["token"])) as resp:
            assert resp.status == 204

    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    for secret in (token_a, token_b):
        assert not any(secret in text for text in seen), "a hub token reached a client"
        assert not any(secret in line for line in logged), "a hub token was logged"
        # Not in the hub's log either: it only ever travelled in headers, never in a URL.
        assert secret not in hub.log_text()


async def test_named_servers_share_an_owner_user_but_not_tokens(
    hub: RunningHub, hub_broker: HubBroker
) -> None:
    broker = await hub_broker(hub_named_servers=True)
    (_, one), (_, two) = await asyncio.gather(broker.create(), broker.create())
    assert one["status"] == two["status"] == "ready", (one, two)
    stored_one = await broker.store.get(one["id"])
    user = stored_one.backend_state["hub_user"]
    assert user.startswith(f"{PREFIX}owner-")
    assert (await broker.store.get(two["id"])).backend_state["hub_user"] == user
    model = await hub.user(user)
    assert model is not None and set(model["servers"]) == {f"s{one['id']}", f"s{two['id']}"}

    # The same hub user, but one's token opens only one's server.
    url_two, _ = await _hub_token(broker, two["id"])
    async with broker.http.get(f"{url_two}api/status",
                               headers=_auth(stored_one.upstream_token)) as resp:
        assert resp.status == 403
    kernel = await broker.start_kernel(one)
    async with broker.http.ws_connect(f"{one['ws_url']}api/kernels/{kernel}/channels",
                                      params={"session_id": "n", "token": one["token"]}) as ws:
        assert (await execute(ws, "print(6*7)")).stdout == "42\n"

    await _delete(broker, one)
    model = await hub.user(user)
    assert model is not None and set(model["servers"]) == {f"s{two['id']}"}  # two is untouched
    async with broker.http.get(f"{two['base_url']}api/status",
                               headers=_auth(two["token"])) as resp:
        assert resp.status == 200
    status, listing = await hub.api("GET", f"users/{user}/tokens")
    assert status == 200
    notes = [t.get("note") or "" for t in listing["api_tokens"]]
    assert not any(one["id"] in note for note in notes)  # one's token was revoked
    await _delete(broker, two)
    assert await hub.user(user) is None  # the last session took the owner's user along


async def _delete(broker: BrokerHarness, session: dict[str, Any]) -> None:
    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers=_auth(session["token"])) as resp:
        assert resp.status == 204
