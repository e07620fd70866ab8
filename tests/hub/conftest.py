"""Fixtures for the JupyterHub backend tests: real hubs, real proxies, real servers.

``hub`` (session)
    A JupyterHub from :mod:`tests.hubfixture` with no spawn limits and
    ``slow_spawn_timeout`` 0, so every spawn reports progress the way slow
    (KubeSpawner) spawns do. Stopped, with every server it spawned, by PID.
``limited_hub`` (session)
    A second hub with ``concurrent_spawn_limit=1`` and
    ``active_server_limit=1``, for the refusal tests; started on first use.
``second_hub``
    Another hub like ``hub``, for the federation tests (two members); started on
    first use and kept for the session, unless a test stops it (the member-down
    test does): then the next test asking for it gets a fresh one.
``pool_hub`` (session)
    A hub with ``active_server_limit=5``, for the warm pool's replica test: a
    pool of five fills it, so further spawns (misses, refills) are refused at
    once instead of loading the machine with servers. Started on first use.
``hub_broker``
    ``await hub_broker(**settings)``: a broker (``make_broker``) using
    ``hub``; keyword arguments override settings (``clock=`` too).
``no_leftovers`` (autouse)
    After each test, every hub the test used must have no broker user and no
    live server left; otherwise the test errors, and the leftovers are
    removed so the next test starts clean.

Helpers: :func:`post_session` (status, headers and body of a creation),
:func:`read_events` (a session's progress events, as the broker streams them)
and :func:`gone_from_hub` (a failed spawn is answered before its cleanup on the
hub finishes: the broker records the failure first).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerHarness, MakeBroker, pid_alive
from tests.hubfixture import HubConfig, HubSetupError, RunningHub, start_hub

PREFIX = "broker-"  # the BROKER_HUB_USER_PREFIX default
_HUBS = ("hub", "limited_hub", "second_hub", "pool_hub")

HubBroker = Callable[..., Awaitable[BrokerHarness]]


def _started(tmp: Path, name: str, config: HubConfig) -> RunningHub:
    try:
        return start_hub(tmp, name=name, config=config)
    except HubSetupError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    running = _started(tmp_path_factory.mktemp("hub"), "hub", HubConfig())
    yield running
    running.stop()


@pytest.fixture(scope="session")
def limited_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    config = HubConfig(concurrent_spawn_limit=1, active_server_limit=1)
    running = _started(tmp_path_factory.mktemp("limited-hub"), "limited_hub", config)
    yield running
    running.stop()


class _Restartable:
    """One hub for the whole session that a test may stop: the next test asking for it
    gets a fresh one (the federation's member-down test stops it)."""

    def __init__(self, tmp: pytest.TempPathFactory, name: str) -> None:
        self._tmp, self._name = tmp, name
        self.running: RunningHub | None = None

    def get(self) -> RunningHub:
        if self.running is None or self.running.proc.poll() is not None:
            if self.running is not None:
                self.running.stop()  # whatever the stopped hub left, by PID
            self.running = _started(self._tmp.mktemp(self._name), self._name, HubConfig())
        return self.running


@pytest.fixture(scope="session")
def _second_hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Restartable]:
    hubs = _Restartable(tmp_path_factory, "second_hub")
    yield hubs
    if hubs.running is not None:
        hubs.running.stop()


@pytest.fixture
def second_hub(_second_hubs: _Restartable) -> RunningHub:
    return _second_hubs.get()
@pytest.fixture(scope="session")
def pool_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    running = _started(tmp_path_factory.mktemp("pool-hub"), "pool_hub",
                       HubConfig(active_server_limit=5))
    yield running
    running.stop()


@pytest.fixture
async def hub_broker(hub: RunningHub, make_broker: MakeBroker) -> HubBroker:
    async def start(**overrides: Any) -> BrokerHarness:
        clock = overrides.pop("clock", None)
        return await make_broker(clock=clock, **hub.broker_settings(**overrides))

    return start


@pytest.fixture(autouse=True)
async def no_leftovers(request: pytest.FixtureRequest) -> Any:
    yield
    problems = []
    for name in _HUBS:
        if name not in request.fixturenames:
            continue
        if name == "second_hub":  # function-scoped, already torn down: ask its holder
            held = request.getfixturevalue("_second_hubs").running
            if held is None:
                continue
            running: RunningHub = held
        else:
            running = request.getfixturevalue(name)
        if running.proc.poll() is not None:
            continue  # stopped by the test: its stop() took every server with it
        users = await running.remove_users(PREFIX)
        if users:
            problems.append(f"{name} still had users {users}")
        alive = [pid for pid in running.spawned_pids() if pid_alive(pid)]
        if alive:
            problems.append(f"{name} still runs spawned PIDs {alive}")
    assert not problems, "; ".join(problems)


async def post_session(broker: BrokerHarness, wait: bool = True,
                       **body: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST /api/v1/sessions; (status, response headers, JSON body)."""
    async with broker.http.post(f"{broker.url}/api/v1/sessions",
                                params={"wait": "true"} if wait else {},
                                json=body or None) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def read_events(broker: BrokerHarness, session: dict[str, Any],
                      until: Callable[[dict[str, Any]], bool] | None = None,
                      ) -> list[dict[str, Any]]:
    """The session's progress events up to its final one (or the first ``until`` matches)."""
    events: list[dict[str, Any]] = []
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{session['id']}/events",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            events.append(json.loads(line[5:]))
            if until is not None and until(events[-1]):
                break
    return events


async def gone_from_hub(hub: RunningHub, user: str, limit: float = 30.0) -> bool:
    """Whether the hub user disappears within ``limit`` s (polled: the hub has no event)."""
    deadline = asyncio.get_running_loop().time() + limit
    while asyncio.get_running_loop().time() < deadline:
        if await hub.user(user) is None:
            return True
        await asyncio.sleep(0.1)
    return await hub.user(user) is None
