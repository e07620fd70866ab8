"""The hub's own limits, as the broker's clients see them.

``limited_hub`` runs with ``concurrent_spawn_limit=1`` and
``active_server_limit=1``: a second spawn while one is pending is throttled
(hub: 429 with Retry-After → broker: 429 ``rate_limited`` with the hub's
Retry-After), and a second server while one runs finds no room (hub: 429
without Retry-After → broker: 503 ``capacity`` with Retry-After). Either way
the refused session's hub user is removed again.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import BrokerHarness, MakeBroker
from tests.hub.conftest import PREFIX, gone_from_hub, post_session, read_events
from tests.hubfixture import RunningHub


async def _delete(broker: BrokerHarness, session: dict[str, Any]) -> None:
    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 204


async def test_concurrent_spawn_limit_is_429_with_the_hubs_retry_after(
    limited_hub: RunningHub, make_broker: MakeBroker
) -> None:
    broker = await make_broker(**limited_hub.broker_settings())
    status, _, first = await post_session(broker, wait=False, profile="never")
    assert status == 201
    # The hub relaying its first progress message means its spawn is pending.
    events = await read_events(broker, first, until=lambda e: e["message"] == "Server requested")
    assert events[-1]["message"] == "Server requested"

    status, headers, refused = await post_session(broker)
    assert status == 429, refused
    assert refused["reason"] == "rate_limited"
    # JupyterHub suggests a delay from spawn_throttle_retry_range (default 30-60 s).
    assert 30 <= int(headers["Retry-After"]) <= 60
    assert headers["Retry-After"] in refused["message"]
    assert await gone_from_hub(limited_hub, f"{PREFIX}{refused['id']}")

    await _delete(broker, first)
    assert await limited_hub.user(f"{PREFIX}{first['id']}") is None


async def test_active_server_limit_is_503_capacity_with_retry_after(
    limited_hub: RunningHub, make_broker: MakeBroker
) -> None:
    broker = await make_broker(**limited_hub.broker_settings())
    first = await broker.ready_session()

    status, headers, refused = await post_session(broker)
    assert status == 503, refused
    assert refused["reason"] == "capacity"
    assert int(headers["Retry-After"]) == 60
    assert await gone_from_hub(limited_hub, f"{PREFIX}{refused['id']}")
    # The refusal did not disturb the running session.
    async with broker.http.get(f"{first['base_url']}api/status",
                               headers={"Authorization": f"token {first['token']}"}) as resp:
        assert resp.status == 200

    await _delete(broker, first)
    assert await limited_hub.user(f"{PREFIX}{first['id']}") is None
