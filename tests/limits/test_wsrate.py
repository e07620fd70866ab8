"""Per-connection WebSocket limits: exact buckets, then the real relay under a flood.

The buckets are checked with a manual clock (no sleeping). The end-to-end
tests push real frames through a broker to an echoing upstream; their timing
assertions are lower bounds only, which a token bucket guarantees however
slow the machine: the relay reads at most one socket read (asyncio reads up
to 256 KiB) ahead of the bucket, so N messages cannot all come back sooner
than ``(N - burst - one read's frames) / rate`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiohttp import WSMsgType

from broker.errors import Forbidden
from broker.policy.wsrate import CLOSE, WsLimits
from broker.settings import Settings
from tests.conftest import BrokerHarness, ManualClock
from tests.kernelproto import make_message
from tests.limits.conftest import MakeLimited, post_session

#: Frames of MESSAGE bytes that one 256 KiB socket read can hold.
MESSAGE = 1000
READ_AHEAD = 256 * 1024 // MESSAGE + 1


def limiter(clock: ManualClock, calls: dict[str, int] | None = None, **limits: Any) -> Any:
    counts = calls if calls is not None else {}
    return WsLimits(**limits).new(
        clock=clock,
        on_throttle=lambda: counts.__setitem__("throttle", counts.get("throttle", 0) + 1),
        on_close=lambda: counts.__setitem__("close", counts.get("close", 0) + 1))


def test_no_limiter_without_limits() -> None:
    assert WsLimits.from_settings(Settings()) is None
    assert WsLimits.from_settings(Settings(ws_client_bytes_per_second=10)) is not None


def test_message_bucket_is_exact(clock: ManualClock) -> None:
    calls: dict[str, int] = {}
    lim = limiter(clock, calls, messages_per_second=10, message_burst=3)
    assert [lim.take(100) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert lim.take(100) == pytest.approx(0.1, abs=1e-6)
    assert lim.take(100) == pytest.approx(0.2, abs=1e-6)  # in debt: waits behind the one before
    clock.advance(0.2)
    assert lim.take(100) == pytest.approx(0.1, abs=1e-6)
    assert calls == {"throttle": 3}
    clock.advance(10)  # a pause refills the burst and ends the throttled stretch
    assert [lim.take(100) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert not lim.throttled


def test_byte_bucket_is_exact(clock: ManualClock) -> None:
    lim = limiter(clock, bytes_per_second=1000, byte_burst=1000)
    assert lim.take(600) == 0.0
    assert lim.take(600) == pytest.approx(0.2, abs=1e-6)
    clock.advance(0.2)
    assert lim.take(0) == 0.0 and not lim.throttled
    # One message far bigger than the (now empty) bucket: its wait is the whole debt.
    assert lim.take(3000) == pytest.approx(3.0, abs=1e-6)


def test_sustained_abuse_closes_and_bursts_do_not(clock: ManualClock) -> None:
    calls: dict[str, int] = {}
    lim = limiter(clock, calls, messages_per_second=100, message_burst=10, throttle_limit=1.0)
    # A flood that sends the moment it is allowed: throttled without a break.
    started, answer = clock.now, 0.0
    while answer >= 0:
        answer = lim.take(10)
        if answer > 0:
            clock.advance(answer)
    assert answer == CLOSE and calls["close"] == 1
    assert 0.9 <= clock.now - started <= 1.0
    # A client that bursts twice its allowance, then pauses, for a long time: never closed.
    calm = limiter(clock, messages_per_second=100, message_burst=10, throttle_limit=1.0)
    for _ in range(100):
        for _ in range(20):
            answer = calm.take(10)
            assert answer != CLOSE
            if answer > 0:
                clock.advance(answer)
        clock.advance(0.5)


# -- through the broker --------------------------------------------------------------------
async def kernel_ws(broker: BrokerHarness, session: dict[str, Any]) -> Any:
    url = f"{session['ws_url']}api/kernels/{uuid.uuid4().hex}/channels"
    return await broker.http.ws_connect(url, params={"token": session["token"]},
                                        max_msg_size=0, autoping=True)


async def flood(ws: Any, count: int, got: list[int], first: asyncio.Event) -> int | None:
    """Send ``count`` messages while counting echoes; the close code if the broker closed."""
    payload = "x" * MESSAGE

    async def send() -> None:
        for _ in range(count):
            await ws.send_str(payload)

    sender = asyncio.create_task(send())
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            got[0] += 1
            first.set()
            if got[0] == count:
                return None
        return int(ws.close_code) if ws.close_code is not None else None
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_a_flooding_client_is_slowed_not_closed(make_limited: MakeLimited) -> None:
    count, rate, burst = 1500, 1000, 50
    broker = await make_limited(ws_client_messages_per_second=rate,
                                ws_client_message_burst=burst, ws_client_throttle_limit=30)
    session = (await post_session(broker))[2]
    ws = await kernel_ws(broker, session)
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = [0]
    assert await flood(ws, count, got, asyncio.Event()) is None
    elapsed = loop.time() - started
    assert got[0] == count  # nothing dropped
    assert elapsed >= (count - burst - READ_AHEAD) / rate, elapsed
    registry = broker.manager.metrics.registry
    assert registry.get_sample_value("broker_websocket_throttled_total") >= 1
    assert registry.get_sample_value("broker_limit_refusals_total", {"reason": "ws_rate"}) == 0
    await ws.close()


async def test_sustained_abuse_is_closed_with_1008(make_limited: MakeLimited) -> None:
    broker = await make_limited(ws_client_messages_per_second=100, ws_client_message_burst=10,
                                ws_client_throttle_limit=0.5)
    session = (await post_session(broker))[2]
    ws = await kernel_ws(broker, session)
    got = [0]
    assert await flood(ws, 5000, got, asyncio.Event()) == 1008
    assert got[0] < 5000
    registry = broker.manager.metrics.registry
    assert registry.get_sample_value("broker_limit_refusals_total", {"reason": "ws_rate"}) == 1


async def test_a_normal_client_on_the_same_broker_is_unaffected(
    make_limited: MakeLimited,
) -> None:
    count, rate, burst = 2000, 100, 20
    broker = await make_limited(ws_client_messages_per_second=rate,
                                ws_client_message_burst=burst, ws_client_throttle_limit=120)
    session = (await post_session(broker))[2]
    flooder = await kernel_ws(broker, session)
    got, first = [0], asyncio.Event()
    flooding = asyncio.create_task(flood(flooder, count, got, first))
    await first.wait()  # the flood is going through the relay
    normal = await kernel_ws(broker, session)
    for n in range(burst // 2):
        await normal.send_str(f"hello {n}")
        reply = await normal.receive()
        assert reply.type is WSMsgType.TEXT and reply.data == f"hello {n}"
    # The flood cannot be through before (count - burst - READ_AHEAD) / rate ~ 17 s.
    assert not flooding.done() and got[0] < count
    assert normal.close_code is None
    flooding.cancel()
    await asyncio.gather(flooding, return_exceptions=True)
    await normal.close()
    await flooder.close()


async def test_client_messages_above_their_cap_close_with_1009(make_limited: MakeLimited) -> None:
    broker = await make_limited(ws_client_max_message_size=4096)
    session = (await post_session(broker))[2]
    ws = await kernel_ws(broker, session)
    await ws.send_str("y" * 4000)
    assert (await ws.receive()).data == "y" * 4000
    await ws.send_str("z" * 5000)
    closing = await ws.receive()
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert ws.close_code == 1009
    await ws.close()


async def test_limits_off_means_no_limiter_on_the_hot_path(make_limited: MakeLimited) -> None:
    from broker.proxy.wsbridge import _limiter_for

    broker = await make_limited()
    request: Any = type("R", (), {"app": broker.app})()
    assert _limiter_for(request) is None
    limited = await make_limited(ws_client_bytes_per_second=1e6)
    request = type("R", (), {"app": limited.app})()
    from broker.policy.wsrate import WsLimiter

    assert isinstance(_limiter_for(request), WsLimiter)


def test_a_close_is_final_and_counted_once(clock: ManualClock) -> None:
    calls: dict[str, int] = {}
    lim = limiter(clock, calls, messages_per_second=10, message_burst=1, throttle_limit=0.5)
    assert lim.take(1) == 0.0
    assert [lim.take(1) for _ in range(10)][-1] == CLOSE
    clock.advance(3600)  # however long after
    assert lim.take(1) == CLOSE
    assert calls["close"] == 1


async def test_relayed_messages_record_activity_and_metrics(make_limited: MakeLimited,
                                                            clock: ManualClock) -> None:
    """The raw relay still tells the session it is in use, and counts what it forwards,
    with a limiter on the connection (the hot path as deployed)."""
    broker = await make_limited(clock=clock, ws_client_messages_per_second=1000)
    session = (await post_session(broker))[2]
    created = (await broker.store.get(session["id"])).last_activity
    clock.advance(120)
    ws = await kernel_ws(broker, session)
    message = json.dumps(make_message("execute_request", {"code": "1"}))
    await ws.send_str(message)
    assert (await ws.receive()).data == message
    await asyncio.gather(*broker.manager._background)  # the activity write, not awaited
    stored = await broker.store.get(session["id"])
    assert stored.last_activity == clock.now > created
    await ws.close()
    await asyncio.wait_for(broker.manager._no_connections.wait(), 10)  # the relay ended
    registry = broker.manager.metrics.registry
    sent = {"direction": "to_kernel", "channel": "shell"}
    assert registry.get_sample_value("broker_websocket_messages_total", sent) == 1
    assert registry.get_sample_value("broker_websocket_bytes_total", sent) == len(message)
    assert registry.get_sample_value("broker_kernel_executions_total") == 1


async def test_requests_that_miss_the_session_cache_together_share_one_store_read(
    make_limited: MakeLimited,
) -> None:
    """Under load a session's cache entry expires for every request in flight at once:
    they share one read of the (real, Redis) store instead of each making its own."""
    broker = await make_limited(redis=True)
    session = (await post_session(broker))[2]
    registry = broker.manager.metrics.registry
    reads = {"op": "get"}
    broker.manager._ready_cache.clear()
    before = registry.get_sample_value("broker_store_operation_duration_seconds_count", reads)
    found = await asyncio.gather(*(broker.manager.ready_session(session["id"], session["token"])
                                   for _ in range(20)))
    after = registry.get_sample_value("broker_store_operation_duration_seconds_count", reads)
    assert {s.id for s in found} == {session["id"]}
    assert after - before == 1
    broker.manager._ready_cache.clear()
    with pytest.raises(Forbidden):  # a shared read still checks each request's token
        await broker.manager.ready_session(session["id"], "not-the-token")
