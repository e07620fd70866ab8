"""``session-broker mcp``: the MCP SDK's own client against the real server, broker and kernel.

The MCP server runs as the command a user runs (a subprocess speaking stdio,
or streamable HTTP on a loopback port); the broker runs in this test's loop
with the local backend, so every call crosses real HTTP to a real kernel.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from broker.models import Status
from tests.conftest import BrokerHarness, MakeBroker, free_port


def _text(result: Any) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


def _stdio(broker: BrokerHarness, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "broker.cli", "mcp", "--broker-url", broker.url, *extra])


async def _live(broker: BrokerHarness) -> list[Any]:
    return [s for s in await broker.store.list_live() if s.status is not Status.STOPPED]


async def test_stdio_tools_run_code_move_files_and_restart(agent_broker: BrokerHarness) -> None:
    async with Client(_stdio(agent_broker)) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert names == {"execute_code", "upload_file", "download_file", "list_files",
                         "restart_kernel"}
        assert await _live(agent_broker) == []  # listing tools opened no session

        ran = await client.call_tool("execute_code", {"code": "x = 6\nprint('hi')\nx * 7"})
        assert not ran.is_error and _text(ran) == "hi\n[result] 42"
        failed = await client.call_tool("execute_code", {"code": "1/0"})
        assert "[error] ZeroDivisionError" in _text(failed)
        slow = await client.call_tool("execute_code", {"code": "while True: pass", "timeout": 1})
        assert "[timed out" in _text(slow)
        assert _text(await client.call_tool("execute_code", {"code": "x"})) == "[result] 6"

        wrote = await client.call_tool("upload_file", {"path": "d/a.txt", "content": "hello"})
        assert _text(wrote) == "wrote d/a.txt (5 bytes)"
        raw = base64.b64encode(bytes([0, 255, 1])).decode()
        await client.call_tool("upload_file", {"path": "b.bin", "content": raw,
                                               "encoding": "base64"})
        assert _text(await client.call_tool("download_file", {"path": "d/a.txt"})) == "hello"
        assert _text(await client.call_tool("download_file", {"path": "b.bin"})) == \
            "base64:" + raw
        listing = _text(await client.call_tool("list_files", {}))
        assert listing.splitlines() == ["b.bin (3 bytes)", "d/"]
        refused = await client.call_tool("download_file", {"path": "../etc/passwd"})
        assert refused.is_error and "bad_path" in _text(refused)

        assert _text(await client.call_tool("restart_kernel", {})) == "kernel restarted"
        gone = _text(await client.call_tool("execute_code", {"code": "x"}))
        assert "[error] NameError" in gone
        live = await _live(agent_broker)
        assert len(live) == 1 and live[0].status is Status.READY
    # The MCP session ended with the process: its broker session was deleted.
    assert await _live(agent_broker) == []


async def test_stdio_with_an_api_key_owns_sessions_as_the_key(make_broker: MakeBroker) -> None:
    key = "m" * 24
    broker = await make_broker(api_keys=f'{{"agents": {{"key": "{key}"}}}}')
    async with Client(_stdio(broker, "--api-key", key)) as client:
        await client.call_tool("execute_code", {"code": "1"})
        (session,) = await _live(broker)
        assert session.owner == "key:agents"


async def test_a_broker_refusal_is_a_tool_error_with_its_message(
        make_broker: MakeBroker) -> None:
    broker = await make_broker(max_sessions=1)
    async with broker.http.post(f"{broker.url}/api/v1/sessions?wait=true") as resp:
        assert resp.status == 201  # the only slot is taken
    async with Client(_stdio(broker)) as client:
        refused = await client.call_tool("execute_code", {"code": "1"})
        assert refused.is_error and "The broker refused a sandbox" in _text(refused)


@pytest.fixture
async def mcp_http(agent_broker: BrokerHarness) -> AsyncIterator[str]:
    """``session-broker mcp --http PORT`` against the broker, as a subprocess.

    Async, because stopping it makes it delete its sandboxes through the broker,
    which runs on this loop.
    """
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "mcp", "--broker-url", agent_broker.url,
        "--http", str(port), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        while b"Application startup complete" not in (line := await proc.stderr.readline()):
            if not line:
                pytest.fail(f"the MCP server exited with {await proc.wait()}")
    drain = asyncio.create_task(proc.stderr.read())  # never let its log fill the pipe
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        async with asyncio.timeout(30):
            await proc.wait()
        await drain


async def test_http_sessions_each_get_their_own_sandbox_freed_when_they_end(
        agent_broker: BrokerHarness, mcp_http: str) -> None:
    # Handshake-era clients have an MCP session (mcp-session-id): one sandbox each.
    async with Client(mcp_http, mode="legacy") as one, Client(mcp_http, mode="legacy") as two:
        await one.call_tool("execute_code", {"code": "mine = 'one'"})
        await two.call_tool("execute_code", {"code": "mine = 'two'"})
        assert _text(await one.call_tool("execute_code", {"code": "mine"})) == "[result] 'one'"
        assert _text(await two.call_tool("execute_code", {"code": "mine"})) == "[result] 'two'"
        assert len(await _live(agent_broker)) == 2
    # Both clients ended their MCP sessions (DELETE): both broker sessions go.
    async with asyncio.timeout(30):
        while await _live(agent_broker):
            await asyncio.sleep(0.1)  # the server deletes them after answering the DELETE


async def test_stateless_http_clients_never_share_a_sandbox(
        agent_broker: BrokerHarness, mcp_http: str) -> None:
    # 2026-07-28 clients have no MCP session: a handle, returned once, keeps the state.
    async with Client(mcp_http) as one, Client(mcp_http) as two:
        first = _text(await one.call_tool("execute_code", {"code": "mine = 'one'"}))
        assert first.startswith("[sandbox: ")
        handle = first.split()[1]
        other = _text(await two.call_tool("execute_code", {"code": "mine"}))
        assert "[error] NameError" in other  # no handle: a sandbox of its own, not one's
        again = await one.call_tool("execute_code", {"code": "mine", "sandbox": handle})
        assert _text(again) == "[result] 'one'"
        stale = await one.call_tool("execute_code", {"code": "1", "sandbox": "not-a-handle"})
        assert stale.is_error and "Unknown or expired sandbox" in _text(stale)
        assert len(await _live(agent_broker)) == 2
