"""Fixtures for the limit tests: real brokers on an instant backend.

``upstream``
    A running :class:`~tests.limits.upstream.FakeJupyter` on loopback.
``gate``
    The :class:`~tests.limits.upstream.SpawnGate` every instant spawn passes
    (open unless a test closes it).
``make_limited``
    Starts a broker app (``create_app`` with the :class:`InstantBackend`) on
    a real loopback port; settings as keyword arguments, ``clock=`` for a
    :class:`~tests.conftest.ManualClock`, ``store=`` for a store of the test's own.
    ``redis=True`` puts it on the
    session's real Redis under this test's own key prefix: every broker
    started with ``redis=True`` in one test shares that prefix, i.e. they are
    replicas of one cluster. Returns a :class:`~tests.conftest.BrokerHarness`.
``redis_keys``
    Lists the raw Redis keys under this test's prefix (with their TTLs).

Helpers: :func:`assert_refusal` checks the shape every refusal must have.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from broker.app import create_app
from broker.settings import Settings
from tests.conftest import BrokerHarness
from tests.limits.upstream import FakeJupyter, SpawnGate, factory

ORIGIN = "https://book.example.org"
SECRET = "limits-test-secret"

MakeLimited = Callable[..., Awaitable[BrokerHarness]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeJupyter]:
    server = FakeJupyter()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def gate() -> SpawnGate:
    return SpawnGate()


@pytest.fixture
def prefix() -> str:
    return f"l{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def make_limited(
    upstream: FakeJupyter, gate: SpawnGate, prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[MakeLimited]:
    runners: list[web.AppRunner] = []
    clients: list[aiohttp.ClientSession] = []

    async def start(*, clock: Callable[[], float] | None = None, redis: bool = False,
                    store: Any = None, **overrides: Any) -> BrokerHarness:
        values: dict[str, Any] = {"port": 0, "reap_interval": 3600,
                                  "max_sessions_per_owner": 0, "allowed_origins": [ORIGIN]}
        if redis:
            values |= {"redis_url": request.getfixturevalue("redis_url"),
                       "redis_prefix": prefix, "secret_key": SECRET}
        values.update(overrides)
        kwargs: dict[str, Any] = {"backend": factory(upstream, gate), "store": store}
        if clock is not None:
            kwargs["clock"] = clock
        app = create_app(Settings(**values), **kwargs)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        clients.append(http)
        return BrokerHarness(url=f"http://127.0.0.1:{runner.addresses[0][1]}", app=app,
                             http=http)

    yield start
    gate.opened.set()  # nothing may stay parked at the gate while apps shut down
    for http in clients:
        await http.close()
    for runner in reversed(runners):
        await runner.cleanup()


KeyLister = Callable[[], Awaitable[dict[str, int]]]


@pytest.fixture
async def redis_keys(redis_url: str, prefix: str) -> AsyncIterator[KeyLister]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)

    async def keys() -> dict[str, int]:
        """Key (without the prefix) -> TTL in ms (-1: none)."""
        found = {}
        async for key in client.scan_iter(match=f"{prefix}*"):
            found[key[len(prefix):]] = await client.pttl(key)
        return found

    yield keys
    await client.aclose()


def assert_refusal(status: int, headers: Mapping[str, str], body: Any, *, expect_status: int,
                   reason: str, origin: str | None = ORIGIN) -> None:
    """A refusal as every client may rely on: status, JSON shape, Retry-After, CORS."""
    assert status == expect_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error", "reason", "message"}, body
    assert body["error"] == body["reason"] == reason, body
    assert body["message"] and "Traceback" not in body["message"], body
    assert headers["Content-Type"].startswith("application/json")
    assert int(headers["Retry-After"]) >= 1, headers
    if origin is not None:
        assert headers["Access-Control-Allow-Origin"] == origin, headers
        assert "Retry-After" in headers["Access-Control-Expose-Headers"]


async def post_session(broker: BrokerHarness, *, origin: str | None = ORIGIN,
                       headers: Mapping[str, str] | None = None, wait: bool = True,
                       **body: Any) -> tuple[int, Mapping[str, str], Any]:
    """POST /api/v1/sessions as a page on ``origin`` would; (status, headers, JSON body)."""
    sent = dict(headers or {})
    if origin is not None:
        sent["Origin"] = origin
    async with broker.http.post(f"{broker.url}/api/v1/sessions",
                                params={"wait": "true"} if wait else {},
                                json=body or None, headers=sent) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def delete_session(broker: BrokerHarness, session: Mapping[str, Any]) -> None:
    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 204, await resp.text()
