"""Federation: several upstreams (JupyterHubs, BinderHubs) behind one :class:`Backend`.

Each member of ``BROKER_UPSTREAMS`` is an ordinary single-upstream backend
(:class:`~broker.backends.jupyterhub.JupyterHubBackend` or
:class:`~broker.backends.binderhub.BinderHubBackend`); this module only
chooses among them, remembers the choice and watches their health, much as
mybinder.org's federation does (docs/protocols.md#federation).

Invariants:

* The member's name is in the first progress event's ``backend_state``
  (``member``), persisted before the member is asked for anything, so any
  replica routes, probes and stops the session through the member that holds
  it (the proxy itself needs nothing: the session's upstream URL is the
  member's).
* A new session goes to a healthy member with a weight above 0 that is not
  full: by smooth weighted round robin (deterministic: weights 3:1 give
  a, a, b, a, ... on one replica), or with ``BROKER_UPSTREAMS_AFFINITY=spec``
  by weighted rendezvous hashing of the spec, so a repository launches where
  its image is warm. The other eligible members follow in order.
* A member that refuses (429, 503), fails the spawn (502) or cannot be
  reached passes the spawn to the next one; what the refusing member had
  started is stopped in the background (bounded). The session manager's
  ``BROKER_SPAWN_TIMEOUT`` bounds the whole walk. When every member refused,
  the last refusal is the session's.
* Health: every ``BROKER_UPSTREAMS_HEALTH_INTERVAL`` each member is asked
  ``GET /hub/api/`` (hub) or ``/versions`` (BinderHub); one failure takes it
  out of the rotation until a check passes (so is a spawn that found it
  unreachable). While a member is down, each of its ready sessions whose
  server no longer answers ends at once as ``upstream_down``: its clients get
  the reason (WebSocket close reason, REST 404 ``session_ended``) instead
  of waiting for the reaper's repeated probes. Sessions whose servers still
  answer (a hub restarting without stopping its servers) keep working.
* Per-member counts come from the store every interval plus the placements
  this replica made since, so ``max_sessions`` may be overshot by what
  other replicas placed within one interval (documented).
* Member names are configured, at most 32 of them: the ``member`` metric
  label stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import aiohttp

from broker.backends import binderhub, jupyterhub
from broker.backends.base import (
    Backend,
    BackendContext,
    Liveness,
    LostCallback,
    probe,
    probe_server,
)
from broker.errors import BrokerError, RateLimited, Unavailable, UpstreamFailed
from broker.metrics import Metrics
from broker.models import Clock, ProgressEvent, Session, Status, system_clock
from broker.upstreams import UpstreamMember, parse_upstreams

if TYPE_CHECKING:
    from broker.upstream.session import UpstreamAccess

log = logging.getLogger(__name__)

#: Seconds a background stop of a refused attempt may take.
_ATTEMPT_CLEANUP_LIMIT = 60.0
#: Retry-After when every member is full.
FULL_RETRY_AFTER = 60
#: What a client reads when its session ended because its member went down.
DOWN_MESSAGE = "The upstream serving this session went down; start a new session"

LiveSessions = Callable[[], Awaitable[list[Session]]]


@dataclasses.dataclass(eq=False)
class Member:
    """One upstream and what this replica knows about it."""

    config: UpstreamMember
    backend: Backend
    #: The last health check passed (members start up: the first check runs at start).
    up: bool = True
    #: Clock time of the last health check (0: none yet).
    checked_at: float = 0.0
    #: Live sessions in the store at the last count.
    live: int = 0
    #: Sessions this replica placed here that the last count did not see yet (by id,
    #: with when they were placed): counted on top of ``live``.
    placed: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Smooth weighted round robin's running weight.
    current: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sessions(self) -> int:
        """Live sessions as this replica knows them: the last count plus its own since."""
        return self.live + len(self.placed)

    @property
    def full(self) -> bool:
        limit = self.config.max_sessions
        return bool(limit) and self.sessions >= limit


def _passes_on(exc: BaseException) -> bool:
    """Whether a spawn failing with ``exc`` should be tried on the next member."""
    return isinstance(exc, RateLimited | Unavailable | UpstreamFailed | aiohttp.ClientError
                      | OSError)


def rendezvous_score(name: str, key: str, weight: int) -> float:
    """Weighted rendezvous (highest random weight) score of a member for a key."""
    digest = hashlib.sha256(f"{name}\0{key}".encode()).digest()
    unit = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 2)  # in (0, 1)
    return weight / -math.log(unit)


class FederationBackend:
    """A :class:`~broker.backends.base.Backend` spreading sessions over member backends."""

    name = "federation"

    def __init__(
        self,
        members: list[tuple[UpstreamMember, Backend]],
        http: aiohttp.ClientSession,
        upstream: UpstreamAccess,
        *,
        interval: float = 10.0,
        timeout: float = 10.0,
        affinity: str = "weight",
        clock: Clock = system_clock,
    ) -> None:
        self._members = [Member(config, backend) for config, backend in members]
        self._by_name = {m.name: m for m in self._members}
        self._http = http  # the members' health URLs
        self._upstream = upstream  # sessions' servers (a session no member claims)
        self._interval = interval
        self._timeout = timeout
        self._affinity = affinity
        self._clock = clock
        self._on_lost: LostCallback | None = None
        #: The store's live sessions (set by :meth:`attach`); counts and member-down ends.
        self._live_sessions: LiveSessions | None = None
        self._metrics: Metrics | None = None
        self._cleanups: set[asyncio.Task[Any]] = set()

    # -- wiring -----------------------------------------------------------------------
    @property
    def on_lost(self) -> LostCallback | None:
        return self._on_lost

    @on_lost.setter
    def on_lost(self, callback: LostCallback | None) -> None:
        self._on_lost = callback
        for member in self._members:
            member.backend.on_lost = callback

    @property
    def members(self) -> list[Member]:
        return list(self._members)

    def attach(self, live_sessions: LiveSessions, metrics: Metrics) -> None:
        """Give the federation the store's live sessions and the app's metrics."""
        self._live_sessions = live_sessions
        self._metrics = metrics
        metrics.add_members([m.name for m in self._members])
        for member in self._members:
            metrics.upstream_up.labels(member.name).set(1 if member.up else 0)

    def member_of(self, session: Session) -> Member | None:
        """The member holding a session: by the stored name, else (a session from before
        the federation was configured) the first member of the session's backend kind."""
        name = session.backend_state.get("member")
        if name is not None:
            return self._by_name.get(name)
        return next((m for m in self._members if m.config.backend == session.backend), None)

    # -- choosing -----------------------------------------------------------------------
    def order(self, session: Session) -> list[Member]:
        """The members to try for a new session, best first; raises when there is none."""
        eligible = [m for m in self._members if m.up and m.config.weight > 0 and not m.full]
        if not eligible:
            if any(m.up and m.config.weight > 0 for m in self._members):
                raise Unavailable("Every upstream is full; try again in a few minutes",
                                  reason="capacity", retry_after=FULL_RETRY_AFTER)
            raise Unavailable("No upstream is available right now; try again shortly",
                              reason="upstream_unreachable",
                              retry_after=max(1, math.ceil(self._interval)))
        if self._affinity == "spec" and session.spec:
            return sorted(eligible, key=lambda m: rendezvous_score(
                m.name, session.spec, m.config.weight), reverse=True)
        total = sum(m.config.weight for m in eligible)
        for member in eligible:
            member.current += member.config.weight
        first = max(eligible, key=lambda m: m.current)
        first.current -= total
        rest = sorted((m for m in eligible if m is not first),
                      key=lambda m: (-m.config.weight, m.name))
        return [first, *rest]

    # -- spawning -----------------------------------------------------------------------
    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        last: BaseException | None = None
        for attempt, member in enumerate(self.order(session)):
            if attempt:
                yield ProgressEvent("launching", "Trying another upstream")
            state: dict[str, str] = {"member": member.name}
            member.placed[session.id] = self._clock()
            first, ready = True, False
            try:
                # Every backend's spawn is an async generator: closed here, not left to GC.
                spawn = cast(AsyncGenerator[ProgressEvent, None], member.backend.spawn(session))
                async with contextlib.aclosing(spawn) as events:
                    async for event in events:
                        state.update(event.backend_state)
                        if first or event.backend_state:
                            event = dataclasses.replace(event, backend_state=dict(state))
                            first = False
                        if event.phase == "ready":
                            # Counted first: the manager closes this generator at "ready".
                            self._count(member, "ready")
                            ready = True
                        yield event
                        if ready:
                            return
            except BaseException as exc:
                if not _passes_on(exc) or ready:
                    if not ready:  # cancelled or stopped: the session is not placed here
                        member.placed.pop(session.id, None)
                    raise
                last = exc
            member.placed.pop(session.id, None)
            refused = isinstance(last, RateLimited | Unavailable) and getattr(
                last, "reason", "") != "upstream_unreachable"
            self._count(member, "refused" if refused else "failed")
            if not refused and self._unreachable(last):
                self._set_up(member, False)
            log.warning("session %s: upstream %s %s (%s); trying the next one", session.id,
                        member.name, "refused" if refused else "failed",
                        getattr(last, "message", type(last).__name__))
            self._stop_later(member, dataclasses.replace(session, backend_state=dict(state)))
        if isinstance(last, BrokerError):
            raise last
        raise UpstreamFailed("No upstream could start the server") from last

    @staticmethod
    def _unreachable(exc: BaseException | None) -> bool:
        return (isinstance(exc, aiohttp.ClientConnectionError | OSError)
                or getattr(exc, "reason", "") == "upstream_unreachable")

    def _stop_later(self, member: Member, attempt: Session) -> None:
        """Stop what a refused attempt started, without holding up the next attempt."""
        async def stop() -> None:
            try:
                await asyncio.wait_for(member.backend.stop(attempt), _ATTEMPT_CLEANUP_LIMIT)
            except Exception as exc:  # the member's sweep removes it later
                log.warning("could not stop session %s's attempt on %s: %s", attempt.id,
                            member.name, getattr(exc, "message", type(exc).__name__))

        task = asyncio.create_task(stop(), name=f"attempt-cleanup-{attempt.id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _count(self, member: Member, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_spawns.labels(member.name, outcome).inc()

    # -- the session's member -------------------------------------------------------------
    async def stop(self, session: Session) -> None:
        member = self.member_of(session)
        if member is None:
            if "member" in session.backend_state:
                log.error("session %s is on upstream %r, which is no longer configured: its "
                          "server cannot be stopped from here", session.id,
                          session.backend_state["member"])
            return  # no member was asked for anything
        await member.backend.stop(session)

    async def is_alive(self, session: Session) -> bool:
        return await self.probe(session) is Liveness.ALIVE

    async def probe(self, session: Session) -> Liveness:
        member = self.member_of(session)
        if member is None:
            return await probe_server(self._upstream, session.upstream_url,
                                      session.upstream_token, self._timeout)
        return await probe(member.backend, session)

    async def sweep(self, live_sessions: LiveSessions) -> int:
        """Each healthy member sweeps what no live session of its own owns."""
        removed = 0
        for member in self._members:
            sweep = getattr(member.backend, "sweep", None)
            if sweep is None or not member.up:
                continue

            async def mine(member: Member = member) -> list[Session]:
                return [s for s in await live_sessions() if self.member_of(s) is member]

            try:
                removed += await sweep(mine)
            except Exception as exc:
                log.warning("sweep of upstream %s skipped: %s", member.name,
                            getattr(exc, "message", type(exc).__name__))
        return removed

    async def health(self) -> None:
        if not any(m.up for m in self._members):
            raise RuntimeError("no upstream member passed its last health check")

    async def close(self) -> None:
        """Finish the background stops of refused attempts; then the members'."""
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        for member in self._members:
            await member.backend.close()

    # -- health ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Check every member every interval, forever (until cancelled)."""
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("upstream health round failed")
            await asyncio.sleep(self._interval)

    async def check_once(self) -> None:
        """One round: health of every member, session counts, and member-down ends."""
        await asyncio.gather(*(self._check(m) for m in self._members))
        if self._live_sessions is None:
            return
        sessions = await self._live_sessions()
        counts = {m.name: 0 for m in self._members}
        for session in sessions:
            member = self.member_of(session)
            if member is not None and not session.status.terminal:
                counts[member.name] += 1
        seen = {s.id for s in sessions if self.member_of(s) is not None}  # counted above
        # A placement the store has not shown within two intervals has ended meanwhile.
        forget = self._clock() - 2 * self._interval
        for member in self._members:
            member.live = counts[member.name]
            member.placed = {sid: at for sid, at in member.placed.items()
                             if sid not in seen and at > forget}
            if self._metrics is not None:
                self._metrics.upstream_sessions.labels(member.name).set(member.live)
        down = [s for s in sessions if s.status is Status.READY
                and (m := self.member_of(s)) is not None and not m.up]
        await asyncio.gather(*(self._end_if_gone(s) for s in down))

    async def _check(self, member: Member) -> None:
        try:
            async with self._http.get(member.config.health_url(), allow_redirects=False,
                                      timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                up = resp.status == 200
                detail = f"HTTP {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            up, detail = False, type(exc).__name__
        member.checked_at = self._clock()
        if up != member.up:
            log.log(logging.INFO if up else logging.WARNING, "upstream %s is %s (%s)",
                    member.name, "up again" if up else "down", detail)
        self._set_up(member, up)

    def _set_up(self, member: Member, up: bool) -> None:
        member.up = up
        if self._metrics is not None:
            self._metrics.upstream_up.labels(member.name).set(1 if up else 0)

    async def _end_if_gone(self, session: Session) -> None:
        """End a session of a member that is down, once its own server stopped answering."""
        if await self.probe(session) is not Liveness.DEAD or self._on_lost is None:
            return
        member = self.member_of(session)
        log.warning("session %s ends: upstream %s is down and its server does not answer",
                    session.id, member.name if member else "?")
        await self._on_lost(session.id, DOWN_MESSAGE, "upstream_down")

    def snapshot(self) -> list[dict[str, Any]]:
        """The members as the admin API shows them: health, sessions and share."""
        total = sum(m.sessions for m in self._members)
        now = self._clock()
        return [{
            "name": m.name,
            "backend": m.config.backend,
            "weight": m.config.weight,
            "healthy": m.up,
            "checked_seconds_ago": round(now - m.checked_at, 1) if m.checked_at else None,
            "sessions": m.sessions,
            "share": round(m.sessions / total, 3) if total else 0.0,
            "max_sessions": m.config.max_sessions,
            "full": m.full,
        } for m in self._members]


def member_backend(member: UpstreamMember, context: BackendContext) -> Backend:
    """The hub backend serving one BROKER_UPSTREAMS member (members are hubs: they
    carry the hub settings, so they are not drawn from the registry)."""
    if member.backend == "jupyterhub":
        return jupyterhub.configured(member, context)
    return binderhub.configured(member, context)


def create(context: BackendContext) -> FederationBackend:
    """The federation of the BROKER_UPSTREAMS members (chosen by that setting, not by
    BROKER_BACKEND; see :func:`broker.backends.registry.backend_factory`)."""
    settings = context.settings
    members = parse_upstreams(settings.upstreams.get_secret_value())
    interval = settings.upstreams_health_interval
    backend = FederationBackend(
        [(m, member_backend(m, context)) for m in members], context.http, context.upstream,
        # A check may take the interval, at least 5 s (a busy hub is slow, not down).
        interval=interval, timeout=min(settings.upstream_timeout, max(interval, 5.0)),
        affinity=settings.upstreams_affinity, clock=context.clock)
    if context.live_sessions is not None and context.metrics is not None:
        backend.attach(context.live_sessions, context.metrics)
    return backend
