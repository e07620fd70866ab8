"""An upstream Jupyter server frozen (SIGSTOP) for about 20 s: its session must survive.

The reaper probes every second; each probe of the frozen server times out
and counts as a failure, but BROKER_REAP_PROBE_FAILURES=3 failures must span
BROKER_REAP_PROBE_WINDOW=60 s before the session is declared gone, so a pause
shorter than the window costs nothing: the kernel and its state are there
after SIGCONT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest

from broker.models import Status
from tests.conftest import MakeBroker, pid_alive
from tests.kernelproto import execute

FAILURES = 3
LIMIT = 40.0  # the three probes time out after 5 s each, a second apart


async def test_a_frozen_server_keeps_its_session_and_kernel(
    make_broker: MakeBroker, caplog: pytest.LogCaptureFixture, fault_table: Any
) -> None:
    broker = await make_broker(reap_interval=1, reap_probe_failures=FAILURES,
                               reap_probe_window=60)
    session = await broker.ready_session()
    kernel = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel}/channels"
    params = {"session_id": "chaos", "token": session["token"]}
    async with broker.http.ws_connect(url, params=params) as ws:
        await execute(ws, "x = 41")
    pid = int((await broker.store.get(session["id"])).backend_state["pid"])

    def failed_probes() -> int:
        return sum(f"session {session['id']}: upstream probe failed" in r.getMessage()
                   for r in caplog.records)

    caplog.set_level(logging.INFO, logger="broker.reaper")
    os.kill(pid, signal.SIGSTOP)
    try:
        # Frozen until the reaper counted as many failures as would be enough if the
        # window did not hold them back (about 20 s): polled, the reaper has no event.
        deadline = asyncio.get_running_loop().time() + LIMIT
        while failed_probes() < FAILURES and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        assert failed_probes() >= FAILURES
        frozen = await broker.store.get(session["id"])
        assert frozen is not None and frozen.status is Status.READY
    finally:
        os.kill(pid, signal.SIGCONT)
    assert pid_alive(pid)
    async with broker.http.ws_connect(url, params=params) as ws:
        result = await execute(ws, "print(x + 1)")
    assert result.stdout == "42\n"
    after = await broker.store.get(session["id"])
    assert after is not None and after.status is Status.READY
    fault_table.record(
        fault="Jupyter server frozen (SIGSTOP, about 20 s)",
        injected=f"SIGSTOP to a ready session's server until the reaper's probes failed "
        f"{FAILURES} times (BROKER_REAP_PROBE_FAILURES={FAILURES}, window 60 s), then SIGCONT",
        clients_saw="the session stayed ready; after SIGCONT the same kernel ran code with "
        "its state (x + 1 == 42)",
        lost="nothing",
    )
