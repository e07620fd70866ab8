"""Extra broker tokens for cookie-proven /build reuse: model, both stores, and minting.

The broker token is shown once and only hashes are stored. A /build reuse
proven by the visitor cookie mints a fresh token for the live session and
appends its hash (at most ``MAX_EXTRA_TOKENS``, none ever dropped); these
tests check that hashes survive both stores, that no token is ever stored,
that a full session refuses another token instead of forgetting one, and
that minting refuses sessions that are not ready.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from broker.backends.local import LocalBackend
from broker.models import (
    MAX_EXTRA_TOKENS,
    Session,
    Status,
    hash_token,
    new_session_id,
    new_token,
)
from broker.sessions import SessionManager, SessionRequest
from broker.settings import Settings
from broker.store.base import SessionStore
from broker.store.redis import RedisStore
from broker.upstream.session import UpstreamAccess
from tests.conftest import ManualClock


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> SessionStore:
    fixture: SessionStore = request.getfixturevalue(f"{request.param}_store")
    return fixture


def make_session(clock: ManualClock, **fields: Any) -> Session:
    values: dict[str, Any] = {
        "id": new_session_id(), "token_hash": hash_token(new_token()), "owner": "203.0.113.7",
        "backend": "local", "created_at": clock(), "expires_at": clock() + 600,
        "spec": "gh/o/r/HEAD", "status": Status.READY, "upstream_url": "http://127.0.0.1:1/",
    }
    values.update(fields)
    return Session(**values)


@pytest.fixture
async def manager(store: SessionStore, clock: ManualClock,
                  tmp_path: Any) -> AsyncIterator[SessionManager]:
    backend = LocalBackend(UpstreamAccess(), root_dir=str(tmp_path))
    yield SessionManager(Settings(), store, backend, clock=clock)
    await backend.close()


def test_extra_tokens_open_the_session_and_none_is_ever_forgotten() -> None:
    first = new_token()
    session = make_session(ManualClock(), token_hash=hash_token(first))
    minted = [new_token() for _ in range(MAX_EXTRA_TOKENS + 1)]
    added = [session.add_token_hash(hash_token(token)) for token in minted]
    assert added == [True] * MAX_EXTRA_TOKENS + [False]
    assert session.tokens_full
    assert len(session.extra_token_hashes) == MAX_EXTRA_TOKENS
    assert session.token_matches(first)
    assert all(session.token_matches(t) for t in minted[:-1])
    assert not session.token_matches(minted[-1])  # refused, never issued
    assert not session.token_matches(new_token())
    assert "extra_token_hashes" not in repr(session)


async def test_a_full_session_refuses_another_token_in_both_stores(
    manager: SessionManager, store: SessionStore, clock: ManualClock
) -> None:
    first = new_token()
    session = make_session(clock, token_hash=hash_token(first))
    await store.create(session)
    issued = [await manager.issue_token(session.id) for _ in range(MAX_EXTRA_TOKENS)]
    assert None not in issued
    assert await manager.issue_token(session.id) is None
    for token in [first, *issued]:
        assert token is not None
        assert (await manager.authenticate(session.id, token)).id == session.id


def test_visitor_narrows_reuse_and_leaves_existing_keys_unchanged() -> None:
    clock = ManualClock()
    plain = make_session(clock)
    material = json.dumps([plain.owner, plain.spec, plain.profile, plain.kernel_name])
    assert plain.reuse_key == hashlib.sha256(material.encode()).hexdigest()[:32]
    book = dataclasses.replace(plain, visitor="build:aaa")
    other = dataclasses.replace(plain, visitor="build:bbb")
    assert len({plain.reuse_key, book.reuse_key, other.reuse_key}) == 3


async def test_stores_round_trip_visitor_and_extra_hashes(
    store: SessionStore, clock: ManualClock
) -> None:
    session = make_session(clock, visitor="build:abc")
    await store.create(session)
    stored = await store.get(session.id)
    assert stored is not None
    token = new_token()
    stored.add_token_hash(hash_token(token))
    await store.save(stored)
    again = await store.get(session.id)
    assert again is not None
    assert again == stored
    assert again.visitor == "build:abc"
    assert again.token_matches(token)
    assert await store.find_reusable(session.reuse_key) == session.id


async def test_redis_keeps_only_hashes_of_minted_tokens(
    redis_store: RedisStore, redis_url: str, clock: ManualClock, tmp_path: Any
) -> None:
    session = make_session(clock)
    await redis_store.create(session)
    backend = LocalBackend(UpstreamAccess(), root_dir=str(tmp_path))
    manager = SessionManager(Settings(), redis_store, backend, clock=clock)
    token = await manager.issue_token(session.id)
    assert token is not None
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        record = await raw.hgetall(f"{redis_store.prefix}s:{session.id}")
    finally:
        await raw.aclose()
    assert json.loads(record["extra_token_hashes"]) == [hash_token(token)]
    assert token not in json.dumps(record)


async def test_issue_token_only_for_ready_sessions(
    manager: SessionManager, store: SessionStore, clock: ManualClock
) -> None:
    pending = make_session(clock, status=Status.PENDING)
    ready = make_session(clock)
    await store.create(pending)
    await store.create(ready)
    assert await manager.issue_token(pending.id) is None
    assert await manager.issue_token("no-such-session") is None

    token = await manager.issue_token(ready.id)
    assert token is not None
    assert (await manager.authenticate(ready.id, token)).id == ready.id

    stopped = await store.get(ready.id)
    assert stopped is not None
    stopped.status = Status.STOPPED
    await store.save(stopped)
    assert await manager.issue_token(ready.id) is None


async def test_native_reuse_still_requires_the_token(
    manager: SessionManager, store: SessionStore, clock: ManualClock
) -> None:
    """Only /build (launch) reuses by identity; create() without a token never does."""
    request = SessionRequest(owner="203.0.113.7", spec="gh/o/r/HEAD", visitor="build:x")
    session = make_session(clock, visitor="build:x", status=Status.PENDING)
    await store.create(session)
    found, token, reused = await manager.launch(request)
    assert (found.id, token, reused) == (session.id, None, True)
    created, new, reused_native = await manager.create(request, None)
    assert created.id != session.id and new and not reused_native
    await manager.stop(created, "test")


async def test_launch_does_not_hand_out_a_full_session(
    manager: SessionManager, store: SessionStore, clock: ManualClock
) -> None:
    """A cookie-proven relaunch of a session with no token left starts a new session."""
    full = make_session(clock, visitor="build:x",
                        extra_token_hashes=[hash_token(new_token())
                                            for _ in range(MAX_EXTRA_TOKENS)])
    await store.create(full)
    request = SessionRequest(owner=full.owner, spec=full.spec, visitor="build:x")
    created, token, reused = await manager.launch(request)
    assert created.id != full.id and token and not reused
    await manager.stop(created, "test")
    left = await store.get(full.id)  # left alone (not probed, not stopped): its tokens work
    assert left is not None and left.status is Status.READY
