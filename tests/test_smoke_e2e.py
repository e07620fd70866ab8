"""End to end on the local backend: a visitor runs code through the broker."""

from __future__ import annotations

import pytest

from tests.conftest import BrokerHarness
from tests.kernelproto import V1, execute


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
