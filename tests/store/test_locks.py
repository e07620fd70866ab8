"""ClusterLocks over a real Redis: two store instances stand for two replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import Unavailable
from broker.store.crypto import TokenCipher
from broker.store.locks import ClusterLocks
from broker.store.redis import RedisStore
from tests.redisproc import RedisProcess


def _busy() -> Unavailable:
    return Unavailable("busy", reason="busy_test", retry_after=1)


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    prefix = f"l{uuid.uuid4().hex[:8]}:"
    stores = (RedisStore(redis_url, TokenCipher("k"), prefix=prefix),
              RedisStore(redis_url, TokenCipher("k"), prefix=prefix))
    yield stores
    for store in stores:
        await store.close()


async def test_a_lock_held_on_one_replica_makes_the_other_wait_then_pass(
    replicas: tuple[RedisStore, RedisStore]
) -> None:
    first, second = ClusterLocks(replicas[0]), ClusterLocks(replicas[1])
    inside = asyncio.Event()
    leave = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with first.hold("hub-user:x", ttl=30, wait=5, busy=_busy):
            order.append("first in")
            inside.set()
            await leave.wait()
            order.append("first out")

    task = asyncio.create_task(holder())
    await inside.wait()
    with pytest.raises(Unavailable) as caught:  # a short wait gives up with the caller's error
        async with second.hold("hub-user:x", ttl=30, wait=0.2, busy=_busy):
            pass
    assert caught.value.reason == "busy_test"
    waiter = asyncio.create_task(_enter(second, order))
    leave.set()
    await asyncio.wait_for(asyncio.gather(task, waiter), 5)
    assert order == ["first in", "first out", "second in"]


async def _enter(locks: ClusterLocks, order: list[str]) -> None:
    async with locks.hold("hub-user:x", ttl=30, wait=5, busy=_busy):
        order.append("second in")


async def test_a_lock_of_a_replica_that_died_expires(
    replicas: tuple[RedisStore, RedisStore]
) -> None:
    # The "dead" replica took the lock and never released it.
    assert await replicas[0].try_lock("kernels:s1", ttl=0.3)
    async with ClusterLocks(replicas[1]).hold("kernels:s1", ttl=30, wait=5, busy=_busy):
        pass


async def test_an_outage_raises_at_once_or_is_waited_out_when_asked(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, persistent=False)
    server.start()
    store = RedisStore(server.url, TokenCipher("k"), prefix="o:")
    locks = ClusterLocks(store)
    try:
        server.kill()
        with pytest.raises(Unavailable) as caught:  # a client's request: its 503 now
            async with locks.hold("kernels:s", ttl=30, wait=5, busy=_busy):
                pass
        assert caught.value.reason == "store_unavailable"
        entered = asyncio.Event()

        async def spawn() -> None:  # background work rides the outage out
            async with locks.hold("hub-user:u", ttl=30, wait=20, busy=_busy,
                                  through_outages=True):
                entered.set()

        task = asyncio.create_task(spawn())
        await asyncio.sleep(0)  # the task is waiting on the store now
        assert not entered.is_set()
        server.start()
        await asyncio.wait_for(task, 15)
        assert entered.is_set()
    finally:
        await store.close()
        server.stop()
