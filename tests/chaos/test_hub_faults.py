"""The JupyterHub process frozen (SIGSTOP) during a spawn, then resumed.

A dedicated hub (started with :func:`tests.hubfixture.start_hub`, like the
shared one) rather than the session-wide ``hub`` fixture: that fixture lives in
``tests/hub/conftest.py``, and a hub frozen mid-spawn leaves half-done requests
and proxy routes that would disturb the tests sharing it.

The settings make the old failure mode visible: a hub request may take 10 s
(BROKER_UPSTREAM_TIMEOUT), longer than the 5 s ``wait=true`` allows past the
6 s spawn timeout. A failure that were recorded only after the cleanup (which
waits on the same frozen hub) would come too late, and the client would be
told ``pending``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeBroker, eventually, pid_alive
from tests.hubfixture import HubSetupError, RunningHub, start_hub

PREFIX = "broker-"
SPAWN_TIMEOUT = 6.0


async def test_a_frozen_hub_gets_a_bounded_answer_and_leaks_nothing(
    make_broker: MakeBroker, tmp_path: Path, fault_table: Any
) -> None:
    try:
        hub: RunningHub = await asyncio.to_thread(start_hub, tmp_path / "hub", "frozen-hub")
    except HubSetupError as exc:
        pytest.fail(str(exc), pytrace=False)
    frozen = False
    try:
        broker = await make_broker(**hub.broker_settings(
            spawn_timeout=SPAWN_TIMEOUT, upstream_timeout=10, cleanup_timeout=5,
            reap_interval=1))
        loop = asyncio.get_running_loop()
        request = asyncio.create_task(broker.create(wait=True))

        async def spawning() -> bool:  # the broker's hub user exists: the spawn is under way
            return bool(await hub.user_names(PREFIX)) or request.done()

        await eventually(spawning)
        assert not request.done(), request.result()
        os.kill(hub.proc.pid, signal.SIGSTOP)
        frozen = True
        stopped_at = loop.time()
        status, body = await asyncio.wait_for(request, SPAWN_TIMEOUT + 5 + 5)
        answered_in = loop.time() - stopped_at
        assert status == 504 and body["error"] == "spawn_timeout", body
        assert body.get("status") != "pending" and body["id"]
        assert answered_in < SPAWN_TIMEOUT + 5  # within the wait limit, hub still frozen
        session = await broker.store.get(body["id"], include_expired=True)
        assert session.status.value == "failed" and session.ended_reason == "spawn_timeout"

        os.kill(hub.proc.pid, signal.SIGCONT)
        frozen = False

        async def cleaned() -> bool:  # the reaper retries the cleanup the frozen hub refused
            users = await hub.user_names(PREFIX)
            running = [pid for pid in hub.spawned_pids() if pid_alive(pid)]
            return not users and not running

        await eventually(cleaned)
        fault_table.record(
            fault="JupyterHub frozen (SIGSTOP) during a spawn, then resumed",
            injected="SIGSTOP to the hub process while it was spawning a session's server "
            f"(spawn timeout {SPAWN_TIMEOUT:g} s, hub request timeout 10 s); SIGCONT after "
            "the answer",
            clients_saw="POST ?wait=true answered 504 spawn_timeout naming the session "
            "while the hub was still frozen (never 201 pending)",
            lost="the session that was spawning; nothing stayed on the hub (the cleanup was "
            "retried by the reaper once the hub answered)",
        )
    finally:
        if frozen:
            os.kill(hub.proc.pid, signal.SIGCONT)
        await hub.remove_users(PREFIX)
        await asyncio.to_thread(hub.stop)
