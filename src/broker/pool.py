"""Warm pools: servers started ahead of demand, handed to new sessions at once.

Why (and the herd that a pool alone does not solve): docs/protocols.md#warm-pools-and-herds.

``BROKER_POOL`` names pools by the spec they serve (``default``: sessions
without a spec), each with a MIN and a MAX size. An entry is an ordinary
session record owned by ``pool:<name>`` (:data:`~broker.models.POOL_OWNER_PREFIX`),
spawned through the configured backend by the session core's own spawn
(timeouts, events, cleanup of a failure) and, with BROKER_POOL_WARM_KERNEL,
given its default kernel (the execute API's) before it counts as ready.
Because entries are sessions, the store keeps them across a broker restart
(Redis), the reaper stops them when they die or pass BROKER_POOL_MAX_AGE, and
the backend's sweep does not take their servers for leftovers.

Invariants:

* A claim is one atomic store step (Redis ``LPOP`` of the pool's queue; the
  memory store pops without an await): two claims, on any replicas, never
  get the same entry, and a claimed entry never goes back to a queue.
* A claim hands out only an entry the backend just found alive; a dead one
  is stopped and the next one taken (outcome ``dead``).
* Entries count toward BROKER_MAX_SESSIONS and the spec's cap, not toward
  an owner (:meth:`~broker.policy.limits.AdmissionControl.admit_pool_entry`);
  a refusal there, or the upstream's (hub 429/503, BinderHub quota), backs
  the refill off exponentially.
* Pools of the local backend with a Redis store are per replica (the owner
  and queue carry a replica id): a local server lives beside its broker.
  Other backends' pools are shared, and one replica at a time (a store
  lock) decides how many entries to start.

Size rule: a pool aims at MIN plus the number of its entries claimed over
the last BROKER_POOL_ADAPT_WINDOW seconds, never above MAX. Entries beyond
the aim (the pool shrank, or BROKER_POOL changed) are stopped, oldest first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from broker.backends.base import Liveness, probe
from broker.backoff import Backoff, retry_after_seconds
from broker.errors import BrokerError, UpstreamFailed
from broker.models import (
    DEFAULT_KERNEL_PATH,
    KERNEL_ALIASES,
    POOL_OWNER_PREFIX,
    Session,
    Status,
    hash_token,
    new_session_id,
    new_token,
)
from broker.sessions import SessionManager
from broker.settings import DEFAULT_POOL, parse_pools

log = logging.getLogger(__name__)

#: Longest pause of a refill that keeps being refused or failing.
MAX_BACKOFF = 300.0
#: Seconds the warm kernel may take to start and report idle.
WARM_KERNEL_LIMIT = 60.0
#: Starts a ready entry's default kernel and has it answer once: its (name, id).
WarmKernel = Callable[[Session], Awaitable[tuple[str, str]]]
#: The backend_state key that remembers which pool an entry (and later its session) came from.
POOL_STATE_KEY = "pool"
#: backend_state key: the name of the entry's warm kernel.
KERNEL_STATE_KEY = "pool_kernel"
#: backend_state key: the warm kernel's id (see :meth:`WarmPool.take_warm_kernel`).
KERNEL_ID_KEY = "pool_kernel_id"
#: An entry this close to its BROKER_POOL_MAX_AGE is not handed out (the reaper could
#: stop it under its new owner); it is stopped instead.
EXPIRY_MARGIN = 30.0


@dataclasses.dataclass
class Pool:
    """One configured pool and this replica's view of it."""

    name: str
    minimum: int
    maximum: int
    #: Monotonic times of this pool's recent claims on this replica.
    claims: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    #: Refills of this pool in flight on this replica.
    starting: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    #: No refill before this monotonic time (after a refusal or failure).
    paused_until: float = 0.0
    backoff: float = 0.0
    #: The warm kernel's name, once an entry reported it (claims for another kernel miss).
    kernel: str = ""
    target: int = 0

    @property
    def spec(self) -> str:
        """The spec sessions of this pool ask for."""
        return "" if self.name == DEFAULT_POOL else self.name


class WarmPool:
    """Every configured pool of one replica: claims, refills, hygiene, drain."""

    def __init__(self, manager: SessionManager, *, per_replica: bool,
                 warm_kernel: WarmKernel | None = None) -> None:
        self.manager = manager
        self.settings = manager.settings
        #: Starts an entry's default kernel and has it answer once (BROKER_POOL_WARM_KERNEL;
        #: the agent's kernel client, given by the app: it speaks the kernel protocol).
        self._warm_kernel = warm_kernel
        self.pools = {name: Pool(name, low, high, target=low)
                      for name, (low, high) in parse_pools(self.settings.pool).items()}
        self._by_spec = {pool.spec: pool for pool in self.pools.values()}
        #: Appended to owners and queues of a per-replica pool (local backend + Redis).
        self._replica = uuid.uuid4().hex[:12] if per_replica else ""
        self._wake = asyncio.Event()
        self._refills = asyncio.Semaphore(self.settings.pool_refill_concurrency)
        #: Pauses of a pool's refills after refusals or failures in a row (the backend's
        #: Retry-After, when longer, wins).
        self._backoff = Backoff(start=self.settings.pool_check_interval, cap=MAX_BACKOFF)
        #: Claimed sessions whose warm kernel this replica handed to a client already.
        self._handed: set[str] = set()
        #: Stops of entries discarded at claim time, in flight.
        self._discards: set[asyncio.Task[None]] = set()
        manager.metrics.pools(list(self.pools))

    # -- names ---------------------------------------------------------------------
    def owner(self, pool: Pool) -> str:
        """The owner of the pool's unclaimed entries."""
        suffix = f"@{self._replica}" if self._replica else ""
        return f"{POOL_OWNER_PREFIX}{pool.name}{suffix}"

    def _queue(self, pool: Pool) -> str:
        return self.owner(pool).removeprefix(POOL_OWNER_PREFIX)

    # -- claiming --------------------------------------------------------------------
    async def claim(self, spec: str, kernel_name: str) -> Session | None:
        """Take a live ready entry of ``spec``'s pool for good; None is a miss.

        Entries that ended meanwhile (expired, reaped) are skipped; one whose
        server does not answer is stopped and counted ``dead``.
        """
        pool = self._by_spec.get(spec)
        if pool is None:
            return None
        wanted = KERNEL_ALIASES.get(kernel_name, kernel_name)
        if wanted and self.settings.pool_warm_kernel and wanted != pool.kernel:
            # The warm kernel is another one: this visitor would wait for a kernel anyway.
            self.manager.metrics.pool_claims.labels(pool.name, "miss").inc()
            return None
        store = self.manager.store
        loop = asyncio.get_running_loop()
        while True:
            entry_id = await store.pool_take(self._queue(pool))
            if entry_id is None:
                self.manager.metrics.pool_claims.labels(pool.name, "miss").inc()
                self._wake.set()
                return None
            entry = await store.get(entry_id)
            if entry is None or entry.status is not Status.READY or not entry.pooled:
                continue  # ended since it was queued (max age, reaper): nothing to stop
            if entry.expires_at - self.manager.clock() < EXPIRY_MARGIN:
                # The reaper may be about to stop it: never hand out what it could end.
                self._stop_later(entry, "max_age")
                continue
            if not await self._answers(entry):
                self.manager.metrics.pool_claims.labels(pool.name, "dead").inc()
                log.info("warm pool %s: entry %s is dead; taking the next", pool.name, entry.id)
                self._stop_later(entry, "upstream_gone")
                continue
            self.manager.metrics.pool_claims.labels(pool.name, "hit").inc()
            pool.claims.append(loop.time())
            self._wake.set()
            return entry

    async def _answers(self, entry: Session) -> bool:
        """Whether a claim may hand out this entry: its backend's probe did not find it dead.

        A probe this replica could not make (out of descriptors, a starved loop:
        UNKNOWN) says nothing about the entry, which the reaper checks anyway;
        discarding healthy entries whenever this replica is busy would empty the
        pool exactly when a herd arrives.
        """
        return await probe(self.manager.backend, entry) is not Liveness.DEAD

    def _stop_later(self, entry: Session, reason: str) -> None:
        """Stop a discarded entry without making the claiming visitor wait for it."""
        task = asyncio.create_task(self.manager.stop(entry, reason),
                                   name=f"pool-discard-{entry.id}")
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    # -- refilling ------------------------------------------------------------------
    async def run(self) -> None:
        """Background loop: check every pool every BROKER_POOL_CHECK_INTERVAL, or on a claim."""
        while True:
            try:
                await self.check_once()
            except BrokerError as exc:
                log.warning("warm pool check skipped: %s", exc.message)
            except Exception:
                log.exception("warm pool check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.pool_check_interval)
            self._wake.clear()

    async def check_once(self) -> None:
        """Bring every pool to its aim: start missing entries, stop surplus ones.

        Shared pools are checked by one replica at a time (a store lock), so
        two replicas never both fill the same gap.
        """
        store = self.manager.store
        lock = f"pool-check:{self._replica}"
        if not await store.try_lock(lock, max(30.0, 3 * self.settings.pool_check_interval)):
            return
        try:
            for pool in self.pools.values():
                await self._check_pool(pool)
        finally:
            await store.release_lock(lock)

    async def entries(self, pool: Pool) -> list[Session]:
        """The pool's live entries (ready or starting, on any replica), oldest first."""
        live = await self.manager.store.list_owner(self.owner(pool))
        return sorted(live, key=lambda s: s.created_at)

    def aim(self, pool: Pool) -> int:
        """MIN plus the claims of the last adapt window, at most MAX."""
        horizon = asyncio.get_running_loop().time() - self.settings.pool_adapt_window
        while pool.claims and pool.claims[0] < horizon:
            pool.claims.popleft()
        pool.target = max(pool.minimum, min(pool.maximum, pool.minimum + len(pool.claims)))
        return pool.target

    async def _check_pool(self, pool: Pool) -> None:
        entries = await self.entries(pool)
        ready = [e for e in entries if e.status is Status.READY]
        starting = [e for e in entries if e.status is Status.PENDING]
        metrics = self.manager.metrics
        metrics.pool_entries.labels(pool.name, "ready").set(len(ready))
        metrics.pool_entries.labels(pool.name, "starting").set(len(starting))
        if not pool.kernel:  # e.g. entries started before this replica did
            pool.kernel = next((e.backend_state.get(KERNEL_STATE_KEY, "") for e in ready), "")
        await self._forget_ended(pool)
        aim = self.aim(pool)
        surplus = len(ready) + len(starting) - aim
        for _ in range(max(0, surplus)):
            if not await self._stop_one(pool):
                break
        missing = aim - len(ready) - len(starting)
        loop = asyncio.get_running_loop()
        if missing <= 0 or loop.time() < pool.paused_until:
            return
        room = self.settings.pool_refill_concurrency - len(pool.starting)
        for _ in range(min(missing, room)):
            task = asyncio.create_task(self._refill(pool), name=f"pool-refill-{pool.name}")
            pool.starting.add(task)
            task.add_done_callback(pool.starting.discard)

    async def _forget_ended(self, pool: Pool) -> None:
        """Drop queued ids whose entry ended (they would only be skipped at claim time)."""
        store = self.manager.store
        for entry_id in await store.pool_ids(self._queue(pool)):
            entry = await store.get(entry_id)
            if entry is None or entry.status.terminal:
                await store.pool_remove(self._queue(pool), entry_id)

    async def _stop_one(self, pool: Pool) -> bool:
        """Stop the oldest queued entry (taken atomically: never one being claimed)."""
        entry_id = await self.manager.store.pool_take(self._queue(pool))
        if entry_id is None:
            return False
        entry = await self.manager.store.get(entry_id)
        if entry is not None and entry.pooled and not entry.status.terminal:
            log.info("warm pool %s: stopping surplus entry %s", pool.name, entry.id)
            await self.manager.stop(entry, "pool_surplus")
        return True

    async def _refill(self, pool: Pool) -> None:
        """Start one entry; on refusal or failure pause this pool's refills (backoff)."""
        async with self._refills:
            error = await self._start_entry(pool)
        loop = asyncio.get_running_loop()
        if error is None:
            pool.backoff = 0.0
            self._wake.set()  # the next gap, without waiting for the interval
            return
        refused = error.status in (429, 503) or error.reason in ("quota", "capacity",
                                                                  "spec_capacity")
        reason = "refused" if refused else ("timeout" if error.status == 504 else "failed")
        self.manager.metrics.pool_refill_failures.labels(pool.name, reason).inc()
        pool.backoff = self._backoff.after(pool.backoff)
        wait = max(pool.backoff, retry_after_seconds(error.headers.get("Retry-After")) or 0.0)
        pool.paused_until = loop.time() + wait
        log.warning("warm pool %s: an entry could not be started (%s: %s); next try in %.0f s",
                    pool.name, error.reason, error.message, wait)

    async def _start_entry(self, pool: Pool) -> BrokerError | None:
        manager = self.manager
        now = manager.clock()
        entry = Session(
            id=new_session_id(), token_hash=hash_token(new_token()),  # a token nobody holds
            owner=self.owner(pool), backend=manager.backend.name, created_at=now,
            expires_at=now + self.settings.pool_max_age, last_activity=now, spec=pool.spec,
            backend_state={POOL_STATE_KEY: pool.name}, message="Warming up for the pool")
        try:
            await manager.limiter.admit_pool_entry(entry.id, entry.owner, entry.spec)
        except BrokerError as refusal:
            return refusal
        try:
            await manager.store.create(entry)
        except BaseException:
            await manager.limiter.release(entry)
            raise
        error = await manager.start_pool_entry(entry)
        if error is not None:
            return error
        ready = await manager.store.get(entry.id)
        if ready is None or ready.status is not Status.READY:
            return UpstreamFailed("The pool entry ended while it started")
        if self.settings.pool_warm_kernel and self._warm_kernel is not None:
            try:
                async with asyncio.timeout(WARM_KERNEL_LIMIT):
                    pool.kernel, kernel_id = await self._warm_kernel(ready)
            except (TimeoutError, BrokerError) as exc:
                await manager.stop(ready, "failed")
                return exc if isinstance(exc, BrokerError) else UpstreamFailed(
                    f"The pool entry's kernel did not start ({type(exc).__name__})")
            ready.backend_state.update({KERNEL_STATE_KEY: pool.kernel, KERNEL_ID_KEY: kernel_id})
            await manager.store.save(ready)
        await manager.store.pool_push(self._queue(pool), entry.id)
        log.info("warm pool %s: entry %s is ready", pool.name, entry.id)
        return None

    # -- the warm kernel for clients that start their own -----------------------------
    def take_warm_kernel(self, session: Session, remainder: str, body: bytes) -> str:
        """The warm kernel's id when this kernel start through the proxy may have it, else "".

        Clients such as thebe and ``@jupyterlab/services`` start a kernel of
        their own (``POST api/sessions`` or ``api/kernels``). The first such
        start on a claimed session, for the warm kernel's name (or none), is
        given the warm kernel instead of a new one, so it does not wait for a
        kernel start; later ones start kernels as usual. Once per session on
        each replica: a visitor whose starts reach two replicas may have its
        first start on each share the warm kernel (its own kernel either way).
        """
        kernel_id = session.backend_state.get(KERNEL_ID_KEY, "")
        if not kernel_id or session.pooled or session.id in self._handed:
            return ""
        try:
            data: Any = json.loads(body) if body.strip() else {}
        except ValueError:
            return ""
        if not isinstance(data, dict):
            return ""
        if remainder == "api/sessions":
            if data.get("path") == DEFAULT_KERNEL_PATH:
                return ""  # the execute API's own start: it finds the kernel by itself
            data = data.get("kernel") or {}
            if not isinstance(data, dict) or data.get("id"):
                return ""
        name = data.get("name") or session.kernel_name
        if not isinstance(name, str) or \
                KERNEL_ALIASES.get(name, name) not in ("", session.backend_state.get(
                    KERNEL_STATE_KEY, "")):
            return ""
        if len(self._handed) >= 10_000:
            self._handed.clear()
        self._handed.add(session.id)
        return kernel_id

    # -- views and teardown -----------------------------------------------------------
    async def describe(self) -> list[dict[str, Any]]:
        """Every pool's size, aim and entries (for the admin API)."""
        views = []
        now = self.manager.clock()
        for pool in self.pools.values():
            entries = await self.entries(pool)
            queued = set(await self.manager.store.pool_ids(self._queue(pool)))
            loop = asyncio.get_running_loop()
            views.append({
                "pool": pool.name, "spec": pool.spec, "min": pool.minimum, "max": pool.maximum,
                "target": self.aim(pool), "kernel": pool.kernel,
                "ready": sum(1 for e in entries if e.status is Status.READY and e.id in queued),
                "starting": sum(1 for e in entries if e.status is Status.PENDING),
                "refill_paused_seconds": max(0.0, round(pool.paused_until - loop.time(), 1)),
                "per_replica": bool(self._replica),
                "entries": [{"id": e.id, "status": e.status.value,
                             "age_seconds": round(now - e.created_at, 1),
                             "expires_in_seconds": round(e.expires_at - now, 1)}
                            for e in entries],
            })
        return views

    async def drain(self, *, this_replica_only: bool = False) -> int:
        """Stop every unclaimed entry of every pool, configured or not; how many.

        For uninstalling (``DELETE /api/v1/admin/pools``, ``session-broker
        drain-pools``); with a Redis store it reaches every replica's entries,
        unless ``this_replica_only`` (a per-replica pool at shutdown).
        """
        stopped = 0
        mine = f"@{self._replica}"
        for session in await self.manager.store.list_live():
            if not session.pooled or (this_replica_only and not session.owner.endswith(mine)):
                continue
            queue = session.owner.removeprefix(POOL_OWNER_PREFIX)
            taken = await self.manager.store.pool_remove(queue, session.id)
            if session.status is Status.READY and not taken:
                continue  # being claimed right now: it is a visitor's session already
            await self.manager.stop(session, "pool_surplus")
            stopped += 1
        return stopped

    async def close(self) -> None:
        """Cancel refills in flight (their half-started servers are stopped by the core);
        a per-replica pool stops its entries."""
        tasks = [t for pool in self.pools.values() for t in pool.starting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._discards, return_exceptions=True)
        if self._replica:  # this replica's servers stop with it: so do their entries
            try:
                await self.drain(this_replica_only=True)
            except Exception as exc:
                log.warning("could not stop this replica's pool entries (%s); the reaper "
                            "ends them", type(exc).__name__)
