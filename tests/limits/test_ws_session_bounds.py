"""Per-session bounds on kernel WebSockets (per replica): how many at once, and one
message/byte budget that all of a session's connections share.

The shared budget is the same token bucket class as the per-connection one,
checked here exactly with a manual clock; the cap is checked end to end
through a broker and an echoing upstream.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import WSServerHandshakeError

from broker import appkeys
from broker.policy.wsrate import CLOSE, SessionWsBudgets, WsLimits
from broker.settings import Settings
from tests.conftest import ManualClock
from tests.limits.conftest import MakeLimited, post_session
from tests.limits.test_wsrate import kernel_ws


def test_connections_of_a_session_share_one_budget(clock: ManualClock) -> None:
    shared = WsLimits(messages_per_second=10, message_burst=4, throttle_limit=5).new(clock=clock)
    per_connection = WsLimits(messages_per_second=100, message_burst=100)
    first = per_connection.new(clock=clock, parent=shared)
    second = per_connection.new(clock=clock, parent=shared)
    assert [first.take(10) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert second.take(10) == 0.0  # the fourth message of the session: the last token
    # Each connection is far inside its own bucket; the session's is empty.
    assert second.take(10) == pytest.approx(0.1, abs=1e-6)
    assert first.take(10) == pytest.approx(0.2, abs=1e-6)
    clock.advance(10)
    assert first.take(10) == 0.0 and second.take(10) == 0.0


def test_sustained_abuse_of_the_session_budget_closes(clock: ManualClock) -> None:
    shared = WsLimits(bytes_per_second=100, byte_burst=100, throttle_limit=2).new(clock=clock)
    connection = WsLimits(bytes_per_second=1e9, byte_burst=10**9).new(clock=clock,
                                                                      parent=shared)
    answers = [connection.take(100) for _ in range(5)]
    assert answers[0] == 0.0 and answers[-1] == CLOSE


def test_the_cap_counts_per_session_and_frees_on_close() -> None:
    budgets = SessionWsBudgets(2)
    assert budgets.open("a") == (True, None)
    assert budgets.open("a") == (True, None)
    assert budgets.open("a") == (False, None)
    assert budgets.open("b") == (True, None)  # another session has its own count
    budgets.close("a")
    assert budgets.open("a") == (True, None)
    assert budgets.connections("a") == 2


def test_a_session_budget_is_made_only_when_configured() -> None:
    assert WsLimits.for_sessions(Settings()) is None
    limits = WsLimits.for_sessions(Settings(ws_session_messages_per_second=50,
                                            ws_client_max_message_size=1000))
    assert limits is not None and limits.message_burst == 50 and limits.byte_burst >= 1000
    budgets = SessionWsBudgets(0, limits)
    _, first = budgets.open("s")
    _, second = budgets.open("s")
    assert first is not None and first is second  # one bucket for the session's connections
    budgets.close("s")
    budgets.close("s")
    _, fresh = budgets.open("s")
    assert fresh is not first  # gone with the session's last connection


async def test_one_kernel_websocket_too_many_is_refused_with_429(
        make_limited: MakeLimited) -> None:
    broker = await make_limited(ws_session_max_connections=2)
    session = (await post_session(broker))[2]
    open_ones: list[Any] = [await kernel_ws(broker, session) for _ in range(2)]
    with pytest.raises(WSServerHandshakeError) as refused:
        await kernel_ws(broker, session)
    assert refused.value.status == 429
    assert refused.value.headers is not None
    assert int(refused.value.headers["Retry-After"]) >= 1
    url = f"{session['base_url']}api/kernels/x/channels"
    async with broker.http.get(url, params={"token": session["token"]},
                               headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                        "Sec-WebSocket-Version": "13",
                                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
                               ) as resp:
        assert resp.status == 429
        body = await resp.json()
    assert body["error"] == body["reason"] == "too_many_websockets"
    # Another session is not affected; a closed connection frees its place.
    other = (await post_session(broker))[2]
    extra = await kernel_ws(broker, other)
    await open_ones.pop().close()
    deadline = asyncio.get_running_loop().time() + 10
    while broker.app[appkeys.WS_BUDGETS].connections(session["id"]) > 1:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)  # the relay's end reaches the count on the loop's next turns
    again = await kernel_ws(broker, session)
    message = json.dumps({"x": 1})
    await again.send_str(message)
    assert (await again.receive()).data == message
    for ws in (*open_ones, extra, again):
        await ws.close()

