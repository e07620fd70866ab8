"""End to end on the local backend: a visitor runs code through the broker."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import BrokerHarness
from tests.kernelproto import V1, execute, make_message


@pytest.mark.parametrize("subprotocol", [None, V1], ids=["json-frames", "v1-binary"])
async def test_print_42_over_kernel_websocket(broker: BrokerHarness, subprotocol: str | None):
    session = await broker.ready_session()
    kernel_id = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel_id}/channels"
    async with broker.http.ws_connect(
        url, params={"session_id": "s1", "token": session["token"]},
        protocols=[subprotocol] if subprotocol else [],
    ) as ws:
        assert ws.protocol == subprotocol
        result = await execute(ws, "print(6*7)")
    assert result.stdout == "42\n"
    assert result.reply["status"] == "ok"


async def test_reconnect_with_the_same_session_id_gets_buffered_output(
    broker: BrokerHarness,
) -> None:
    """Output produced while no socket was attached is replayed through the relay.

    jupyter_server sends the buffered messages right behind its 101 answer, so
    they reach the broker before the client's own handshake is done.
    """
    session = await broker.ready_session()
    kernel_id = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel_id}/channels"
    params = {"session_id": "replay-1", "token": session["token"]}
    async with broker.http.ws_connect(url, params=params) as ws:
        await execute(ws, "import time")  # the kernel is up and this session is known
        request = make_message("execute_request", {
            "code": "time.sleep(1); print('while you were away')", "silent": False},
            session="replay-1")
        await ws.send_str(json.dumps(request))
        while True:  # leave once the kernel started on it
            frame = json.loads((await ws.receive(timeout=20)).data)
            if frame["header"]["msg_type"] == "execute_input":
                break
    headers = {"Authorization": f"token {session['token']}"}
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # the kernel's state is only visible by asking (no event to await)
        async with broker.http.get(f"{session['base_url']}api/kernels/{kernel_id}",
                                   headers=headers) as resp:
            if (await resp.json())["execution_state"] == "idle":
                break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.1)
    async with broker.http.ws_connect(url, params=params) as ws:
        seen = []
        while True:
            frame = json.loads((await ws.receive(timeout=20)).data)
            if frame["parent_header"].get("msg_id") == request["header"]["msg_id"]:
                seen.append(frame)
                if frame["header"]["msg_type"] == "status" and \
                        frame["content"]["execution_state"] == "idle":
                    break
    texts = [f["content"].get("text", "") for f in seen if f["header"]["msg_type"] == "stream"]
    assert "while you were away\n" in texts


async def test_the_upgrade_handler_returns_once_the_relay_owns_the_socket(
    broker: BrokerHarness, caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing of aiohttp's request stays alive per open kernel WebSocket (memory per
    idle connection); the connection is still counted, closable and logged."""
    session = await broker.ready_session()
    kernel_id = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel_id}/channels"
    gauge = broker.manager.metrics.ws_open
    async with broker.http.ws_connect(url, params={"session_id": "h1",
                                                   "token": session["token"]}) as ws:
        assert (await execute(ws, "print('up')")).stdout == "up\n"
        handlers = [t for t in asyncio.all_tasks()
                    if getattr(t.get_coro(), "__qualname__", "").endswith("_handle_request")]
        assert handlers == []  # no request handler is suspended behind the relay
        assert gauge._value.get() == 1
        with caplog.at_level("INFO", logger="broker.proxy.wsbridge"):
            async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                          headers={"Authorization":
                                                   f"token {session['token']}"}) as resp:
                assert resp.status == 204
            message = await ws.receive(timeout=20)
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1000
    assert gauge._value.get() == 0
    assert any("closed: 1000 session ended" in r.getMessage() for r in caplog.records)
