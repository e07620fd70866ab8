"""Session lifecycle on the real local backend: reuse, expiry, death, deletion."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from aiohttp import WSMsgType

from broker import appkeys
from broker.models import Status
from tests.conftest import BrokerHarness, MakeBroker, ManualClock, pid_alive, wait_for_exit
from tests.kernelproto import execute, make_message


async def _server_pid(broker: BrokerHarness, session_id: str) -> int:
    stored = await broker.store.get(session_id, include_expired=True)
    return int(stored.backend_state["pid"])


async def test_reload_reuses_the_live_session(broker: BrokerHarness) -> None:
    first = await broker.ready_session(spec="gh/org/repo/HEAD")
    # A "reload": the page presents the token it saved, for the same spec.
    status, again = await broker.create(spec="gh/org/repo/HEAD", token=first["token"])
    assert status == 200
    assert again["id"] == first["id"]
    assert again["token"] == first["token"]
    assert again["base_url"] == first["base_url"]
    # Without the token, or for another spec, it is a different session.
    status, fresh = await broker.create(spec="gh/org/repo/HEAD")
    assert status == 201 and fresh["id"] != first["id"]
    status, other = await broker.create(spec="gh/org/other/HEAD", token=first["token"])
    assert status == 201 and other["id"] not in (first["id"], fresh["id"])


async def test_kernel_state_survives_reuse(broker: BrokerHarness) -> None:
    session = await broker.ready_session()
    kernel = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel}/channels"
    params = {"session_id": "a", "token": session["token"]}
    async with broker.http.ws_connect(url, params=params) as ws:
        await execute(ws, "x = 41")
    status, _ = await broker.create(token=session["token"])
    assert status == 200
    async with broker.http.ws_connect(url, params=params) as ws:
        result = await execute(ws, "print(x + 1)")
    assert result.stdout == "42\n"


async def test_session_expires_at_max_age(make_broker: MakeBroker, clock: ManualClock) -> None:
    broker = await make_broker(clock=clock, session_max_age=600)
    session = await broker.ready_session()
    pid = await _server_pid(broker, session["id"])
    headers = {"Authorization": f"token {session['token']}"}
    clock.advance(599)
    async with broker.http.get(f"{session['base_url']}api/status", headers=headers) as resp:
        assert resp.status == 200
    clock.advance(1)
    async with broker.http.get(f"{session['base_url']}api/status", headers=headers) as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "unknown_session"
    # Reuse of an expired session yields a new one.
    status, fresh = await broker.create(token=session["token"])
    assert status == 201 and fresh["id"] != session["id"]
    # The reaper stops the expired server for good.
    assert await broker.manager.reap_once() >= 1
    assert not pid_alive(pid)
    ended = await broker.store.get(session["id"], include_expired=True)
    assert ended.status is Status.STOPPED and ended.ended_reason == "max_age"


async def test_dead_upstream_is_replaced_on_reuse(broker: BrokerHarness) -> None:
    session = await broker.ready_session()
    pid = await _server_pid(broker, session["id"])
    backend = broker.app[appkeys.BACKEND]
    reported = asyncio.Event()
    original = backend.on_lost

    async def observed(session_id: str, message: str) -> None:
        await original(session_id, message)
        reported.set()

    backend.on_lost = observed
    os.killpg(pid, signal.SIGKILL)
    # The backend notices the exit by itself and fails the session.
    await asyncio.wait_for(reported.wait(), 15)
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        body = await resp.json()
    assert body["status"] == "failed" and body["ended_reason"] == "upstream_exited"
    status, fresh = await broker.create(token=session["token"])
    assert status == 201 and fresh["id"] != session["id"] and fresh["status"] == "ready"


async def test_reuse_checks_the_upstream_not_the_cache(broker: BrokerHarness) -> None:
    """A server that stops answering (but whose record says ready) is not handed back."""
    session = await broker.ready_session()
    pid = await _server_pid(broker, session["id"])
    os.kill(pid, signal.SIGSTOP)  # alive as a process, deaf as a server
    try:
        stored = await broker.store.get(session["id"])
        assert stored.status is Status.READY
        status, fresh = await broker.create(token=session["token"])
        assert status == 201 and fresh["id"] != session["id"]
        ended = await broker.store.get(session["id"], include_expired=True)
        assert ended.status is Status.STOPPED and ended.ended_reason == "upstream_gone"
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)


async def test_delete_stops_the_server_and_closes_sockets(broker: BrokerHarness) -> None:
    session = await broker.ready_session()
    pid = await _server_pid(broker, session["id"])
    kernel = await broker.start_kernel(session)
    headers = {"Authorization": f"token {session['token']}"}
    async with broker.http.ws_connect(
        f"{session['ws_url']}api/kernels/{kernel}/channels", params={"token": session["token"]}
    ) as ws:
        async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                      headers=headers) as resp:
            assert resp.status == 204
        closing = await ws.receive(timeout=10)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 1000 and "deleted" in closing.extra
    assert not pid_alive(pid)
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}",
                               headers=headers) as resp:
        body = await resp.json()
        assert body["status"] == "stopped" and body["ended_reason"] == "deleted"
    async with broker.http.get(f"{session['base_url']}api/kernels", headers=headers) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "session_ended"


async def test_events_stream_progress_until_ready(broker: BrokerHarness) -> None:
    status, session = await broker.create(wait=False)
    assert status == 201 and session["status"] == "pending"
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}/events",
                               params={"token": session["token"]}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    phases = [e["phase"] for e in events]
    assert phases[0] == "waiting" and "launching" in phases and phases[-1] == "ready"
    assert all("upstream" not in json.dumps(e) for e in events)


async def test_failed_spawn_reports_an_error(make_broker: MakeBroker) -> None:
    broker = await make_broker(local_server_args=["--ServerApp.port=not-a-port"])
    status, body = await broker.create()
    assert status == 502
    assert body["error"] == "upstream_failed" and "exited" in body["message"]
    assert broker.app[appkeys.BACKEND].pids() == {}
    stored = await broker.store.get(body["id"], include_expired=True)
    assert stored.status is Status.FAILED


async def test_idle_sessions_are_culled_but_busy_ones_are_not(
    make_broker: MakeBroker, clock: ManualClock
) -> None:
    broker = await make_broker(clock=clock, session_idle_timeout=60)
    idle, busy = await asyncio.gather(broker.ready_session(), broker.ready_session())
    idle_pid = await _server_pid(broker, idle["id"])
    kernel = await broker.start_kernel(busy)
    url = f"{busy['ws_url']}api/kernels/{kernel}/channels"
    async with broker.http.ws_connect(url, params={"token": busy["token"]}) as ws:
        # Start a long, silent computation, wait until the kernel says busy, leave.
        request = make_message("execute_request", {"code": "import time; time.sleep(30)"})
        await ws.send_str(json.dumps(request))
        while True:  # until the kernel is busy with *this* request
            frame = json.loads((await ws.receive(timeout=20)).data)
            if frame["header"]["msg_type"] == "status" and \
                    frame["content"]["execution_state"] == "busy" and \
                    frame["parent_header"].get("msg_id") == request["header"]["msg_id"]:
                break
    clock.advance(61)
    stopped = await broker.manager.reap_once()
    busy_now = await broker.store.get(busy["id"], include_expired=True)
    assert stopped == 1, (busy_now.status, busy_now.ended_reason, busy_now.message)
    assert not pid_alive(idle_pid)
    ended = await broker.store.get(idle["id"], include_expired=True)
    assert ended.status is Status.STOPPED and ended.ended_reason == "idle"
    still = await broker.store.get(busy["id"])
    assert still.status is Status.READY and still.last_activity == clock.now


async def test_reaper_reconciles_sessions_whose_upstream_is_gone(
    make_broker: MakeBroker, clock: ManualClock
) -> None:
    """A server that stopped answering is found by the sweep, not only on reuse,
    but only after BROKER_REAP_PROBE_FAILURES failed probes spanning
    BROKER_REAP_PROBE_WINDOW seconds: one failed probe is not death."""
    broker = await make_broker(clock=clock, reap_probe_failures=3, reap_probe_window=60)
    healthy, deaf = await asyncio.gather(broker.ready_session(), broker.ready_session())
    pid = await _server_pid(broker, deaf["id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        assert await broker.manager.reap_once() == 0  # 1 failure
        clock.advance(59)
        assert await broker.manager.reap_once() == 0  # 3 failures would be enough...
        assert await broker.manager.reap_once() == 0  # ...but they span only 59 s
        still = await broker.store.get(deaf["id"])
        assert still.status is Status.READY
        clock.advance(1)
        assert await broker.manager.reap_once() == 1
        ended = await broker.store.get(deaf["id"], include_expired=True)
        assert ended.status is Status.STOPPED and ended.ended_reason == "upstream_gone"
        assert not pid_alive(pid)
        kept = await broker.store.get(healthy["id"])
        assert kept.status is Status.READY
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)


async def test_a_crashed_server_takes_its_kernels_and_directory_with_it(
    broker: BrokerHarness,
) -> None:
    session = await broker.ready_session()
    stored = await broker.store.get(session["id"])
    pid, workdir = int(stored.backend_state["pid"]), stored.backend_state["workdir"]
    kernel = await broker.start_kernel(session)
    async with broker.http.ws_connect(f"{session['ws_url']}api/kernels/{kernel}/channels",
                                      params={"token": session["token"]}) as ws:
        result = await execute(ws, "import subprocess; p = subprocess.Popen(['sleep', '600']);"
                                   " print(p.pid)")
    orphan = int(result.stdout)
    backend = broker.app[appkeys.BACKEND]
    reported = asyncio.Event()
    original = backend.on_lost

    async def observed(session_id: str, message: str) -> None:
        await original(session_id, message)
        reported.set()

    backend.on_lost = observed
    os.kill(pid, signal.SIGKILL)  # the server alone, not its process group
    await asyncio.wait_for(reported.wait(), 15)
    assert await wait_for_exit(orphan)
    assert not os.path.exists(workdir)


async def test_sessions_keep_their_code_history_to_themselves(broker: BrokerHarness) -> None:
    """Each session's kernels have an IPython directory of their own, with no stored
    input history: a visitor's code is not written where another session's kernel
    can search it (``%history -g``), and the kernel's own history still works."""
    first, second = await broker.ready_session(), await broker.ready_session()
    sockets = []
    for session in (first, second):
        kernel = await broker.start_kernel(session)
        sockets.append(await broker.http.ws_connect(
            f"{session['ws_url']}api/kernels/{kernel}/channels",
            params={"token": session["token"]}))
    try:
        await execute(sockets[0], "visitor_secret = 4711")
        # What a stored history would have written by now (a no-op without one).
        await execute(sockets[0], "get_ipython().history_manager.writeout_cache()")
        own = await execute(sockets[0], "%history")
        assert "visitor_secret = 4711" in own.stdout
        found = await execute(sockets[1], "%history -g visitor_secret")
        assert "4711" not in found.stdout
        where = await execute(sockets[1], "import os; print(os.environ['IPYTHONDIR'])")
        stored = await broker.store.get(second["id"])
        assert where.stdout.strip().startswith(stored.backend_state["workdir"])
    finally:
        for ws in sockets:
            await ws.close()


async def test_servers_without_the_ui_proxied_load_no_ui_extension(broker: BrokerHarness) -> None:
    """With BROKER_JUPYTER_UI off nothing can reach JupyterLab, its language servers or
    terminals, so the session's server does not load them (memory and start-up CPU);
    the Jupyter API the broker proxies is all there. (The UI tests cover it on.)"""
    session = await broker.ready_session()
    stored = await broker.store.get(session["id"])
    headers = {"Authorization": f"token {stored.upstream_token}"}
    for path, status in (("api/status", 200), ("api/kernelspecs", 200), ("lab", 404),
                         ("lsp/status", 404), ("api/terminals", 404)):
        async with broker.http.get(f"{stored.upstream_url}{path}", headers=headers,
                                   allow_redirects=False) as resp:
            assert resp.status == status, (path, resp.status)
