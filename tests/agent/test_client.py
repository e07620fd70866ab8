"""broker.client end to end: the shipped Python client against a real broker and session."""

from __future__ import annotations

import pytest

from broker.client import (
    AgentSession,
    BrokerClientError,
    ExecutionResult,
    FileInfo,
    OutputEvent,
)
from tests.conftest import BrokerHarness


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
