"""Admission engines: the one atomic step that checks every cluster-wide limit.

Two implementations with identical semantics: :class:`RedisEngine` (a Lua
script, so every replica sharing the Redis enforces one limit exactly) and
:class:`MemoryEngine` (plain dicts, atomic because it never awaits; correct
for a single replica). ``tests/limits/test_engines.py`` runs the same cases
against both.

State, per engine (Redis keys under ``<BROKER_REDIS_PREFIX>lim:``):

=====================  =====================================================
``live``               sorted set: every admitted session id, scored by the
                       lease's end (capacity)
``o:{owner}``          sorted set: one owner's admitted sessions
``p:{subject}``        sorted set: one repository's admitted sessions (only
                       while a per-spec cap applies to it)
``spawn``              sorted set: sessions whose spawn is in progress
``rate:{owner}``       string ``"<tat> <seen>"``: the owner's creation bucket
                       as a GCRA "theoretical arrival time" and the latest
                       ``now`` it saw; expires when the bucket is full again
=====================  =====================================================

Why sorted sets scored by a deadline: a reservation whose release never
comes (a replica killed mid-spawn) stops counting once its deadline passes,
because every admission first drops members whose score is past ``now``.
Admission reserves with a short lease (spawn timeout + grace); a spawn that
reaches ``ready`` extends it to the session's own expiry; every end of a
session releases it. Keys carry TTLs no shorter than their newest lease and
Redis deletes a sorted set when its last member goes, so nothing outlives
the sessions it counts.

``now`` is an argument (from the broker's injected clock), never Redis
``TIME``: limiter tests are deterministic, and replicas agree as far as
their clocks do (NTP). The creation bucket is the generic cell rate
algorithm: one number per owner, exact, with the exact wait until the next
creation would pass. Requests reach the engine in another order than their
``now`` was read (three replicas, or just concurrent handlers), so the
bucket keeps its own clock, the latest ``now`` it has seen: a request
stamped a moment earlier must not find the bucket emptier than it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Slot:
    """What identifies one session's reservations: release and settle need only this."""

    session_id: str
    owner: str
    #: The repository key for per-spec caps ("" when no per-spec cap applies).
    subject: str = ""


@dataclass(frozen=True)
class Ticket:
    """One admission request with every number the engine checks (0 = no limit)."""

    slot: Slot
    now: float
    lease_until: float
    max_total: int = 0
    max_owner: int = 0
    max_subject: int = 0
    max_spawns: int = 0
    #: Creation bucket of ``max_creations`` per ``window`` seconds (0 = off).
    max_creations: int = 0
    window: float = 0.0

    @property
    def interval(self) -> float:
        """Seconds per creation token (GCRA emission interval); 0 when the bucket is off."""
        return self.window / self.max_creations if self.max_creations else 0.0

    @property
    def tolerance(self) -> float:
        """How far ahead of ``now`` the bucket's arrival time may run (burst of N)."""
        return self.interval * (self.max_creations - 1) if self.max_creations else 0.0


@dataclass(frozen=True)
class Decision:
    """An engine's answer: ``reason`` empty when admitted."""

    reason: str = ""
    #: Seconds until the refused request could pass (exact for the rate; 0 otherwise).
    wait: float = 0.0
    #: Creations left in the owner's bucket after this one (-1 when the bucket is off).
    remaining: int = -1
    #: Seconds until the owner's bucket is full again.
    reset: float = 0.0


def _remaining(tat: float, now: float, ticket: Ticket) -> int:
    """Creations still allowed at once when the bucket's arrival time is ``tat``."""
    slack = ticket.tolerance - (tat - now)
    return max(0, math.floor(slack / ticket.interval + 1e-9) + 1) if slack >= -1e-9 else 0


class Engine(Protocol):
    """Where reservations live; both implementations keep the same semantics."""

    async def reserve(self, ticket: Ticket) -> Decision:
        """Check every limit; if all pass, reserve them all at once."""

    async def settle(self, slot: Slot, now: float, until: float | None) -> None:
        """The spawn ended: free its spawn slot; if ``until``, hold the rest until then."""

    async def release(self, slot: Slot) -> None:
        """The session ended: free everything it held (idempotent)."""


# -- memory --------------------------------------------------------------------------------
class MemoryEngine:
    """The single-replica engine: the same sets, in dicts."""

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, float]] = {}
        #: owner -> (arrival time, latest now seen)
        self.rates: dict[str, tuple[float, float]] = {}

    def _count(self, name: str, now: float) -> int:
        members = self.sets.get(name)
        if not members:
            return 0
        for member in [m for m, until in members.items() if until <= now]:
            del members[member]
        if not members:
            del self.sets[name]
        return len(members)

    def _names(self, slot: Slot) -> list[str]:
        names = ["live", f"o:{slot.owner}", "spawn"]
        if slot.subject:
            names.append(f"p:{slot.subject}")
        return names

    def keys(self, now: float) -> list[str]:
        """Every piece of state still held at ``now`` (tests check nothing is left behind)."""
        for name in list(self.sets):
            self._count(name, now)
        for owner in [o for o, (tat, _seen) in self.rates.items() if tat <= now]:
            del self.rates[owner]
        return sorted([*self.sets, *(f"rate:{owner}" for owner in self.rates)])

    async def reserve(self, ticket: Ticket) -> Decision:
        slot, now = ticket.slot, ticket.now
        clock = tat = now  # the bucket's own clock never runs backwards
        if ticket.interval:
            stored, seen = self.rates.get(slot.owner, (now, now))
            clock = max(now, seen)
            tat = max(stored, clock)
            if tat - clock > ticket.tolerance:
                return Decision("creation_rate", tat - ticket.tolerance - clock, 0, tat - clock)
        checks = [(f"o:{slot.owner}", ticket.max_owner, "owner_sessions"),
                  (f"p:{slot.subject}", ticket.max_subject if slot.subject else 0,
                   "spec_capacity"),
                  ("live", ticket.max_total, "capacity"),
                  ("spawn", ticket.max_spawns, "spawn_concurrency")]
        for name, cap, reason in checks:
            if cap and self._count(name, now) >= cap:
                return Decision(reason)
        for name in self._names(slot):
            self.sets.setdefault(name, {})[slot.session_id] = ticket.lease_until
        if not ticket.interval:
            return Decision()
        tat += ticket.interval
        self.rates[slot.owner] = (tat, clock)
        return Decision("", 0.0, _remaining(tat, clock, ticket), tat - clock)

    async def settle(self, slot: Slot, now: float, until: float | None) -> None:
        self._drop("spawn", slot.session_id)
        if until is None:
            return
        for name in self._names(slot):
            members = self.sets.get(name)
            if members is not None and slot.session_id in members:
                members[slot.session_id] = until

    async def release(self, slot: Slot) -> None:
        for name in self._names(slot):
            self._drop(name, slot.session_id)

    def _drop(self, name: str, member: str) -> None:
        members = self.sets.get(name)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self.sets[name]


# -- redis ---------------------------------------------------------------------------------
# KEYS: live, owner, subject, spawn, rate
# ARGV: id, now, lease_until, max_total, max_owner, max_subject, max_spawns, interval,
#       tolerance, use_subject
# Returns {reason, wait, remaining, reset} as strings (Lua numbers would be truncated to
# integers on the way out).
_RESERVE = """
local now = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
local interval = tonumber(ARGV[8])
local tolerance = tonumber(ARGV[9])
local use_subject = ARGV[10] == '1'
local function fmt(x) return string.format('%.6f', x) end
local clock = now
local tat = now
if interval > 0 then
  local stored = redis.call('GET', KEYS[5])
  if stored then
    local space = string.find(stored, ' ')
    clock = math.max(now, tonumber(string.sub(stored, space + 1)))
    tat = math.max(tonumber(string.sub(stored, 1, space - 1)), clock)
  end
  if tat - clock > tolerance then
    return {'creation_rate', fmt(tat - tolerance - clock), '0', fmt(tat - clock)}
  end
end
local checks = {{KEYS[2], tonumber(ARGV[5]), 'owner_sessions'},
                {KEYS[3], use_subject and tonumber(ARGV[6]) or 0, 'spec_capacity'},
                {KEYS[1], tonumber(ARGV[4]), 'capacity'},
                {KEYS[4], tonumber(ARGV[7]), 'spawn_concurrency'}}
for _, check in ipairs(checks) do
  if check[2] > 0 then
    redis.call('ZREMRANGEBYSCORE', check[1], '-inf', now)
    if redis.call('ZCARD', check[1]) >= check[2] then return {check[3], '0', '-1', '0'} end
  end
end
local ttl = math.ceil((lease - now) * 1000) + 1000
local held = {KEYS[1], KEYS[2], KEYS[4]}
if use_subject then held[4] = KEYS[3] end
for _, key in ipairs(held) do
  redis.call('ZADD', key, lease, ARGV[1])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
if interval <= 0 then return {'', '0', '-1', '0'} end
tat = tat + interval
redis.call('SET', KEYS[5], fmt(tat) .. ' ' .. fmt(clock),
           'PX', math.max(1, math.ceil((tat - clock) * 1000)))
return {'', '0', 'remaining', fmt(tat - clock)}
"""

# KEYS: live, owner, subject, spawn   ARGV: id, now, until ('' = spawn failed)
# Only members still present are extended (ZADD XX): a session released while it
# was spawning stays released.
_SETTLE = """
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[3] == '' then return 0 end
local ttl = math.ceil((tonumber(ARGV[3]) - tonumber(ARGV[2])) * 1000) + 1000
for i = 1, 3 do
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', ARGV[3], ARGV[1]) == 1 then
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
return 1
"""

# KEYS: live, owner, subject, spawn   ARGV: id
_RELEASE = """
for i = 1, 4 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""


class RedisEngine:
    """The cluster-wide engine on the store's Redis pool (redis-py asyncio)."""

    def __init__(self, redis: Any, prefix: str = "broker:") -> None:
        self._redis = redis
        self.prefix = f"{prefix}lim:"
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._release = redis.register_script(_RELEASE)

    def _keys(self, slot: Slot) -> list[str]:
        p = self.prefix
        subject = slot.subject or "-"
        return [f"{p}live", f"{p}o:{slot.owner}", f"{p}p:{subject}", f"{p}spawn"]

    async def reserve(self, ticket: Ticket) -> Decision:
        slot = ticket.slot
        reply = await self._reserve(
            keys=[*self._keys(slot), f"{self.prefix}rate:{slot.owner}"],
            args=[slot.session_id, repr(ticket.now), repr(ticket.lease_until),
                  ticket.max_total, ticket.max_owner, ticket.max_subject, ticket.max_spawns,
                  repr(ticket.interval), repr(ticket.tolerance), "1" if slot.subject else "0"],
        )
        reason, wait, remaining, reset = (str(part) for part in reply)
        if remaining == "remaining":  # computed here: the same rounding as the memory engine
            return Decision("", 0.0, _remaining(ticket.now + float(reset), ticket.now, ticket),
                            float(reset))
        return Decision(reason, float(wait), int(remaining), float(reset))

    async def settle(self, slot: Slot, now: float, until: float | None) -> None:
        await self._settle(keys=self._keys(slot),
                           args=[slot.session_id, repr(now), "" if until is None else repr(until)])

    async def release(self, slot: Slot) -> None:
        await self._release(keys=self._keys(slot), args=[slot.session_id])
