"""The reaper: what ends sessions nobody ends explicitly, and what no session owns.

Every ``BROKER_REAP_INTERVAL`` seconds (the first time at start-up) one
replica at a time (a store lock) stops sessions past their max age, idle
ones, spawns whose replica vanished (``spawn_lost``) and ready sessions whose
upstream stopped answering (``upstream_gone``), then lets the backend sweep
servers that no live session owns.

Liveness is not one probe: a session is ``upstream_gone`` only after
``BROKER_REAP_PROBE_FAILURES`` consecutive failed probes spanning at least
``BROKER_REAP_PROBE_WINDOW`` seconds. A probe this replica could not make
("cannot check": EMFILE, its loop starved) never counts, and a sweep where
most probes could not be made gives no verdict. The failure counts live in
this object, i.e. in the memory of the replica that reaps: a probe sequence
means something only from one prober; when the reaper lock moves to another
replica the count restarts, which can delay a verdict but never hasten one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from broker.backends.base import Backend, Liveness, probe
from broker.errors import BrokerError
from broker.models import Clock, Session, Status
from broker.settings import Settings
from broker.store.base import SessionStore

log = logging.getLogger(__name__)

#: Upstream liveness checks the reaper runs at once.
RECONCILE_CONCURRENCY = 16
#: Seconds a pending session may outlive its spawn timeout before the reaper
#: decides the replica that was spawning it is gone.
ORPHAN_GRACE = 30.0


class Reaped(Protocol):
    """What the reaper needs of the session core (:class:`broker.sessions.SessionManager` is
    one): declared here so the reaper, one floor below the core, never imports it."""

    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> SessionStore: ...
    @property
    def backend(self) -> Backend: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def busy_check(self) -> Callable[[Session], Awaitable[bool]] | None: ...

    def spawning(self, session_id: str) -> bool:
        """Whether this replica is spawning the session now."""

    async def stop(self, session: Session, reason: str) -> None:
        """End a session (record, release, stop its server)."""

    async def retry_cleanups(self) -> int:
        """Retry backend cleanups that failed before."""


class Reaper:
    """The sweeps of one replica's :class:`~broker.sessions.SessionManager`."""

    def __init__(self, manager: Reaped) -> None:
        self._manager = manager
        #: session id -> (consecutive failed probes, clock time of the first of them).
        self._probe_failures: dict[str, tuple[int, float]] = {}

    async def reap_once(self) -> int:
        """Stop sessions past max age, idle ones, spawns whose replica vanished,
        and ready sessions whose upstream stopped answering (reconciliation:
        a hub or BinderHub may cull or lose a server without telling anyone);
        then let the backend sweep servers no live session owns."""
        now = self._manager.clock()
        sessions = await self._manager.store.list_live()
        reasons = list(await asyncio.gather(*(self._reap_reason(s, now) for s in sessions)))
        to_probe = [i for i, (s, r) in enumerate(zip(sessions, reasons, strict=True))
                    if not r and s.status is Status.READY]
        checks = asyncio.Semaphore(RECONCILE_CONCURRENCY)

        async def check(session: Session) -> Liveness:
            async with checks:
                return await probe(self._manager.backend, session)

        results = await asyncio.gather(*(check(sessions[i]) for i in to_probe))
        for i, verdict in zip(to_probe, self.verdicts(
                [sessions[i] for i in to_probe], list(results), now), strict=True):
            reasons[i] = verdict
        live_ids = {s.id for s in sessions}
        for session_id in set(self._probe_failures) - live_ids:
            del self._probe_failures[session_id]
        stopped = 0
        for session, reason in zip(sessions, reasons, strict=True):
            if reason:
                await self._manager.stop(session, reason)
                stopped += 1
        sweep = getattr(self._manager.backend, "sweep", None)
        if sweep is not None:  # upstream leftovers no session owns (e.g. hub was down)
            try:
                await sweep(self._manager.store.list_live)
            except (BrokerError, OSError) as exc:
                log.warning("backend sweep skipped: %s", getattr(exc, "message", exc))
        return stopped

    def verdicts(self, sessions: list[Session], results: list[Liveness],
                  now: float) -> list[str]:
        """"upstream_gone" for the sessions whose probes failed often and long enough.

        A sweep where most probes could not be made says more about this
        replica (starved of descriptors, its loop late) than about the
        upstreams: it gives no verdict and leaves every count as it was.
        """
        unknown = sum(r is Liveness.UNKNOWN for r in results)
        if results and unknown * 2 > len(results):
            log.warning("liveness sweep skipped: %d of %d probes could not be made here",
                        unknown, len(results))
            return [""] * len(results)
        needed = self._manager.settings.reap_probe_failures
        window = self._manager.settings.reap_probe_window
        verdicts = []
        for session, result in zip(sessions, results, strict=True):
            verdict = ""
            if result is Liveness.ALIVE:
                self._probe_failures.pop(session.id, None)
            elif result is Liveness.DEAD:
                count, first = self._probe_failures.get(session.id, (0, now))
                count += 1
                self._probe_failures[session.id] = (count, first)
                if count >= needed and now - first >= window:
                    verdict = "upstream_gone"
                else:
                    log.info("session %s: upstream probe failed (%d of %d)", session.id,
                             count, needed)
            verdicts.append(verdict)
        return verdicts

    async def _reap_reason(self, session: Session, now: float) -> str:
        if session.expired(now):
            return "max_age"
        if session.status is Status.PENDING:
            lost = now - session.created_at > self._manager.settings.spawn_deadline + ORPHAN_GRACE
            return "spawn_lost" if lost and not self._manager.spawning(session.id) else ""
        idle = self._manager.settings.session_idle_timeout
        # An unclaimed pool entry is idle by design; BROKER_POOL_MAX_AGE (its expiry) bounds it.
        if idle and not session.pooled and session.status is Status.READY \
                and now - session.last_activity > idle:
            if self._manager.busy_check is not None and await self._manager.busy_check(session):
                await self._manager.store.touch(session.id, now)  # working, just unwatched
                return ""
            return "idle"
        return ""

    async def run(self) -> None:
        """Background loop: reap every ``reap_interval`` seconds until cancelled.

        With several replicas, a store lock lets only one sweep at a time (the
        lock outlives a sweep that hangs, and expires if its replica dies).
        The first sweep runs at start-up, so servers a killed replica left
        behind are stopped (or adopted) before the first interval. Cleanups that
        failed on this replica are retried on every interval, lock or not.
        """
        interval = self._manager.settings.reap_interval
        first = True
        while True:
            if not first:
                await asyncio.sleep(interval)
            first = False
            try:
                await self._manager.retry_cleanups()
                if not await self._manager.store.try_lock("reaper", ttl=max(interval * 2, 60)):
                    continue
                try:
                    await self.reap_once()
                finally:
                    await self._manager.store.release_lock("reaper")
            except BrokerError as exc:  # the store is away: the next sweep tries again
                log.warning("session reaper sweep skipped: %s", exc.message)
            except Exception:
                log.exception("session reaper sweep failed")
