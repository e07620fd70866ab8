"""The broker's binderhub backend against the BinderHub stand-in, end to end.

A session is launched through BinderHub's /build stream (keepalives between
events, phase-less and unknown-phase log lines, a stream held open after
ready), and then used for real: a kernel runs ``print(6*7)`` through the
broker's proxy. Refusals upstream become the broker's errors with
BinderHub's own message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from broker import appkeys
from broker.backends.binderhub import failure_error, public_message
from tests.binder.conftest import BOOK, BinderBroker
from tests.binder.eventsource import event_source
from tests.binderstandin import BinderStandin
from tests.conftest import BrokerHarness, pid_alive
from tests.kernelproto import V1, execute


async def _events(broker: BrokerHarness, session: dict[str, Any]) -> list[dict[str, Any]]:
    """The session's progress log from the native events endpoint (replayed, ends at ready)."""
    seen = []
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}/events",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:]))
    return seen


async def test_launch_through_binderhub_and_run_code(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    standin.chatty = True  # a keepalive comment after every event
    broker = await binder_broker()
    session = await broker.ready_session(spec="gh/org/repo/HEAD")
    assert session["backend"] == "binderhub"
    assert session["base_url"] == f"{broker.url}/s/{session['id']}/"

    (launch,) = standin.launches
    assert launch.spec == "gh/org/repo/HEAD"
    assert launch.headers["Accept"] == "text/event-stream"
    assert launch.headers["X-Forwarded-For"] == "127.0.0.1"
    # BinderHub holds the stream 60 s after a build; the broker hangs up on ready.
    await asyncio.wait_for(launch.client_left.wait(), 10)

    phases = [e["phase"] for e in await _events(broker, session)]
    assert phases[0] == "waiting" and phases[-1] == "ready"
    for phase in ("fetching", "building", "pushing", "built", "launching"):
        assert phase in phases
    assert "failed" not in phases and "Unknown" not in phases and "unknown" not in phases

    # The upstream is the stand-in's server; the client only ever sees the broker.
    stored = await broker.store.get(session["id"])
    (server,) = standin.servers.values()
    assert stored.upstream_url == server.url and stored.upstream_token == server.token
    assert stored.backend_state["hub_user"] == server.name
    assert stored.backend_state["public:image"].startswith("standin-registry/")
    assert server.token not in str(session)

    kernel_id = await broker.start_kernel(session)
    async with broker.http.ws_connect(
        f"{session['ws_url']}api/kernels/{kernel_id}/channels",
        params={"session_id": "e2e", "token": session["token"]}, protocols=[V1],
    ) as ws:
        result = await execute(ws, "print(6*7)")
    assert result.stdout == "42\n"
    assert result.reply["status"] == "ok"

    # Deleting the session stops the server through the hub API.
    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers={"Authorization": f"token {session['token']}"}) as r:
        assert r.status == 204
    assert standin.stopped == [server.name]
    assert not pid_alive(server.proc.pid)


async def test_native_reuse_checks_the_binderhub_server_is_alive(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    broker = await binder_broker()
    first = await broker.ready_session(spec="gh/org/repo/HEAD")
    status, again = await broker.create(token=first["token"], spec="gh/org/repo/HEAD")
    assert (status, again["id"]) == (200, first["id"])
    assert len(standin.launches) == 1
    # The hub culls the server behind the broker's back: reuse launches anew.
    (name,) = standin.servers
    async with broker.http.delete(f"{standin.url}/hub/api/users/{name}/server",
                                  headers={"Authorization": f"token {standin.hub_token}"}):
        pass
    status, fresh = await broker.create(token=first["token"], spec="gh/org/repo/HEAD")
    assert status == 201 and fresh["id"] != first["id"]
    assert fresh["status"] == "ready"
    assert len(standin.launches) == 2


@pytest.mark.parametrize(
    ("knob", "spec", "status", "reason", "message"),
    [
        ("rate_limit", "gh/org/repo/HEAD", 429, "rate_limited",
         "Rate limit exceeded. Try again in"),
        ("repo_quota", "gh/org/repo/HEAD", 503, "capacity",
         "Too many users running https://github.com/org/repo! Try again soon."),
        ("total_quota", "gh/org/other/HEAD", 503, "capacity",
         "Too many users on this BinderHub! Try again soon."),
        ("fail_builds", "gh/org/broken/HEAD", 502, "upstream_failed",
         "Error during build: repo2docker exited with code 1"),
        ("", "gh/org/repo/does-not-exist", 502, "upstream_failed",
         "Could not resolve ref for gh:org/repo/does-not-exist. Double check your URL."),
    ],
)
async def test_binderhub_refusals_become_broker_errors_with_its_message(
    standin: BinderStandin, binder_broker: BinderBroker, knob: str, spec: str, status: int,
    reason: str, message: str,
) -> None:
    broker = await binder_broker()
    if knob == "rate_limit":
        standin.rate_limit = 0
    elif knob in ("repo_quota", "total_quota"):
        # One server of gh/org/repo is running when the quota is 1.
        await broker.ready_session(spec="gh/org/repo/v1")
        setattr(standin, knob, 1)
    elif knob == "fail_builds":
        standin.fail_builds.add("broken")
    async with broker.http.post(f"{broker.url}/api/v1/sessions", params={"wait": "true"},
                                json={"spec": spec}) as resp:
        code, body = resp.status, await resp.json()
        retry_after = resp.headers.get("Retry-After")
    assert code == status, body
    if knob == "rate_limit":
        # "Try again in N seconds" becomes Retry-After: N.
        assert retry_after is not None
        assert body["message"].endswith(f"Try again in {retry_after} seconds.")
    assert body["reason"] == reason
    assert body["message"].startswith(message)
    assert not body["message"].endswith("\n")
    stored = await broker.store.get(body["id"])
    assert stored.status.value == "failed"


async def test_a_stream_that_goes_silent_fails_the_launch(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    standin.gate = asyncio.Event()  # the launch waits here, and sends nothing
    broker = await binder_broker(binder_read_timeout=0.5)
    code, body = await broker.create(spec="gh/org/repo/HEAD")
    assert code == 502
    assert body["message"] == "BinderHub's build stream went silent"
    await asyncio.wait_for(standin.launches[0].client_left.wait(), 10)
    standin.gate.set()


async def test_a_malformed_spec_never_reaches_binderhub(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    broker = await binder_broker()
    code, body = await broker.create(spec="gh/org/repo")
    assert code == 400, body
    assert "gh/{user}/{repo}/{ref}" in body["message"]
    assert standin.launches == []


async def test_health_follows_binderhub(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    broker = await binder_broker()
    backend = broker.app[appkeys.BACKEND]
    await backend.health()  # the stand-in answers ok
    await standin.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await backend.health()


async def test_binderhub_progress_never_names_the_upstream_server(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    """BinderHub relays the hub's "Server ready at /user/{name}/"; clients see no path."""
    broker = await binder_broker()
    result = await event_source(broker.http, f"{broker.url}/build/gh/org/repo/HEAD",
                                origin=BOOK)
    ready = result.ready
    (server,) = standin.servers.values()
    sent_upstream = [e.get("message", "") for e in standin.launches[0].events]
    assert f"Server ready at /user/{server.name}/\n" in sent_upstream
    messages = [e["message"] for e in result.events]
    assert "Server ready at [server]\n" in messages
    raw = result.raw.decode()
    for secret in ("/user/", server.name, server.url, server.token, standin.url + "/"):
        assert secret not in raw
    # The session's own event log (native API) says the same.
    session_id = ready["url"].rstrip("/").rsplit("/", 1)[-1]
    logged = await _events(broker, {"id": session_id, "token": ready["token"]})
    assert "Server ready at [server]" in [e["message"] for e in logged]
    assert not any("/user/" in e["message"] for e in logged)


@pytest.mark.parametrize(
    ("upstream", "client_sees"),
    [
        ("Server ready at /user/owner-repo-x1y2/", "Server ready at [server]"),
        ("Server ready at https://hub.example.org/user/o-r-x/lab?token=abc",
         "Server ready at [server]"),
        ("Spawn failed: http://binder.internal:8585/hub/api/users/o-r-x/server?token=abc",
         "Spawn failed: [server]"),
        ("see http://binder.internal:85851/x", "see http://binder.internal:85851/x"),
        ("Fetching https://github.com/org/repo", "Fetching https://github.com/org/repo"),
        ("pip: Authorization: token 0123456789abcdef0123", "pip: Authorization: token [secret]"),
    ],
)
def test_upstream_messages_are_rewritten_for_clients(upstream: str, client_sees: str) -> None:
    assert public_message(upstream, ("binder.internal:8585",)) == client_sees
    error = failure_error({"phase": "failed", "message": upstream},
                          ("binder.internal:8585",))
    assert error.message == client_sees
