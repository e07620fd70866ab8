"""Two broker replicas sharing one real Redis: any replica serves any session."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientWebSocketResponse

from broker.models import Status
from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore
from tests.conftest import BrokerHarness, MakeBroker
from tests.kernelproto import V1, closing, execute


async def test_a_session_created_on_one_replica_works_on_another(
    make_broker: MakeBroker, redis_url: str
) -> None:
    shared = {"redis_url": redis_url, "secret_key": "replica-test-secret",
              "redis_prefix": f"r{uuid.uuid4().hex[:8]}:"}
    first = await make_broker(**shared)
    second = await make_broker(**shared)
    session = await first.ready_session()
    token = session["token"]
    # The second replica knows the session from Redis alone.
    async with second.http.get(f"{second.url}/api/v1/sessions/{session['id']}",
                               headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    base = f"{second.url}/s/{session['id']}/"
    async with second.http.post(f"{base}api/kernels", json={"name": "python3"},
                                headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 201
        kernel = (await resp.json())["id"]
    async with second.http.ws_connect(f"ws{base[4:]}api/kernels/{kernel}/channels",
                                      params={"token": token}, protocols=[V1]) as ws:
        result = await execute(ws, "print(6*7)")
    assert result.stdout == "42\n"
    # A wrong secret key cannot read the stored upstream token: a clear refusal.
    third = await make_broker(**(shared | {"secret_key": "another-secret"}))
    async with third.http.get(f"{base.replace(second.url, third.url)}api/status",
                              headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 500
        body = await resp.json()
        assert body["error"] == "internal" and "Traceback" not in body["message"]


async def test_a_session_deleted_on_one_replica_closes_its_websocket_on_another(
    make_broker: MakeBroker, redis_url: str
) -> None:
    """Issue 18: the close reaches the replica holding the WebSocket (Redis pub/sub).

    The test waits for the close within a bound of its own (5 s; without the
    announcement the socket stays open for good) and prints the delay from the
    DELETE being sent to the close arriving, the figure docs/operations.md
    quotes; it does not assert the 1 s target itself, which a loaded machine
    could miss for reasons that are not the broker's.
    """
    shared = {"redis_url": redis_url, "secret_key": "replica-test-secret",
              "redis_prefix": f"r{uuid.uuid4().hex[:8]}:"}
    first = await make_broker(**shared)
    second = await make_broker(**shared)
    session = await first.ready_session()
    kernel = await first.start_kernel(session)
    base = f"{second.url}/s/{session['id']}/"
    async with second.http.ws_connect(f"ws{base[4:]}api/kernels/{kernel}/channels",
                                      params={"token": session["token"]}, protocols=[V1]) as ws:
        assert (await execute(ws, "print(1)")).stdout == "1\n"
        loop = asyncio.get_running_loop()
        sent = loop.time()
        delete = asyncio.create_task(first.http.delete(
            f"{first.url}/api/v1/sessions/{session['id']}",
            headers={"Authorization": f"token {session['token']}"}))
        message = await closing(ws, 5)
        delay = loop.time() - sent
        async with await delete as resp:
            assert resp.status == 204
    assert (message.data, message.extra) == (1000, "session ended: deleted")
    print(f"\nclose through the other replica {delay * 1000:.0f} ms after the DELETE was sent")


@dataclasses.dataclass
class Deaf:
    """Two replicas on one Redis; the second one's Redis user may not subscribe (as
    in an outage of pub/sub) until :meth:`hear` lets it."""

    admin: aioredis.Redis
    user: str
    first: BrokerHarness
    second: BrokerHarness
    store: RedisStore

    async def hear(self) -> None:
        await self.admin.execute_command("ACL", "SETUSER", self.user, "allchannels")

    async def kernel_socket_on_second(self) -> tuple[dict[str, Any], ClientWebSocketResponse]:
        """A ready session of the first replica, and its kernel's WebSocket opened
        through the second (a cell already ran through it)."""
        session = await self.first.ready_session()
        kernel = await self.first.start_kernel(session)
        base = f"{self.second.url}/s/{session['id']}/"
        ws = await self.second.http.ws_connect(f"ws{base[4:]}api/kernels/{kernel}/channels",
                                               params={"token": session["token"]},
                                               protocols=[V1])
        assert (await execute(ws, "print(1)")).stdout == "1\n"
        return session, ws


@pytest.fixture
async def deaf(make_broker: MakeBroker, redis_url: str) -> AsyncIterator[Deaf]:
    admin = aioredis.Redis.from_url(redis_url)
    user, password = f"replica-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all",
                                "resetchannels")
    secret, prefix = "replica-test-secret", f"r{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_url, TokenCipher(secret), prefix=prefix)
    try:
        first = await make_broker(redis_url=redis_url, secret_key=secret, redis_prefix=prefix)
        second = await make_broker(
            redis_url=redis_url.replace("redis://", f"redis://{user}:{password}@"),
            secret_key=secret, redis_prefix=prefix)
        yield Deaf(admin, user, first, second, store)
    finally:
        await store.close()
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


async def test_an_end_recorded_while_a_replica_was_not_subscribed_closes_on_resubscribing(
    deaf: Deaf,
) -> None:
    """A replica that missed the announcement (here: Redis's ACL kept it from
    subscribing, as an outage would) finds the end when it subscribes again.

    The end is recorded through the store itself, as another replica's reaper
    would before stopping the server; the server is left running here, so only
    the check on resubscribing can close the socket.
    """
    session, ws = await deaf.kernel_socket_on_second()
    async with ws:
        stored = await deaf.store.get(session["id"])
        assert stored is not None
        stored.status, stored.ended_reason = Status.STOPPED, "max_age"
        await deaf.store.save(stored)
        await deaf.hear()
        message = await closing(ws, 10)
    assert (message.data, message.extra) == (1000, "session ended: max_age")


async def test_a_replica_that_never_heard_of_the_end_closes_with_it_when_the_server_goes(
    deaf: Deaf,
) -> None:
    """The session is deleted through another replica while this one cannot
    subscribe at all: when the stopped server drops the kernel connection, the
    relay asks the store why and tells the client the session ended (1000 and
    the reason), not 1011, which would invite a reconnect to a session that is gone."""
    session, ws = await deaf.kernel_socket_on_second()
    async with ws:
        async with deaf.first.http.delete(
                f"{deaf.first.url}/api/v1/sessions/{session['id']}",
                headers={"Authorization": f"token {session['token']}"}) as resp:
            assert resp.status == 204
        message = await closing(ws, 15)
    assert (message.data, message.extra) == (1000, "session ended: deleted")
