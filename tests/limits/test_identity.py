"""The owner a limit counts: client address (trusted proxies, IPv6 /64) or API key."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from broker.policy.apikeys import ApiKeys
from broker.settings import Settings
from tests.limits.conftest import MakeLimited, assert_refusal, post_session

AGENT_KEY = "agent-platform-key-0123456789"
OTHER_KEY = "second-platform-key-9876543210"
KEYS = json.dumps({
    "agents": {"key": AGENT_KEY, "max_sessions": 3, "max_creations": 4, "creation_window": 60},
    "hashed": {"key_sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest()},
})


def xff(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


async def owners(broker: object) -> set[str]:
    return {s.owner for s in await broker.store.list_live()}  # type: ignore[attr-defined]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_sessions_per_owner=1)
    assert (await post_session(broker, headers=xff("198.51.100.1")))[0] == 201
    status, headers, body = await post_session(broker, headers=xff("198.51.100.2"))
    assert_refusal(status, headers, body, expect_status=429, reason="owner_sessions")
    assert await owners(broker) == {"127.0.0.1"}


async def test_trusted_proxies_are_walked_from_the_right(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_sessions_per_owner=1,
                                trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"])
    assert (await post_session(broker, headers=xff("198.51.100.7, 10.1.2.3")))[0] == 201
    # A client prepending a forged address is still itself.
    status, headers, body = await post_session(
        broker, headers=xff("192.0.2.99, 198.51.100.7, 10.9.9.9"))
    assert_refusal(status, headers, body, expect_status=429, reason="owner_sessions")
    assert (await post_session(broker, headers=xff("198.51.100.8")))[0] == 201
    assert await owners(broker) == {"198.51.100.7", "198.51.100.8"}


async def test_ipv6_clients_are_grouped_by_64(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_sessions_per_owner=1, trusted_proxies=["127.0.0.1/32"])
    assert (await post_session(broker, headers=xff("2001:db8:1:2::1")))[0] == 201
    assert (await post_session(broker, headers=xff("2001:db8:1:2:ffff::9")))[0] == 429
    assert (await post_session(broker, headers=xff("2001:db8:1:3::1")))[0] == 201
    assert await owners(broker) == {"2001:db8:1:2::/64", "2001:db8:1:3::/64"}


async def test_api_keys_have_their_own_owner_and_limits(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_sessions_per_owner=1, api_keys=KEYS)
    bearer = {"Authorization": f"Bearer {AGENT_KEY}"}
    created = []
    for n in range(3):
        status, headers, body = await post_session(broker, headers=bearer, spec=f"k{n}")
        assert status == 201, body
        assert headers["X-RateLimit-Limit"] == "4"
        created.append(body)
    status, headers, body = await post_session(broker, headers=bearer, spec="k3")
    assert_refusal(status, headers, body, expect_status=429, reason="owner_sessions")
    assert "3 live sessions" in body["message"]
    # The address behind the key keeps its own, smaller allowance.
    assert (await post_session(broker, spec="anon"))[0] == 201
    assert (await post_session(broker, spec="anon2"))[0] == 429
    # The hashed key works too, with the default limits.
    other = {"Authorization": f"bearer {OTHER_KEY}"}
    assert (await post_session(broker, headers=other, spec="h"))[0] == 201
    assert (await post_session(broker, headers=other, spec="h2"))[0] == 429
    assert await owners(broker) == {"key:agents", "key:hashed", "127.0.0.1"}
    # A key holder reuses a session by its token in the query string.
    async with broker.http.post(f"{broker.url}/api/v1/sessions",
                                params={"token": created[0]["token"]},
                                json={"spec": "k0"}, headers=bearer) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == created[0]["id"]


async def test_an_unknown_bearer_value_is_just_a_session_token(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_sessions_per_owner=1, api_keys=KEYS)
    status, _h, _b = await post_session(broker, headers={"Authorization": "Bearer not-a-key"})
    assert status == 201
    assert await owners(broker) == {"127.0.0.1"}


async def test_api_key_creation_rate_is_its_own(make_limited: MakeLimited) -> None:
    broker = await make_limited(max_creations_per_owner=1, api_keys=KEYS)
    bearer = {"Authorization": f"Bearer {AGENT_KEY}"}
    statuses = [(await post_session(broker, headers=bearer, spec=f"r{n}"))[0] for n in range(3)]
    assert statuses == [201, 201, 201]  # 4 per 60 s for the key, 1 per hour for addresses
    await broker.manager.stop((await broker.store.list_owner("key:agents"))[0], "deleted")
    status, headers, body = await post_session(broker, headers=bearer, spec="r9")
    assert status == 201
    status, headers, body = await post_session(broker, headers=bearer, spec="r10")
    assert_refusal(status, headers, body, expect_status=429, reason="creation_rate")
    assert 15 <= int(headers["Retry-After"]) <= 19


def test_api_keys_are_validated_at_start_up() -> None:
    for bad in ("not json", '{"a b": {"key": "0123456789abcdefXX"}}',
                '{"x": {"key": "short"}}', '{"x": {"key_sha256": "zz"}}',
                '{"x": {"key": "0123456789abcdefXX", "max_sessions": -1}}',
                '{"x": {"key": "0123456789abcdefXX", "surprise": 1}}'):
        with pytest.raises(ValidationError):
            Settings(api_keys=bad)
    keys = ApiKeys(KEYS)
    assert keys.match(AGENT_KEY) is not None and keys.match(AGENT_KEY[:-1]) is None
    assert keys.for_owner("key:hashed") is not None and keys.for_owner("127.0.0.1") is None
