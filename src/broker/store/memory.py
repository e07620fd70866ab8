"""In-process session store: the embedded default when BROKER_REDIS_URL is empty.

Same semantics as :class:`~broker.store.redis.RedisStore` for one replica.
Sessions are kept as serialised records (through the same cipher as Redis)
rather than live objects, so callers can never mutate stored state by
accident and both stores behave identically.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from broker.models import Clock, Session, Status, system_clock
from broker.store.base import EXPIRY_GRACE, FINAL_PHASES, MAX_EVENTS, TERMINAL_RETENTION
from broker.store.crypto import TokenCipher


class MemoryStore:
    """A dict-backed :class:`~broker.store.base.SessionStore`."""

    def __init__(self, cipher: TokenCipher | None = None, clock: Clock = system_clock) -> None:
        self._cipher = cipher or TokenCipher()
        self._clock = clock
        self._records: dict[str, dict[str, str]] = {}
        # When each record is forgotten: max age + EXPIRY_GRACE while live,
        # TERMINAL_RETENTION after it ended (the TTLs of the Redis store).
        self._retain_until: dict[str, float] = {}
        self._reuse: dict[str, str] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        # Set (and replaced) whenever a session's events change or it goes away.
        self._changed: dict[str, asyncio.Event] = {}
        self._locks: dict[str, float] = {}
        self._pools: dict[str, list[str]] = {}

    def _exists(self, session_id: str) -> bool:
        """Whether the record is still kept; forgets it once its retention has passed."""
        if session_id not in self._records:
            return False
        if self._clock() >= self._retain_until[session_id]:
            self._forget(session_id)
            return False
        return True

    def _load(self, session_id: str) -> Session | None:
        if not self._exists(session_id):
            return None
        return Session.from_record(self._records[session_id], self._cipher.decrypt)

    def _wake(self, session_id: str) -> None:
        changed = self._changed.pop(session_id, None)
        if changed is not None:
            changed.set()

    def _forget(self, session_id: str) -> None:
        self._records.pop(session_id, None)
        self._retain_until.pop(session_id, None)
        self._events.pop(session_id, None)
        self._wake(session_id)  # subscribers end rather than wait for a keepalive
        for key in [k for k, v in self._reuse.items() if v == session_id]:
            del self._reuse[key]

    async def create(self, session: Session) -> None:
        self._records[session.id] = session.to_record(self._cipher.encrypt)
        self._retain_until[session.id] = (
            max(session.expires_at, self._clock()) + EXPIRY_GRACE
        )
        self._reuse[session.reuse_key] = session.id

    async def get(self, session_id: str, *, include_expired: bool = False) -> Session | None:
        session = self._load(session_id)
        if session is None:
            return None
        if not include_expired and not session.status.terminal and session.expired(self._clock()):
            return None
        return session

    async def save(self, session: Session) -> None:
        current = self._load(session.id)
        if current is None:
            return
        if current.status.terminal and not session.status.terminal:
            return  # a stale copy must not revive an ended session
        self._records[session.id] = session.to_record(self._cipher.encrypt)
        if session.status.terminal:
            self._retain_until[session.id] = self._clock() + TERMINAL_RETENTION
            if self._reuse.get(session.reuse_key) == session.id:
                del self._reuse[session.reuse_key]

    async def touch(self, session_id: str, when: float) -> None:
        if self._exists(session_id):
            self._records[session_id]["last_activity"] = str(when)

    async def add_token_hash(self, session_id: str, token_hash: str, keep: int) -> bool:
        # No await between the read and the write: atomic on the event loop.
        if not self._exists(session_id):
            return False
        record = self._records[session_id]
        if record.get("status") != "ready":
            return False
        hashes = json.loads(record.get("extra_token_hashes") or "[]")
        if len(hashes) >= keep:
            return False  # full: never drop a hash, an issued token must keep working
        record["extra_token_hashes"] = json.dumps([*hashes, token_hash])
        return True

    async def delete(self, session_id: str) -> None:
        self._forget(session_id)

    async def find_reusable(self, reuse_key: str) -> str | None:
        session_id = self._reuse.get(reuse_key)
        if session_id is None:
            return None
        session = await self.get(session_id)
        if session is None or session.status.terminal:
            return None
        return session_id

    def _live(self) -> list[Session]:
        sessions = (self._load(sid) for sid in list(self._records))
        return [s for s in sessions if s is not None and not s.status.terminal]

    async def list_live(self) -> list[Session]:
        return self._live()

    async def list_owner(self, owner: str) -> list[Session]:
        now = self._clock()
        return [s for s in self._live() if s.owner == owner and not s.expired(now)]

    async def count_live(self) -> int:
        now = self._clock()
        return sum(1 for s in self._live() if not s.expired(now))

    async def publish(self, session_id: str, event: dict[str, Any]) -> None:
        if not self._exists(session_id):
            return
        events = self._events.setdefault(session_id, [])
        # Past the cap only final events are kept: subscribers index into the
        # list, so it must only ever grow.
        if len(events) >= MAX_EVENTS and event.get("phase") not in FINAL_PHASES:
            return
        events.append(dict(event))
        self._wake(session_id)

    async def subscribe(
        self, session_id: str, *, keepalive: float = 15.0
    ) -> AsyncIterator[dict[str, Any] | None]:
        seen = 0
        while self._exists(session_id):
            events = self._events.get(session_id, [])
            if seen < len(events):
                event = events[seen]
                seen += 1
                yield dict(event)
                if event.get("phase") in FINAL_PHASES:
                    return
                continue
            # No await between the check above and taking the event: a publish
            # cannot slip in unnoticed.
            changed = self._changed.setdefault(session_id, asyncio.Event())
            try:
                await asyncio.wait_for(changed.wait(), keepalive)
            except TimeoutError:
                if self._exists(session_id):
                    yield None

    async def adopt(self, session: Session, previous_owner: str) -> bool:
        # No await between the check and the write; owners are not indexed here.
        current = self._load(session.id)
        if current is None or current.status is not Status.READY \
                or current.owner != previous_owner:
            return False
        await self.create(session)
        return True

    async def pool_push(self, pool: str, session_id: str) -> None:
        self._pools.setdefault(pool, []).append(session_id)

    async def pool_take(self, pool: str) -> str | None:
        # No await between the check and the pop: atomic on the event loop.
        queue = self._pools.get(pool)
        return queue.pop(0) if queue else None

    async def pool_ids(self, pool: str) -> list[str]:
        return list(self._pools.get(pool, ()))

    async def pool_remove(self, pool: str, session_id: str) -> bool:
        queue = self._pools.get(pool, [])
        if session_id not in queue:
            return False
        queue.remove(session_id)
        return True

    async def try_lock(self, name: str, ttl: float) -> bool:
        # One process is one replica: the lock only has to expire like Redis's.
        until = self._locks.get(name)
        if until is not None and self._clock() < until:
            return False
        self._locks[name] = self._clock() + ttl
        return True

    async def release_lock(self, name: str) -> None:
        self._locks.pop(name, None)

    async def announce_end(self, session_id: str, reason: str) -> None:
        return None  # one process, one replica: its own stop closed its connections

    async def follow_ends(self) -> AsyncIterator[tuple[str, str] | None]:
        yield None
        await asyncio.Future()  # nothing else ever comes; ends when cancelled

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        for session_id in list(self._records):
            self._forget(session_id)
