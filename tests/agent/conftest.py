"""Fixtures for the agent API tests (execute, files, client): real local sessions.

``agent``
    A broker with default settings and one ready session on the local backend
    (a real ``jupyter server`` with ipykernel), wrapped in :class:`Agent`.
``make_agent``
    The same with settings overrides, e.g. ``await make_agent(max_upload_size=1024)``.
``agent_broker``
    Just the broker (for tests that create sessions themselves, e.g. with the client).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import BrokerHarness, MakeBroker


@dataclass
class Agent:
    """A ready session and plain-HTTP helpers for the agent endpoints."""

    broker: BrokerHarness
    session: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.session['token']}"}

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.broker.http

    def url(self, tail: str) -> URL:
        """An endpoint of this session; ``tail`` is sent exactly as written (no normalising)."""
        return URL(f"{self.broker.url}/api/v1/sessions/{self.session['id']}/{tail}",
                   encoded=True)

    async def execute(self, code: str, **fields: Any) -> dict[str, Any]:
        async with self.http.post(self.url("execute"), json={"code": code, **fields},
                                  headers=self.headers) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            return dict(body)

    async def events(self, code: str, **fields: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """A streamed execution's events, (event name, data) as they arrive."""
        headers = {**self.headers, "Accept": "text/event-stream"}
        async with self.http.post(self.url("execute"), json={"code": code, **fields},
                                  headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/event-stream"
            name, data = "", ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    yield name, json.loads(data)
                    name, data = "", ""

    async def put(self, path: str, data: bytes) -> tuple[int, dict[str, Any]]:
        async with self.http.put(self.url(f"files/{path}"), data=data,
                                 headers=self.headers) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str) -> Fetched:
        """GET a files URL, read whole."""
        async with self.http.get(self.url(f"files/{path}"), headers=self.headers) as resp:
            return Fetched(resp.status, resp.content_type, resp.headers.copy(),
                           await resp.read())


@dataclass
class Fetched:
    """A read response: status, content type, headers and body bytes."""

    status: int
    content_type: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


MakeAgent = Callable[..., Awaitable[Agent]]

@pytest.fixture
async def make_agent(make_broker: MakeBroker) -> MakeAgent:
    async def start(**settings: Any) -> Agent:
        broker = await make_broker(**settings)
        return Agent(broker, await broker.ready_session())

    return start


@pytest.fixture
async def agent(make_agent: MakeAgent) -> Agent:
    return await make_agent()


@pytest.fixture
async def agent_broker(make_broker: MakeBroker) -> BrokerHarness:
    return await make_broker()
