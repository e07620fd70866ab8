"""A store wrapper that times every operation and counts failures.

Wrapping keeps both stores free of metrics code and guarantees that every
operation, on either store, is measured the same way
(``broker_store_operation_duration_seconds``, ``broker_store_errors_total``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from broker.metrics import Metrics
from broker.models import Session
from broker.store.base import SessionStore

T = TypeVar("T")


class InstrumentedStore:
    """A :class:`~broker.store.base.SessionStore` that reports to :class:`Metrics`."""

    def __init__(self, inner: SessionStore, metrics: Metrics) -> None:
        self.inner = inner
        self._metrics = metrics

    async def _timed(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        try:
            return await call()
        except Exception:
            self._metrics.store_errors.labels(op).inc()
            raise
        finally:
            self._metrics.store_duration.labels(op).observe(time.perf_counter() - start)

    async def create(self, session: Session) -> None:
        await self._timed("create", lambda: self.inner.create(session))

    async def get(self, session_id: str, *, include_expired: bool = False) -> Session | None:
        return await self._timed(
            "get", lambda: self.inner.get(session_id, include_expired=include_expired)
        )

    async def save(self, session: Session) -> None:
        await self._timed("save", lambda: self.inner.save(session))

    async def touch(self, session_id: str, when: float) -> None:
        await self._timed("touch", lambda: self.inner.touch(session_id, when))

    async def add_token_hash(self, session_id: str, token_hash: str, keep: int) -> bool:
        return await self._timed(
            "save", lambda: self.inner.add_token_hash(session_id, token_hash, keep))

    async def delete(self, session_id: str) -> None:
        await self._timed("delete", lambda: self.inner.delete(session_id))

    async def find_reusable(self, reuse_key: str) -> str | None:
        return await self._timed("find_reusable", lambda: self.inner.find_reusable(reuse_key))

    async def list_live(self) -> list[Session]:
        return await self._timed("list_live", self.inner.list_live)

    async def list_owner(self, owner: str) -> list[Session]:
        return await self._timed("list_owner", lambda: self.inner.list_owner(owner))

    async def count_live(self) -> int:
        return await self._timed("count_live", self.inner.count_live)

    async def publish(self, session_id: str, event: dict[str, Any]) -> None:
        await self._timed("publish", lambda: self.inner.publish(session_id, event))

    def subscribe(
        self, session_id: str, *, keepalive: float = 15.0
    ) -> AsyncIterator[dict[str, Any] | None]:
        return self.inner.subscribe(session_id, keepalive=keepalive)

    async def adopt(self, session: Session, previous_owner: str) -> bool:
        return await self._timed("create", lambda: self.inner.adopt(session, previous_owner))

    async def pool_push(self, pool: str, session_id: str) -> None:
        await self._timed("pool", lambda: self.inner.pool_push(pool, session_id))

    async def pool_take(self, pool: str) -> str | None:
        return await self._timed("pool", lambda: self.inner.pool_take(pool))

    async def pool_ids(self, pool: str) -> list[str]:
        return await self._timed("pool", lambda: self.inner.pool_ids(pool))

    async def pool_remove(self, pool: str, session_id: str) -> bool:
        return await self._timed("pool", lambda: self.inner.pool_remove(pool, session_id))

    async def try_lock(self, name: str, ttl: float) -> bool:
        return await self.inner.try_lock(name, ttl)

    async def release_lock(self, name: str) -> None:
        await self.inner.release_lock(name)

    async def announce_end(self, session_id: str, reason: str) -> None:
        await self._timed("announce_end", lambda: self.inner.announce_end(session_id, reason))

    def follow_ends(self) -> AsyncIterator[tuple[str, str] | None]:
        return self.inner.follow_ends()

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Store-specific extras (e.g. RedisStore.redis for locks) pass through.
        return getattr(self.inner, name)
