"""The spawn queue's rules, on the queue itself (no backend: these are about the line).

Synchronisation is by the queue's own hand-overs: a holder is a task that
keeps its slot until the test sets its ``release`` event, so who holds what
is known at every step without sleeping.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest

from broker.errors import SpawnQueueTimeout
from broker.metrics import Metrics
from broker.spawnqueue import QueueProgress, SpawnQueue, auto_slots

#: Each test takes well under a second; a queue that never hands a slot over fails fast.
pytestmark = pytest.mark.timeout(15)


@dataclass
class Holder:
    """One request for a slot, run as a task; holds the slot until ``release`` is set."""

    name: str
    kind: str = "visitor"
    got: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    positions: list[int] = field(default_factory=list)
    seen: list[QueueProgress] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self, queue: SpawnQueue, order: list[str]) -> Holder:
        async def report(where: QueueProgress) -> None:
            self.positions.append(where.position)
            self.seen.append(where)

        async def run() -> None:
            async with queue.slot(self.kind, on_progress=report):  # type: ignore[arg-type]
                order.append(self.name)
                self.got.set()
                await self.release.wait()

        self.task = asyncio.create_task(run())
        return self


async def settle() -> None:
    """Let every runnable task take its next step (the queue hands over on the loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_fifo_for_visitors_with_positions_that_only_decrease() -> None:
    queue, order = SpawnQueue(1), []
    holders = [Holder(f"v{i}").start(queue, order) for i in range(4)]
    await settle()
    assert order == ["v0"] and queue.waiting() == 3
    for i in range(1, 4):
        holders[i - 1].release.set()
        await holders[i].got.wait()
    holders[3].release.set()
    await asyncio.gather(*(h.task for h in holders if h.task))
    assert order == ["v0", "v1", "v2", "v3"]
    assert holders[0].positions == []  # a free slot: no wait, nothing to announce
    assert holders[3].positions == [3, 2, 1]
    for holder in holders:
        assert holder.positions == sorted(holder.positions, reverse=True)
        assert len(set(holder.positions)) == len(holder.positions)


async def test_pool_share_never_takes_the_last_slot_and_visitors_go_first() -> None:
    queue, order = SpawnQueue(2, pool_share=1.0), []
    pools = [Holder(f"p{i}", "pool").start(queue, order) for i in range(3)]
    await settle()
    assert order == ["p0"], "a share of all slots still leaves the last one to visitors"
    visitor = Holder("v0").start(queue, order)
    await visitor.got.wait()  # the slot the pool may not take is free for a visitor at once
    late = Holder("v1").start(queue, order)
    await settle()
    pools[0].release.set()  # a slot frees while a visitor and pool refills wait
    await late.got.wait()
    await settle()
    assert order == ["p0", "v0", "v1"], "a waiting visitor goes before waiting refills"
    for holder in (visitor, late):
        holder.release.set()
    await pools[1].got.wait()
    await settle()
    assert order[-1] == "p1" and queue.running("pool") == 1
    for holder in pools:
        holder.release.set()
    await asyncio.gather(*(h.task for h in [*pools, visitor, late] if h.task))
    assert queue.running() == 0 and queue.waiting() == 0


@pytest.mark.parametrize(("slots", "share", "pool_slots"),
                         [(1, 1.0, 0), (2, 0.5, 1), (4, 0.5, 2), (4, 0.0, 0), (10, 0.25, 2)])
def test_pool_slots_rule(slots: int, share: float, pool_slots: int) -> None:
    assert SpawnQueue(slots, pool_share=share).pool_slots == pool_slots


async def test_a_waiter_that_is_cancelled_leaves_the_line() -> None:
    queue, order = SpawnQueue(1), []
    first = Holder("v0").start(queue, order)
    gone = Holder("gone").start(queue, order)
    behind = Holder("v2").start(queue, order)
    await settle()
    assert behind.positions == [2]
    assert gone.task is not None
    gone.task.cancel()
    await settle()
    assert queue.waiting() == 1 and behind.positions == [2, 1]
    first.release.set()
    await behind.got.wait()
    behind.release.set()
    await asyncio.gather(first.task, behind.task)  # type: ignore[arg-type]
    assert order == ["v0", "v2"] and queue.running() == 0


async def test_the_wait_has_its_own_bound_and_a_clear_error() -> None:
    metrics = Metrics("local")
    queue, order = SpawnQueue(1, metrics=metrics), []
    first = Holder("v0").start(queue, order)
    await first.got.wait()
    with pytest.raises(SpawnQueueTimeout) as refused:
        async with queue.slot(limit=0.05):
            pytest.fail("no slot was free")
    assert refused.value.status == 503 and refused.value.reason == "spawn_queue_timeout"
    assert "Retry-After" in refused.value.headers
    assert queue.waiting() == 0
    timeouts = metrics.registry.get_sample_value(
        "broker_spawn_queue_wait_seconds_count", {"kind": "visitor", "outcome": "timeout"})
    assert timeouts == 1
    first.release.set()
    await first.task  # type: ignore[misc]


async def test_estimate_comes_from_recent_spawns() -> None:
    now = [0.0]
    queue, order = SpawnQueue(2, clock=lambda: now[0]), []
    async with queue.slot():
        now[0] += 6.0
    blockers = [Holder(f"b{i}").start(queue, order) for i in range(2)]
    waiter = Holder("x").start(queue, order)
    await settle()
    assert [(p.position, p.wait) for p in waiter.seen] == [(1, pytest.approx(3.0))]
    event = waiter.seen[0].event()
    assert event["phase"] == "waiting" and event["queue_wait"] == 3
    assert "you are next" in str(event["message"])
    for holder in blockers:
        holder.release.set()
    await waiter.got.wait()
    waiter.release.set()
    await asyncio.gather(*(h.task for h in [*blockers, waiter] if h.task))
    assert math.isclose(queue.typical_hold() or 0, 1.5)  # 6 s then three instant holds


def test_auto_slots_rule() -> None:
    assert auto_slots("local", cpus=1) == 2
    assert auto_slots("local", cpus=8) == 16
    assert auto_slots("jupyterhub") == auto_slots("binderhub") == 20
