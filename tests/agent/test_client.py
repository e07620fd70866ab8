"""broker.client end to end: the shipped Python client against a real broker and session."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from broker.client import (
    AgentSession,
    BrokerClientError,
    ExecutionResult,
    FileInfo,
    OutputEvent,
    SyncAgentSession,
)
from tests.conftest import BrokerHarness, MakeBroker, ManualClock


async def test_client_lifecycle(agent_broker: BrokerHarness) -> None:
    broker = agent_broker
    async with AgentSession(broker.url) as sandbox:
        assert sandbox.id and sandbox.token and not sandbox.reused
        first = await sandbox.execute("import math\nr = 2")
        assert isinstance(first, ExecutionResult) and first.ok
        area = await sandbox.execute("round(math.pi * r ** 2, 2)")
        assert area.text == "12.57"

        failed = await sandbox.execute("{}['missing']")
        assert failed.status == "error" and not failed.ok
        assert failed.error is not None and failed.error.ename == "KeyError"
        assert "missing" in str(failed.error)

        timed_out = await sandbox.execute("while True: pass", timeout=1)
        assert timed_out.status == "timeout"
        assert (await sandbox.execute("r")).text == "2"

        events = [e async for e in sandbox.stream(
            "from IPython.display import HTML, display\n"
            "print('a')\ndisplay(HTML('<p>x</p>'))\n'done'")]
        assert [e.type for e in events[:-1] if isinstance(e, OutputEvent)] == [
            "stream", "display", "result"]
        summary = events[-1]
        assert isinstance(summary, ExecutionResult)
        assert summary.stdout == "a\n" and summary.display[0]["text/html"] == "<p>x</p>"
        assert summary.text == "'done'"

        info = await sandbox.upload("in/data.bin", bytes(range(256)))
        assert info == FileInfo("data.bin", "in/data.bin", "file", 256, info.last_modified,
                                info.mimetype)
        echoed = await sandbox.execute("open('in/data.bin', 'rb').read() == bytes(range(256))")
        assert echoed.text == "True"
        await sandbox.execute("open('out name.bin', 'wb').write(bytes(range(255, -1, -1)))")
        assert await sandbox.download("out name.bin") == bytes(range(255, -1, -1))
        names = {f.name: f.type for f in await sandbox.list_files()}
        assert names == {"in": "directory", "out name.bin": "file"}
        assert [f.path for f in await sandbox.list_files("in")] == ["in/data.bin"]
        await sandbox.delete_file("in/data.bin")
        assert await sandbox.list_files("in") == []

        with pytest.raises(BrokerClientError) as refused:
            await sandbox.download("../etc/passwd")
        assert refused.value.status == 400 and refused.value.reason == "bad_path"
        session_id, token = sandbox.id, sandbox.token

    # Leaving the block deleted the session.
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session_id}",
                               headers={"Authorization": f"token {token}"}) as resp:
        assert (await resp.json())["status"] == "stopped"


async def test_client_reuses_a_kept_session(agent_broker: BrokerHarness) -> None:
    broker = agent_broker
    async with AgentSession(broker.url, keep=True) as first:
        await first.execute("remembered = 'yes'")
    assert first.token is not None
    async with AgentSession(broker.url, token=first.token) as again:
        assert again.reused and again.id == first.id
        assert (await again.execute("remembered")).text == "'yes'"
    # That block deleted the session: the same token now gets a new one.
    async with AgentSession(broker.url, token=first.token) as fresh:
        assert not fresh.reused and fresh.id != first.id
    dead = AgentSession(broker.url, token=first.token, http=broker.http)
    dead.id = first.id
    with pytest.raises(BrokerClientError) as gone:
        await dead.execute("1")
    assert gone.value.status == 404


async def test_client_with_an_api_key_owns_the_session_as_the_key(
        make_broker: MakeBroker) -> None:
    key = "k" * 24
    broker = await make_broker(api_keys=json.dumps({"platform": {"key": key}}))
    async with AgentSession(broker.url, api_key=key, keep=True) as first:
        owner = (await broker.store.get(first.id)).owner
        assert owner == "key:platform"
    # The key plus the saved token get the same session back (token as ?token=).
    async with AgentSession(broker.url, api_key=key, token=first.token) as again:
        assert again.reused and again.id == first.id
        assert (await again.execute("6 * 7")).text == "42"


async def test_client_waits_out_a_rate_limit_for_as_long_as_the_broker_says(
        make_broker: MakeBroker) -> None:
    clock = ManualClock(time.time())
    broker = await make_broker(clock=clock, max_creations_per_owner=1, creation_window=30)
    waited: list[float] = []

    async def sleep(seconds: float) -> None:  # the broker's clock, not the wall's
        waited.append(seconds)
        clock.advance(seconds)

    async with AgentSession(broker.url, keep=True):
        pass
    with pytest.raises(BrokerClientError) as impatient:  # no budget: the refusal itself
        async with AgentSession(broker.url, sleep=sleep, retry_budget=0):
            pass
    assert impatient.value.status == 429 and waited == []
    told: list[float] = []  # Retry-After of each refusal the client received

    async def on_end(_s: object, _c: object, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 429:
            told.append(float(params.response.headers["Retry-After"]))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http, \
            AgentSession(broker.url, sleep=sleep, retry_budget=60, keep=True,
                         http=http) as patient:
        assert patient.info["status"] == "ready"
    assert told and waited == told and sum(waited) <= 60


async def test_client_gives_up_when_the_wait_would_exceed_its_budget(
        make_broker: MakeBroker) -> None:
    broker = await make_broker(max_creations_per_owner=1, creation_window=600)
    async with AgentSession(broker.url, keep=True):
        pass
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    with pytest.raises(BrokerClientError) as refused:
        async with AgentSession(broker.url, sleep=sleep, retry_budget=30):
            pass
    assert refused.value.status == 429 and refused.value.retry_after is not None
    assert refused.value.retry_after > 30 and waited == []


async def test_client_restarts_the_default_kernel(agent_broker: BrokerHarness) -> None:
    async with AgentSession(agent_broker.url) as sandbox:
        assert not await sandbox.restart_kernel()  # nothing ran yet: no default kernel
        await sandbox.execute("kept = 1")
        await sandbox.upload("still-here.txt", "yes")
        assert await sandbox.restart_kernel()
        after = await sandbox.execute("kept")
        assert after.status == "error" and after.error is not None
        assert after.error.ename == "NameError"
        assert await sandbox.download("still-here.txt") == b"yes"


async def test_sync_client_runs_the_same_calls(agent_broker: BrokerHarness) -> None:
    def use_it() -> tuple[str, list[str], str, str | None]:
        with SyncAgentSession(agent_broker.url, keep=True) as sandbox:
            answer = sandbox.execute("6 * 7").text
            kinds = [e.type if isinstance(e, OutputEvent) else "done"
                     for e in sandbox.stream("print('a'); 'b'")]
            sandbox.upload("f.txt", "hello")
            content = sandbox.download("f.txt").decode()
            token = sandbox.token
        assert answer == "42"
        return content, kinds, str(sandbox.id), token

    # The broker runs on this test's loop: the blocking client must run elsewhere.
    content, kinds, session_id, token = await asyncio.to_thread(use_it)
    assert content == "hello" and kinds == ["stream", "result", "done"]
    async with agent_broker.http.get(f"{agent_broker.url}/api/v1/sessions/{session_id}",
                                     headers={"Authorization": f"token {token}"}) as resp:
        assert (await resp.json())["status"] == "ready"  # keep=True left it running
