"""Shared test fixtures: real components only.

Fixtures, by what they give you:

``redis_url`` (session)
    A private ``redis-server`` on a free loopback port (or ``$REDIS_URL``
    when set), stopped by PID at the end. Never the machine's own Redis.
``redis_store`` / ``memory_store``
    A fresh store on a :class:`ManualClock`, Redis keys under a unique prefix.
``clock``
    A :class:`ManualClock` you advance by hand (expiry without sleeping).
``make_broker``
    Starts a broker app on a real loopback port with the given settings;
    returns a :class:`BrokerHarness` (URL, app, HTTP client, helpers).
``broker``
    ``make_broker()`` with defaults: local backend, memory store.

``fault_table``
    Records what a fault test (marker ``chaos``) injected, what clients saw
    and what was lost: the table in docs/operations.md (:mod:`tests.faulttable`).

Helpers in :mod:`tests.kernelproto` speak the kernel protocol (JSON frames and
the ``v1.kernel.websocket.jupyter.org`` binary frames).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker import appkeys
from broker.app import create_app
from broker.logs import AccessLogger
from broker.settings import Settings
from broker.store.crypto import TokenCipher
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore

pytest_plugins = ["tests.faulttable"]


class ManualClock:
    """A clock that only moves when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis of the test session's own (``$REDIS_URL`` wins when set)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--loglevel", "notice"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for the server's own readiness line
        if "Ready to accept connections" in line:
            break
    else:
        pytest.fail(f"redis-server exited with {proc.wait()}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def redis_store(redis_url: str, clock: ManualClock) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, TokenCipher("test-secret"), prefix=f"t{uuid.uuid4().hex[:8]}:",
                       clock=clock)
    yield store
    await store.close()


@pytest.fixture
async def memory_store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(TokenCipher(), clock=clock)


@dataclass
class BrokerHarness:
    """A running broker and a client to talk to it."""

    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def manager(self) -> Any:
        return self.app[appkeys.MANAGER]

    @property
    def store(self) -> Any:
        return self.app[appkeys.STORE]

    async def create(self, wait: bool = True, token: str | None = None,
                     **body: Any) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"token {token}"} if token else {}
        async with self.http.post(f"{self.url}/api/v1/sessions",
                                  params={"wait": "true"} if wait else {},
                                  json=body or None, headers=headers) as resp:
            return resp.status, await resp.json()

    async def ready_session(self, **body: Any) -> dict[str, Any]:
        status, data = await self.create(**body)
        assert status == 201, data
        assert data["status"] == "ready", data
        return data

    async def start_kernel(self, session: dict[str, Any], name: str = "python3") -> str:
        async with self.http.post(f"{session['base_url']}api/kernels", json={"name": name},
                                  headers={"Authorization": f"token {session['token']}"}) as resp:
            assert resp.status == 201, await resp.text()
            return str((await resp.json())["id"])


MakeBroker = Callable[..., Awaitable[BrokerHarness]]


@pytest.fixture
async def make_broker(tmp_path: Any) -> AsyncIterator[MakeBroker]:
    runners: list[web.AppRunner] = []
    clients: list[aiohttp.ClientSession] = []

    async def start(*, clock: Callable[[], float] | None = None, store: Any = None,
                    **overrides: Any) -> BrokerHarness:
        values: dict[str, Any] = {"port": 0, "local_root_dir": str(tmp_path / "sessions"),
                                  "reap_interval": 3600, "max_sessions_per_owner": 0}
        values.update(overrides)
        settings = Settings(**values)
        kwargs: dict[str, Any] = {"store": store}
        if clock is not None:
            kwargs["clock"] = clock
        app = create_app(settings, **kwargs)
        # The production access logger, so test logs are scrubbed the same way.
        runner = web.AppRunner(app, access_log_class=AccessLogger)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        http = aiohttp.ClientSession()
        clients.append(http)
        return BrokerHarness(url=f"http://127.0.0.1:{port}", app=app, http=http)

    yield start
    for http in clients:
        await http.close()
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def broker(make_broker: MakeBroker) -> BrokerHarness:
    return await make_broker()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists" until reaped; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def wait_for_exit(pid: int, limit: float = 10.0) -> bool:
    """Poll /proc for a process we asked to stop (the kernel offers no event)."""
    deadline = asyncio.get_running_loop().time() + limit
    while asyncio.get_running_loop().time() < deadline:
        if not pid_alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not pid_alive(pid)


async def eventually(probe: Callable[[], Awaitable[Any]], limit: float = 30.0) -> Any:
    """Poll ``probe()`` until it returns something truthy (an external process is recovering
    or working and offers no event to await); fail the test after ``limit`` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while asyncio.get_running_loop().time() < deadline:
        result = await probe()
        if result:
            return result
        await asyncio.sleep(0.1)
    pytest.fail(f"not within {limit} s")


def marked_for(pid: int, session_id: str) -> bool:
    """Whether process ``pid`` carries the local backend's marker of ``session_id``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"JSB_SESSION_MARK={session_id}-".encode() in fh.read()
    except OSError:
        return False
