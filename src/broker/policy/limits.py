"""Admission control: turn settings into one atomic check per session creation.

Where it sits: :class:`~broker.sessions.SessionManager` calls :meth:`AdmissionControl.admit`
after it ruled out reuse (reusing a live session never counts against a
rate or a cap) and before anything is stored or spawned; it releases the
reservation wherever a session ends (stop, failed spawn, upstream lost,
reaper) and settles it when a spawn finishes. The engine
(:mod:`broker.policy.engines`) does the checking; this module decides the
numbers (settings, API-key overrides, per-spec patterns) and turns a refusal
into the error a client sees.

Limits checked in one step, each with its own reason:

==================  ======  =================================================
reason              status  limit
==================  ======  =================================================
creation_rate       429     BROKER_MAX_CREATIONS_PER_OWNER per
                            BROKER_CREATION_WINDOW (token bucket per owner)
owner_sessions      429     BROKER_MAX_SESSIONS_PER_OWNER live sessions
spec_capacity       503     BROKER_MAX_SESSIONS_PER_SPEC / BROKER_SPEC_QUOTAS
                            live sessions per repository
capacity            503     BROKER_MAX_SESSIONS live sessions in total
spawn_concurrency   429     BROKER_MAX_CONCURRENT_SPAWNS spawns in progress
==================  ======  =================================================

Every refusal carries ``Retry-After``. Waits that are not exactly known
(capacity frees when someone else's session ends) get a base value; every
value is spread upwards by up to :data:`JITTER` so clients refused together
do not return together, and never below the exact wait. A creation-rate
answer (refusal or success) also carries ``X-RateLimit-Limit``,
``-Remaining`` and ``-Reset`` (epoch seconds when the bucket is full again,
as BinderHub and GitHub send it).

Why the owner (not owner + Origin) is the key: ``Origin`` is whatever a
non-browser client wants it to be, so keying on it would let one address
multiply its quota; Origin still separates visitors for ``/build`` reuse.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.errors import BrokerError, RateLimited, Unavailable
from broker.models import Clock, Session, system_clock
from broker.policy.apikeys import ApiKeys
from broker.policy.engines import Decision, Engine, MemoryEngine, RedisEngine, Slot, Ticket
from broker.settings import Settings, parse_spec_quotas

#: Seconds a pending reservation outlives its spawn deadline (queue wait + BROKER_SPAWN_TIMEOUT)
#: before it stops counting (the reaper's own grace for spawns whose replica vanished).
LEASE_GRACE = 30.0
#: Retry-After values are spread upwards by up to this fraction.
JITTER = 0.25
#: Base Retry-After, in seconds, for refusals whose real wait nobody knows.
RETRY_BASE = {"owner_sessions": 60.0, "spec_capacity": 30.0, "capacity": 30.0,
              "spawn_concurrency": 5.0}


def spec_subject(spec: str) -> str:
    """The repository a spec names, without its ref: what per-spec caps count.

    ``gh/o/r/main`` and ``gh/o/r/HEAD`` are one repository (as in BinderHub's
    per-repo quota); specs of other shapes count as a whole.
    """
    provider, _, rest = spec.partition("/")
    if provider in ("gh", "gist"):
        parts = rest.split("/")
        if len(parts) >= 2 and all(parts[:2]):
            return f"{provider}/{parts[0]}/{parts[1]}"
    elif provider in ("gl", "git"):
        head, sep, _ref = rest.partition("/")
        if sep and head:
            return f"{provider}/{head}"
    return spec


@dataclass(frozen=True)
class Admission:
    """A granted admission: what to release later, and headers for the client."""

    slot: Slot
    headers: dict[str, str] = field(default_factory=dict)


class AdmissionControl:
    """Cluster-wide admission for session creations (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        clock: Clock = system_clock,
        api_keys: ApiKeys | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.api_keys = api_keys if api_keys is not None else ApiKeys(
            settings.api_keys.get_secret_value())
        self._rng = rng
        self._quotas = parse_spec_quotas(settings.spec_quotas)

    @classmethod
    def for_store(cls, settings: Settings, store: Any, clock: Clock = system_clock,
                  api_keys: ApiKeys | None = None) -> AdmissionControl:
        """Redis engine on the store's own pool when the store is Redis, else memory."""
        redis = getattr(store, "redis", None)
        engine: Engine
        if redis is not None:
            engine = RedisEngine(redis, getattr(store, "prefix", settings.redis_prefix))
        else:
            engine = MemoryEngine()
        return cls(settings, engine, clock=clock, api_keys=api_keys)

    # -- the numbers -----------------------------------------------------------------------
    def spec_cap(self, spec: str) -> int:
        """Live sessions allowed per repository for this spec (0 = unlimited)."""
        for pattern, cap in self._quotas:
            if fnmatch.fnmatchcase(spec, pattern):
                return cap
        return self.settings.max_sessions_per_spec

    def slot(self, session_id: str, owner: str, spec: str) -> Slot:
        """The reservation keys of a session (the same at admission and at release)."""
        subject = ""
        if spec and self.spec_cap(spec):
            subject = hashlib.sha256(spec_subject(spec).encode()).hexdigest()[:24]
        return Slot(session_id, owner, subject)

    def ticket(self, session_id: str, owner: str, spec: str) -> Ticket:
        """Every limit that applies to this owner and spec, right now."""
        s = self.settings
        key = self.api_keys.for_owner(owner)
        max_owner, max_creations, window = (
            s.max_sessions_per_owner, s.max_creations_per_owner, s.creation_window)
        if key is not None:
            max_owner = s.max_sessions_per_owner if key.max_sessions is None else key.max_sessions
            if key.max_creations is not None:
                max_creations = key.max_creations
            if key.creation_window is not None:
                window = key.creation_window
        now = self.clock()
        return Ticket(
            slot=self.slot(session_id, owner, spec), now=now,
            lease_until=now + s.spawn_deadline + LEASE_GRACE,
            max_total=s.max_sessions, max_owner=max_owner, max_subject=self.spec_cap(spec),
            max_spawns=s.max_concurrent_spawns, max_creations=max_creations, window=window)

    # -- the steps ---------------------------------------------------------------------------
    async def admit(self, session_id: str, owner: str, spec: str) -> Admission:
        """Reserve every limit for a new session at once, or raise the refusal."""
        ticket = self.ticket(session_id, owner, spec)
        decision = await self.engine.reserve(ticket)
        if decision.reason:
            raise self.refusal(decision, ticket, spec)
        return Admission(ticket.slot, self._rate_headers(decision, ticket))

    async def admit_pool_entry(self, session_id: str, owner: str, spec: str) -> Admission:
        """Reserve a warm pool entry: the global and per-spec caps only, no owner's limits.

        Pool entries count toward BROKER_MAX_SESSIONS (and the spec's cap) like
        any session, but belong to nobody until claimed.
        """
        s = self.settings
        now = self.clock()
        ticket = Ticket(slot=self.slot(session_id, owner, spec), now=now,
                        lease_until=now + s.spawn_timeout + LEASE_GRACE,
                        max_total=s.max_sessions, max_subject=self.spec_cap(spec))
        decision = await self.engine.reserve(ticket)
        if decision.reason:
            raise self.refusal(decision, ticket, spec)
        return Admission(ticket.slot, {})

    async def hand_over(self, entry: Session, claimed: Session, admission: Admission) -> None:
        """A claimed pool entry becomes ``claimed`` (same id, the visitor as owner).

        ``admission`` was made for the request under another id and checked the
        owner's limits; its reservation is given back, the pool's reservation of
        the entry too, and the entry is reserved for its new owner, unchecked
        (already admitted), until its new expiry.
        """
        await self.engine.release(admission.slot)
        await self.engine.release(self.slot(entry.id, entry.owner, entry.spec))
        now = self.clock()
        slot = self.slot(claimed.id, claimed.owner, claimed.spec)
        await self.engine.reserve(Ticket(slot=slot, now=now, lease_until=claimed.expires_at))
        await self.engine.settle(slot, now, claimed.expires_at)

    async def spawn_finished(self, session: Session, ready: bool) -> None:
        """Free the spawn slot; a ready session holds its other slots until it expires."""
        await self.engine.settle(self.slot(session.id, session.owner, session.spec),
                                 self.clock(), session.expires_at if ready else None)

    async def release(self, session: Session) -> None:
        """A session ended: give back everything it held."""
        await self.engine.release(self.slot(session.id, session.owner, session.spec))

    # -- what the client sees ----------------------------------------------------------------
    def retry_after(self, seconds: float) -> int:
        """Whole seconds, never below ``seconds``, spread upwards by up to JITTER."""
        return max(1, math.ceil(seconds * (1.0 + JITTER * self._rng())))

    def _rate_headers(self, decision: Decision, ticket: Ticket) -> dict[str, str]:
        if not ticket.max_creations:
            return {}
        return {"X-RateLimit-Limit": str(ticket.max_creations),
                "X-RateLimit-Remaining": str(max(0, decision.remaining)),
                "X-RateLimit-Reset": str(math.ceil(ticket.now + decision.reset))}

    def refusal(self, decision: Decision, ticket: Ticket, spec: str) -> BrokerError:
        """The error a refused admission becomes (status, reason, message, headers)."""
        reason = decision.reason
        wait = decision.wait if reason == "creation_rate" else RETRY_BASE.get(reason, 30.0)
        retry = self.retry_after(wait)
        error: BrokerError
        if reason == "creation_rate":
            window = _duration(ticket.window)
            error = RateLimited(
                f"Rate limit exceeded: {ticket.max_creations} new sessions per {window}. "
                f"Try again in {retry} seconds.", reason=reason)
            error.headers.update(self._rate_headers(decision, ticket))
        elif reason == "owner_sessions":
            error = RateLimited(f"You already have {ticket.max_owner} live sessions; "
                                "stop one or reuse it.", reason=reason)
        elif reason == "spawn_concurrency":
            error = RateLimited("Too many sessions are starting right now. "
                                f"Try again in {retry} seconds.", reason=reason)
        elif reason == "spec_capacity":
            error = Unavailable(f"Too many users running {spec_subject(spec)}! "
                                "Try again soon.", reason=reason)
        else:
            error = Unavailable("The broker is at capacity; try again soon.", reason="capacity")
        error.headers["Retry-After"] = str(retry)
        return error


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return "hour" if hours == 1 else f"{hours} hours"
    if seconds % 60 == 0:
        minutes = int(seconds // 60)
        return "minute" if minutes == 1 else f"{minutes} minutes"
    return f"{seconds:g} seconds"
