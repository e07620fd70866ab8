"""A herd of new visitors on the local backend goes through the spawn queue.

Real ``jupyter server`` processes behind a broker with few spawn slots: a
herd larger than the slots is served in full, the queued visitors hear their
place in line going down on the ``/build`` stream (as thebe reads it), and a
visitor who leaves while queued leaves the line. The queue's own ordering
rules (FIFO, the pool's share) are in tests/test_spawnqueue.py; the tests
here that are about leaving and the queue's bound hold the only slot
themselves, through the queue's API, so no server needs to start for them.
The herd's servers also serve the first-cell metric's test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from broker.models import Status
from tests.binder.eventsource import event_source
from tests.conftest import MakeBroker, eventually
from tests.kernelproto import execute


async def test_a_herd_larger_than_the_slots_is_served_in_full(make_broker: MakeBroker) -> None:
    broker = await make_broker(spawn_slots=2)
    launches = await asyncio.gather(*(
        event_source(broker.http, f"{broker.url}/build/gh/owner/book{i}/HEAD", eof_wait=0)
        for i in range(4)))
    assert [launch.final and launch.final["phase"] for launch in launches] == ["ready"] * 4, \
        [launch.final for launch in launches]
    positions = sorted(([e["queue_position"] for e in launch.events if e["phase"] == "waiting"
                         and "queue_position" in e] for launch in launches), key=len)
    # Two spawned at once; the third heard "next", the fourth "1 ahead of you", then "next".
    assert positions == [[], [], [1], [2, 1]], positions
    for launch in launches:
        for event in launch.events:
            if "queue_position" in event:
                assert event["message"].startswith("Waiting for a free launch slot")
        ready = launch.ready
        async with broker.http.get(f"{ready['url']}api/status",
                                   params={"token": ready["token"]}) as resp:
            assert resp.status == 200
    metrics = broker.manager.metrics.registry
    granted = metrics.get_sample_value("broker_spawn_queue_wait_seconds_count",
                                       {"kind": "visitor", "outcome": "granted"})
    assert granted == 4
    assert broker.manager.spawn_queue.waiting() == broker.manager.spawn_queue.running() == 0

    # Each visitor's first cell is measured from the request, once per session: two
    # cells on a kernel WebSocket of one session, one through the execute API of another.
    def first_replies() -> float | None:
        return metrics.get_sample_value("broker_session_first_reply_seconds_count")

    assert first_replies() == 0
    one, two = launches[0].ready, launches[1].ready
    session = {"base_url": one["url"], "token": one["token"]}
    kernel = await broker.start_kernel(session)
    async with broker.http.ws_connect(f"ws{one['url'][4:]}api/kernels/{kernel}/channels",
                                      params={"token": one["token"]}) as ws:
        for _ in range(2):
            assert (await execute(ws, "print(1)")).stdout == "1\n"
    assert first_replies() == 1
    two_id = two["url"].rstrip("/").rsplit("/", 1)[1]
    async with broker.http.post(f"{broker.url}/api/v1/sessions/{two_id}/execute",
                                json={"code": "print(1)"},
                                headers={"Authorization": f"token {two['token']}"}) as resp:
        assert resp.status == 200, await resp.text()
    assert first_replies() == 2


async def test_a_queued_visitor_who_leaves_leaves_the_line(make_broker: MakeBroker) -> None:
    broker = await make_broker(spawn_slots=1)
    queue = broker.manager.spawn_queue
    async with queue.slot():  # the only slot is busy: the visitor queues
        client = aiohttp.ClientSession()
        waiting = asyncio.create_task(client.post(f"{broker.url}/api/v1/sessions",
                                                  params={"wait": "true"}))
        await eventually(_async(lambda: queue.waiting() == 1), limit=10)
        [session] = await broker.store.list_live()
        assert session.status is Status.PENDING
        waiting.cancel()  # the visitor closes the tab: the connection goes
        await client.close()
        ended = await eventually(_ended(broker, session.id), limit=10)
        assert ended.ended_reason == "abandoned"
        assert queue.waiting() == 0
    metrics = broker.manager.metrics.registry
    assert metrics.get_sample_value("broker_spawn_queue_wait_seconds_count",
                                    {"kind": "visitor", "outcome": "left"}) == 1
    # Counted once stop() is through (after the record says stopped).
    await eventually(_async(lambda: metrics.get_sample_value(
        "broker_sessions_ended_total", {"reason": "abandoned"}) == 1), limit=10)


async def test_the_queue_wait_has_its_own_bound(make_broker: MakeBroker) -> None:
    broker = await make_broker(spawn_slots=1, spawn_queue_timeout=0.5)
    async with broker.manager.spawn_queue.slot(), broker.http.post(
            f"{broker.url}/api/v1/sessions", params={"wait": "true"}) as resp:
        body = await resp.json()
        assert resp.status == 503, body
        assert body["reason"] == "spawn_queue_timeout"
        assert int(resp.headers["Retry-After"]) >= 1
    session = await broker.store.get(body["id"], include_expired=True)
    assert session.status is Status.FAILED and session.ended_reason == "spawn_queue_timeout"


def _async(probe: Any) -> Any:
    async def call() -> Any:
        return probe()
    return call


def _ended(broker: Any, session_id: str) -> Any:
    async def probe() -> Any:
        session = await broker.store.get(session_id, include_expired=True)
        return session if session is not None and session.status.terminal else None
    return probe
