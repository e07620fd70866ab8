"""The session store protocol shared by the Redis and in-memory stores.

Invariants both implementations keep (and ``tests/store/test_conformance.py``
checks against both):

* ``get`` never returns a session past ``expires_at`` unless asked to
  (``include_expired=True``, which the reaper uses to stop such sessions).
* A session in a terminal state (failed/stopped) leaves the live, owner and
  reuse indexes at once but stays readable for ``TERMINAL_RETENTION``
  seconds, so a client can still learn why its session ended. It never
  returns to a live status: ``save`` of a stale live copy is ignored.
* A live session's record is kept ``EXPIRY_GRACE`` seconds past its max age.
* ``save``, ``touch`` and ``publish`` on a deleted (or forgotten) session do
  nothing: a late write never resurrects it.
* The reuse index maps (owner, spec) to at most one session id.
* Progress events are kept per session in order; ``subscribe`` replays them
  from the start and then follows new ones, yielding ``None`` every
  ``keepalive`` seconds of silence so callers can keep connections alive.
  A subscription ends after a final phase, at once for an unknown session,
  and without a further keepalive when its session is deleted (Redis notices
  within ``min(keepalive, 4 s)``). At most ``MAX_EVENTS`` events are kept;
  the final one is never dropped.
* A session end announced on any replica reaches every replica's
  ``follow_ends`` (Redis pub/sub; the memory store serves one process, whose
  own stop already closed its connections, so it announces nothing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from broker.models import Session

#: Seconds a failed/stopped session stays readable after it ended.
TERMINAL_RETENTION = 3600.0
#: Extra seconds a live session's record outlives its max age, so the reaper
#: can still read what it needs to stop the upstream server.
EXPIRY_GRACE = 3600.0
#: Progress events kept per session (spawns emit a few dozen at most).
MAX_EVENTS = 500
#: Event phases after which a spawn's event stream ends.
FINAL_PHASES = frozenset({"ready", "failed", "stopped"})


class SessionStore(Protocol):
    """Where sessions live between requests (and between replicas)."""

    async def create(self, session: Session) -> None:
        """Store a new session and index it by owner and reuse key."""

    async def get(self, session_id: str, *, include_expired: bool = False) -> Session | None:
        """The session, or None if unknown or (unless asked) past its max age."""

    async def save(self, session: Session) -> None:
        """Persist changed fields (status, upstream, message); terminal states leave indexes.

        Does nothing if the session is gone, or if it already ended and
        ``session`` is a live (stale) copy.
        """

    async def touch(self, session_id: str, when: float) -> None:
        """Record kernel activity (last_activity) without rewriting the session."""

    async def add_token_hash(self, session_id: str, token_hash: str, keep: int) -> bool:
        """Atomically append a token hash to a *ready* session holding fewer than ``keep``.

        False when the session is gone, not ready, or already holds ``keep``
        extra hashes; a hash is never dropped, so every issued token keeps
        working. Atomic so that tokens minted at once on several replicas are
        all kept and the bound holds across them.
        """

    async def delete(self, session_id: str) -> None:
        """Forget a session entirely, with its indexes and events."""

    async def find_reusable(self, reuse_key: str) -> str | None:
        """The id of a live session with this reuse key, if any."""

    async def list_live(self) -> list[Session]:
        """Every non-terminal session, expired ones included (for the reaper and admin)."""

    async def list_owner(self, owner: str) -> list[Session]:
        """Live, unexpired sessions of one owner."""

    async def count_live(self) -> int:
        """Number of non-terminal, unexpired sessions across all replicas."""

    async def publish(self, session_id: str, event: dict[str, Any]) -> None:
        """Append a progress event to the session's event log."""

    def subscribe(
        self, session_id: str, *, keepalive: float = 15.0
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Replay and follow a session's events until a final phase."""

    async def adopt(self, session: Session, previous_owner: str) -> bool:
        """Rebind a ready session of ``previous_owner`` to a new owner, atomically.

        For a claimed warm pool entry: writes ``session`` as :meth:`create`
        does (record, expiry, owner and reuse indexes) and drops it from
        ``previous_owner``'s index. False, and nothing written, when the
        stored session is gone, not ready, or no longer ``previous_owner``'s.
        """

    async def pool_push(self, pool: str, session_id: str) -> None:
        """Append a ready entry's id to a warm pool's queue."""

    async def pool_take(self, pool: str) -> str | None:
        """Remove and return the oldest id of a pool's queue in one atomic step.

        Two callers, on any replicas, never get the same id; None when empty.
        """

    async def pool_ids(self, pool: str) -> list[str]:
        """The ids queued in a pool, oldest first (entries may have ended since)."""

    async def pool_remove(self, pool: str, session_id: str) -> bool:
        """Take one id out of a pool's queue; False if it was not there (someone took it)."""

    async def try_lock(self, name: str, ttl: float) -> bool:
        """Take a cluster-wide lock for ``ttl`` seconds unless another holder has it.

        Holders are store instances (one per replica). The lock expires by
        itself, so a replica that dies while holding it blocks no one for long.
        """

    async def release_lock(self, name: str) -> None:
        """Release a lock this store instance holds (no-op otherwise)."""

    async def announce_end(self, session_id: str, reason: str) -> None:
        """Tell every replica that a session ended, so each closes its connections."""

    def follow_ends(self) -> AsyncIterator[tuple[str, str] | None]:
        """Ends announced by any replica as (session id, reason), until cancelled.

        None means "(re)subscribed: ends announced before now may have been
        missed"; the caller checks the sessions it holds connections for.
        """

    async def ping(self) -> None:
        """Raise if the store cannot be used right now (for /ready)."""

    async def close(self) -> None:
        """Release connections."""
