"""Fixtures for the BinderHub side of the broker.

``standin``
    A running :class:`~tests.binderstandin.BinderStandin` (BinderHub's launch
    API from docs/protocols.md#binderhub-launch-api, real ``jupyter server``
    processes behind it) with BinderHub's defaults: keepalive every 25 s, stream held 60 s after a
    build, 10 launches per IP per hour. Tests change its knobs directly.
``binder_broker``
    A broker (``make_broker``) with ``BROKER_BACKEND=binderhub`` pointed at
    ``standin`` and allowed to stop its servers through the hub API;
    extra settings as keyword arguments.
``BOOK``
    The origin of the "MyST book" page in these tests (an allowed origin).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.binderstandin import BinderStandin
from tests.conftest import BrokerHarness, MakeBroker

BOOK = "https://book.example.org"
OTHER_BOOK = "https://other-book.example.org"


@pytest.fixture
async def standin(tmp_path: Path) -> AsyncIterator[BinderStandin]:
    hub = BinderStandin(tmp_path / "binderhub")
    await hub.start()
    yield hub
    await hub.close()


BinderBroker = Callable[..., Awaitable[BrokerHarness]]


@pytest.fixture
def binder_broker(make_broker: MakeBroker, standin: BinderStandin) -> BinderBroker:
    async def start(**overrides: Any) -> BrokerHarness:
        values: dict[str, Any] = {
            "backend": "binderhub",
            "binder_url": standin.url,
            "binder_hub_url": standin.url,
            "binder_hub_api_token": standin.hub_token,
            "allowed_origins": [BOOK, OTHER_BOOK],
        }
        values.update(overrides)
        return await make_broker(**values)

    return start
