"""The session core: create or reuse, spawn, authenticate, stop, reap.

Every client surface (native API, Jupyter proxy, ``/build``, the agent API)
goes through :class:`SessionManager`, so reuse, limits, expiry and cleanup
behave the same whichever door a visitor came in by.

Invariants:

* A session's broker token is returned exactly once, at creation; afterwards
  only its hash exists. Reuse therefore requires proof: the client presents
  a token the session was issued (as thebe's saved sessions do:
  docs/protocols.md#thebe-and-myst-pages), or, on the
  ``/build`` door (:meth:`SessionManager.launch`), the visitor secret the
  broker itself issued (its cookie); then a fresh token is minted for the
  live session and only its hash is stored beside the first. An address or
  Origin alone is never proof: people behind one NAT share them.
* A session is only handed back for reuse after the upstream itself said it
  is alive; a dead one is stopped and replaced.
* A spawn first waits for a slot of this replica's spawn queue
  (:mod:`broker.spawnqueue`, at most ``spawn_queue_timeout``, announcing its
  place in line as ``waiting`` events); a queued session whose every client
  on this replica went away leaves the line and ends as ``abandoned``.
* A spawn always ends in ``ready`` or ``failed`` within ``spawn_timeout`` of
  leaving the queue, and a failed or abandoned spawn is cleaned up on the backend. The failure
  is recorded and announced *before* that cleanup runs (a frozen hub must
  not delay the answer); the cleanup is bounded (``BROKER_CLEANUP_TIMEOUT``)
  and, if it fails, retried on every reaper interval until it succeeds.
* A store outage never kills a spawn silently: its outcome is saved with
  bounded retries once the store answers again; a spawn whose replica died
  is ended by the reaper (``spawn_lost``).
* A ready session is stopped as ``upstream_gone`` only after several failed
  probes over a minimum time, never for a probe this replica could not make
  (:mod:`broker.reaper`).
* A new session exists only after :class:`~broker.policy.limits.AdmissionControl`
  reserved every cluster-wide limit for it in one atomic step; a refusal
  leaves nothing behind, and every way a session ends (stop, failed spawn,
  upstream lost, reaper) releases its reservation. Reuse is decided first,
  so reusing a live session never counts against a rate or a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from broker.backends.base import Backend
from broker.backoff import Backoff, retry
from broker.errors import (
    BrokerError,
    Forbidden,
    NotFound,
    SpawnQueueTimeout,
    SpawnTimeout,
    Unauthorized,
    Unavailable,
    UpstreamFailed,
)
from broker.metrics import FAILURE_REASONS, REFUSAL_REASONS, Metrics, label_or_other
from broker.models import (
    MAX_EXTRA_TOKENS,
    Clock,
    ProgressEvent,
    Session,
    Status,
    hash_token,
    new_session_id,
    new_token,
    system_clock,
)
from broker.policy.limits import Admission, AdmissionControl
from broker.reaper import ORPHAN_GRACE, Reaper
from broker.settings import Settings
from broker.spawnqueue import Kind, QueueProgress, SpawnQueue, auto_slots
from broker.store.base import FINAL_PHASES, SessionStore
from broker.store.redis import store_unavailable

log = logging.getLogger(__name__)
#: Seconds between activity writes for one session from one replica.
ACTIVITY_EVERY = 5.0

#: Closes one open client connection of a session: (close code, reason).
Closer = Callable[[int, str], Awaitable[None]]
#: Seconds a ready session is served from this replica's memory (see ready_session).
READY_CACHE_SECONDS = 2.0
_READY_CACHE_SIZE = 10_000
#: Pauses between attempts to record a spawn's outcome while the store is away.
_RECORD_BACKOFF = Backoff(start=0.25, cap=5.0)

T = TypeVar("T")


def _store_away(exc: BaseException) -> bool:
    """A store outage (a failover, say), which passes; any other error is an answer."""
    return isinstance(exc, Unavailable) and exc.reason == "store_unavailable"


def _forget_in(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    """A done callback: drop the task from ``tasks`` and mark its exception as seen
    (whoever awaited it already handled it; one that was shielded away logged its own)."""

    def forget(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return forget


class PoolClaims(Protocol):
    """What the core needs of the warm pool (:class:`broker.pool.WarmPool`)."""

    async def claim(self, spec: str, kernel_name: str) -> Session | None:
        """A live, ready entry taken from the spec's pool for good, or None (a miss)."""


@dataclass(frozen=True)
class SessionRequest:
    """What a client asked for; (owner, spec, profile, kernel) identify reuse."""

    owner: str
    spec: str = ""
    profile: str = ""
    kernel_name: str = ""
    #: Narrows reuse below the owner (the /build door: a hash of Origin/cookie).
    visitor: str = ""


class SessionManager:
    """Owns the lifecycle of sessions across the store and the backend."""

    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        backend: Backend,
        *,
        clock: Clock = system_clock,
        metrics: Metrics | None = None,
        limiter: AdmissionControl | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(backend.name)
        self.store = store
        self.backend = backend
        self.clock = clock
        #: Cluster-wide admission (Redis engine when the store is Redis).
        self.limiter = limiter or AdmissionControl.for_store(settings, store, clock)
        self._spawns: dict[str, asyncio.Task[BrokerError | None]] = {}
        self._closers: dict[str, set[Closer]] = {}
        self._no_connections = asyncio.Event()
        #: session id -> (valid until, monotonic clock; session) for ready_session().
        self._ready_cache: dict[str, tuple[float, Session]] = {}
        self._no_connections.set()
        self._background: set[asyncio.Task[Any]] = set()
        #: session id -> when this replica last wrote its activity (see note_activity).
        self._touched: dict[str, float] = {}
        #: Store reads in flight for ready_session, shared by concurrent requests.
        self._reads: dict[str, asyncio.Future[Session | None]] = {}
        #: Asks the upstream whether a session's kernels are executing (set by the app).
        self.busy_check: Callable[[Session], Awaitable[bool]] | None = None
        #: Sessions whose backend cleanup failed or timed out: retried every reap interval.
        self._cleanups: dict[str, Session] = {}
        #: The warm pool new sessions are claimed from (set by the app when BROKER_POOL is).
        self.pool: PoolClaims | None = None
        self.reaper = Reaper(self)
        #: Spawn slots of this replica: visitors' spawns here, the warm pool's refills too.
        self.spawn_queue = SpawnQueue(
            settings.spawn_slots or auto_slots(backend.name),
            pool_share=settings.pool_spawn_share, timeout=settings.spawn_queue_timeout,
            metrics=self.metrics)
        #: Sessions whose spawn waits in the queue on this replica.
        self._queued: set[str] = set()
        #: session id -> clients following its launch on this replica (see following()).
        self._followers: dict[str, int] = {}
        #: Sessions (id@created_at) whose first execute_reply this replica measured.
        self._replied: set[str] = set()

    # -- creation and reuse --------------------------------------------------------
    async def create(
        self,
        request: SessionRequest,
        presented_token: str | None = None,
        *,
        on_admitted: Callable[[Admission], None] | None = None,
    ) -> tuple[Session, str, bool]:
        """Reuse the owner's live session for the same spec, or start a new one.

        Returns (session, broker token, reused). ``on_admitted`` receives the
        admission of a new session (its rate-limit headers for the client).
        """
        if presented_token:
            reused = await self._reusable(request, presented_token)
            if reused is not None:
                self.metrics.creations.labels("reused", "none").inc()
                return reused, presented_token, True
        session_id = new_session_id()
        try:
            with store_unavailable():  # the Redis admission engine shares the store's Redis
                admission = await self.limiter.admit(session_id, request.owner, request.spec)
        except BrokerError as refusal:
            if refusal.reason == "store_unavailable":
                raise  # not a limit's refusal: no refusal metric
            reason = label_or_other(refusal.reason, REFUSAL_REASONS, "rate_limited")
            self.metrics.creations.labels("refused", reason).inc()
            self.metrics.limit_refused(refusal.reason)
            raise
        if on_admitted is not None:
            on_admitted(admission)
        token = new_token()
        if self.pool is not None and not request.profile:
            claimed = await self._claim(request, token, admission)
            if claimed is not None:
                return claimed, token, False
        now = self.clock()
        session = Session(
            id=session_id,
            token_hash=hash_token(token),
            owner=request.owner,
            backend=self.backend.name,
            created_at=now,
            expires_at=now + self.settings.session_max_age,
            last_activity=now,
            spec=request.spec,
            profile=request.profile,
            kernel_name=request.kernel_name,
            visitor=request.visitor,
            message="Waiting to launch",
        )
        try:
            await self.store.create(session)
            await self.store.publish(session.id, {"phase": "waiting", "message": session.message})
        except BaseException:
            # Never a half-created session: no record left live, no slot kept.
            await self._abandon(session)
            raise
        self.metrics.creations.labels("created", "none").inc()
        task = asyncio.create_task(self._spawn(session), name=f"spawn-{session.id}")
        self._spawns[session.id] = task
        task.add_done_callback(lambda _task: self._spawns.pop(session.id, None))
        log.info("session %s created for %s (spec %r)", session.id, session.owner, session.spec)
        return session, token, False

    async def _claim(self, request: SessionRequest, token: str,
                     admission: Admission) -> Session | None:
        """Hand a warm pool entry to this request as a new session, or None (a miss).

        The entry keeps its id and server; it gets the new token, owner and
        reuse key, and its max age counts from now. The admission made for
        the request moves onto it (:meth:`AdmissionControl.hand_over`).
        """
        assert self.pool is not None
        while True:
            try:
                with store_unavailable():
                    entry = await self.pool.claim(request.spec, request.kernel_name)
                    if entry is None:
                        return None
                    now = self.clock()
                    claimed = dataclasses.replace(
                        entry, token_hash=hash_token(token), owner=request.owner,
                        created_at=now, expires_at=now + self.settings.session_max_age,
                        last_activity=now, profile=request.profile,
                        kernel_name=request.kernel_name, visitor=request.visitor,
                        extra_token_hashes=[], message="Ready: a warm server from the pool",
                        backend_state=dict(entry.backend_state))
                    # Only a still-ready entry of its pool is rebound: one the reaper or a
                    # drain ended a moment ago is not revived.
                    if await self.store.adopt(claimed, entry.owner):
                        break
            except BaseException:
                await self._release_admission(admission)
                raise
        try:
            await self.limiter.hand_over(entry, claimed, admission)
        except Exception:
            # Only the counting is off until the leases expire; the session itself is fine.
            log.exception("could not move the limits of pool entry %s to its session",
                          claimed.id)
        self.metrics.creations.labels("created", "none").inc()
        log.info("session %s (warm pool entry) claimed by %s (spec %r)", claimed.id,
                 claimed.owner, claimed.spec)
        return claimed

    async def _release_admission(self, admission: Admission) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(self.limiter.engine.release(admission.slot))

    async def start_pool_entry(self, entry: Session) -> BrokerError | None:
        """Spawn a warm pool entry (stored and admitted by the pool) until ready.

        The same spawn as a session's (timeouts, events, cleanup of a failure,
        the reaper's view of a spawn in progress); returns the failure, None
        when the entry is ready.
        """
        task = asyncio.create_task(self._spawn(entry, "pool"), name=f"pool-spawn-{entry.id}")
        self._spawns[entry.id] = task
        task.add_done_callback(lambda _task: self._spawns.pop(entry.id, None))
        return await task

    async def _reusable(self, request: SessionRequest, token: str | None) -> Session | None:
        """The live session this request may reuse, after the upstream confirmed it.

        With ``token``: the owner's live session for the same spec, profile and
        kernel that the token opens, whichever door issued it (a ``/build``
        token recovers its session through the native API too). ``token``
        None means the caller vouches for the visitor itself (:meth:`launch`,
        with a secret the broker issued): the session with the same reuse key,
        unless it cannot take another token (then the visitor gets a new one).
        """
        if token is not None:
            session = await self._opened_by_token(request, token)
        else:
            session = await self._by_reuse_key(request)
            if session is not None and session.tokens_full:
                log.info("session %s has issued its last token; %s gets a new session",
                         session.id, request.owner)
                return None
        if session is None:
            return None
        if session.status is Status.PENDING:
            return session
        if session.status is Status.READY and await self.backend.is_alive(session):
            log.info("session %s reused by %s", session.id, session.owner)
            return session
        log.info("session %s is no longer alive upstream; replacing it", session.id)
        await self.stop(session, "upstream_gone")
        return None

    async def _by_reuse_key(self, request: SessionRequest) -> Session | None:
        """The live session the store's reuse index names for this request, if any."""
        probe = Session(id="", token_hash="", owner=request.owner, backend="", created_at=0,
                        expires_at=0, spec=request.spec, profile=request.profile,
                        kernel_name=request.kernel_name, visitor=request.visitor)
        session_id = await self.store.find_reusable(probe.reuse_key)
        return None if session_id is None else await self.store.get(session_id)

    async def _opened_by_token(self, request: SessionRequest, token: str) -> Session | None:
        """The owner's live session for this request that ``token`` opens, if any.

        The reuse index names only the owner's newest session for a request,
        and a ``/build`` session's key carries its visitor; a token of another
        one is found among the owner's live sessions (few: the per-owner cap).
        """
        session = await self._by_reuse_key(request)
        if session is not None and session.token_matches(token):
            return session
        wanted = (request.spec, request.profile, request.kernel_name)
        for candidate in await self.store.list_owner(request.owner):
            if (candidate.spec, candidate.profile, candidate.kernel_name) == wanted \
                    and not candidate.status.terminal and candidate.token_matches(token):
                return candidate
        return None

    async def launch(self, request: SessionRequest) -> tuple[Session, str | None, bool]:
        """The ``/build`` door with a visitor secret instead of a token: reuse, or create.

        Returns (session, token, reused). A reused session comes back without
        a token: once it is ready, :meth:`issue_token` mints one for this
        visit. Only call this when ``request.visitor`` carries a secret the
        broker issued to this visitor alone (its visitor cookie): an address
        or an Origin is shared by everyone behind one NAT.
        """
        reused = await self._reusable(request, None)
        if reused is not None:
            log.info("session %s reused by %s through /build", reused.id, reused.owner)
            return reused, None, True
        session, token, _ = await self.create(request)
        return session, token, False

    async def issue_token(self, session_id: str) -> str | None:
        """Mint one more broker token for a ready session; None if it is not ready or full.

        Only ready sessions get extra tokens: after ``ready`` nothing but a
        terminal transition rewrites the record, so the spawn cannot overwrite
        the new hash with its older copy. The store appends the hash
        atomically and refuses beyond :data:`MAX_EXTRA_TOKENS` (never dropping
        one, so every token issued stays valid), so tokens minted at the same
        moment on several replicas all work.
        """
        token = new_token()
        if not await self.store.add_token_hash(session_id, hash_token(token), MAX_EXTRA_TOKENS):
            return None
        self._ready_cache.pop(session_id, None)
        return token

    async def _abandon(self, session: Session) -> None:
        """Undo a creation that failed before its spawn started (store trouble)."""
        session.status = Status.FAILED
        self._ready_cache.pop(session.id, None)
        session.ended_reason = "internal"
        with contextlib.suppress(Exception):
            await self.store.save(session)
        await self._release(session)

    async def _settle(self, session: Session, *, ready: bool) -> None:
        """The spawn ended: free its spawn slot; a ready session keeps the rest until expiry."""
        try:
            await asyncio.shield(self.limiter.spawn_finished(session, ready=ready))
        except Exception:
            log.exception("could not settle the limits held by session %s", session.id)

    async def _release(self, session: Session) -> None:
        """Give back a session's admission slots; a failure only delays their lease expiry."""
        try:
            await asyncio.shield(self.limiter.release(session))
        except Exception:
            log.exception("could not release the limits held by session %s", session.id)

    # -- spawning ------------------------------------------------------------------------
    async def _spawn(self, session: Session, kind: Kind = "visitor") -> BrokerError | None:
        """Wait for a spawn slot (announcing the place in line), then spawn.

        ``kind="pool"``: a warm-pool refill, which waits behind every visitor
        and within its share of the slots (:mod:`broker.spawnqueue`). Returns
        the failure (None: ready).
        """
        self._queued.add(session.id)
        try:
            async with self.spawn_queue.slot(
                    kind, on_progress=lambda where: self._announce(session, where)):
                self._queued.discard(session.id)
                return await self._spawn_in_slot(session)
        except SpawnQueueTimeout as error:
            self._queued.discard(session.id)  # out of the line: nothing left to abandon
            await self._fail(session, error)
            await self._settle(session, ready=False)
            return error
        except asyncio.CancelledError:
            if session.id in self._queued:  # never started: only the admission to undo
                await self._settle(session, ready=False)
            raise
        finally:
            self._queued.discard(session.id)

    async def _announce(self, session: Session, where: QueueProgress) -> None:
        """Tell the session's clients its place in the spawn queue (best effort)."""
        with contextlib.suppress(Unavailable):  # a store outage must not cost the place
            await self.store.publish(session.id, where.event())

    @contextlib.contextmanager
    def following(self, session_id: str) -> Iterator[None]:
        """Count one client waiting on this session's launch (POST ?wait, /build, events).

        When the last one leaves while the spawn still waits for a slot, nobody
        is left to use the server: the session leaves the queue and ends as
        ``abandoned``. A session nobody followed (POST without ``wait``, to be
        polled later) is never abandoned; once its spawn runs it is not either.
        """
        self._followers[session_id] = self._followers.get(session_id, 0) + 1
        try:
            yield
        finally:
            left = self._followers[session_id] - 1
            if left:
                self._followers[session_id] = left
            else:
                del self._followers[session_id]
                if session_id in self._queued:
                    task = asyncio.create_task(self._abandon_queued(session_id))
                    self._background.add(task)
                    task.add_done_callback(_forget_in(self._background))

    async def _abandon_queued(self, session_id: str) -> None:
        try:
            session = await self.store.get(session_id)
        except BrokerError as exc:
            log.warning("could not end queued session %s whose clients left: %s", session_id,
                        exc.message)
            return
        # Checked again after the read: the spawn may have got its slot, or a client
        # come back, meanwhile (stop() cancels the spawn before its first await).
        if session is not None and session.status is Status.PENDING \
                and session_id in self._queued and session_id not in self._followers:
            log.info("session %s: its clients left while it waited for a spawn slot",
                     session_id)
            await self.stop(session, "abandoned")

    async def _spawn_in_slot(self, session: Session) -> BrokerError | None:
        """Run a session's spawn to ready or failure; returns the failure (None: ready)."""
        backend = self.backend.name
        started = asyncio.get_running_loop().time()
        outcome = "failure"
        failure: BrokerError | None = None
        self.metrics.spawns_in_progress.labels(backend).inc()
        try:
            await self._spawn_steps(session)
            outcome = "success"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except SpawnTimeout as exc:
            outcome = "timeout"
            failure = exc
        except BrokerError as exc:
            failure = exc
        except Exception:  # a task nobody awaits must not end with an unretrieved exception
            log.exception("spawn of session %s ended unexpectedly", session.id)
            failure = UpstreamFailed("The server could not be started")
        finally:
            self.metrics.spawns_in_progress.labels(backend).dec()
            elapsed = asyncio.get_running_loop().time() - started
            self.metrics.spawn_duration.labels(backend, outcome).observe(elapsed)
            if outcome != "success":  # a ready spawn settled before it said so (_apply)
                await self._settle(session, ready=False)
            if outcome in ("failure", "timeout"):
                # Last: the failure is recorded and announced (_fail), and measured,
                # before the cleanup may wait on the upstream that failed.
                await self._cleanup_backend(session)
        return failure

    async def _spawn_steps(self, session: Session) -> None:
        """Run the backend's spawn; failures are recorded and re-raised for timing."""
        try:
            async with asyncio.timeout(self.settings.spawn_timeout):
                async for event in self.backend.spawn(session):
                    await self._apply(session, event)
                    if event.phase == "ready":
                        break
                else:
                    raise UpstreamFailed("The backend finished without a ready server")
        except asyncio.CancelledError:
            await self._cleanup_backend(session)
            raise
        except TimeoutError:
            error: BrokerError = SpawnTimeout(
                f"The server did not start within {self.settings.spawn_timeout:g} s"
            )
            await self._fail(session, error)
            raise error from None
        except BrokerError as exc:
            await self._fail(session, exc)
            raise
        except Exception as exc:
            log.exception("spawn of session %s failed", session.id)
            error = UpstreamFailed("The server could not be started")
            await self._fail(session, error)
            raise error from exc

    async def _apply(self, session: Session, event: ProgressEvent) -> None:
        if event.backend_state:
            session.backend_state.update(event.backend_state)
        session.message = event.message
        if event.phase == "ready":
            session.status = Status.READY
            session.upstream_url = event.upstream_url
            session.upstream_token = event.upstream_token
            session.last_activity = self.clock()
        # A store outage pauses the spawn here (bounded by the spawn timeout) rather
        # than failing a server that is starting fine.
        limit = self.settings.spawn_timeout
        current = await self._persist(
            lambda: self.store.get(session.id, include_expired=True), limit)
        if current is None or current.status.terminal:
            # Deleted while spawning (maybe on another replica): undo the spawn.
            await self._cleanup_backend(session)
            raise asyncio.CancelledError
        await self._persist(lambda: self.store.save(session), limit)
        if event.phase == "ready":
            # Free the spawn slot before anyone hears "ready", so whoever reacts to it
            # finds the slot free.
            await self._settle(session, ready=True)
        await self._persist(lambda: self.store.publish(session.id, event.public()), limit)

    async def _persist(self, call: Callable[[], Awaitable[T]], limit: float) -> T:
        """``call()``, retried with bounded backoff for up to ``limit`` s while the store is away.

        Only ``store_unavailable`` is retried; anything else is the caller's.
        """
        return await retry(call, _RECORD_BACKOFF, retry_on=_store_away, limit=limit)

    async def _fail(self, session: Session, error: BrokerError) -> None:
        reason = label_or_other(error.reason, FAILURE_REASONS, "upstream_failed")
        if not session.pooled:  # a pool entry is not a creation (its refill failures count)
            self.metrics.creations.labels("failed", reason).inc()
        if not error.expected:
            self.metrics.upstream_error(self.backend.name, "spawn")
        log.log(
            logging.INFO if error.expected else logging.ERROR,
            "spawn of session %s failed: %s",
            session.id,
            error.message,
        )
        session.status = Status.FAILED
        self._ready_cache.pop(session.id, None)
        session.message = error.message
        session.ended_reason = error.reason
        event: dict[str, Any] = {"phase": "failed", "message": error.message,
                                 "status_code": error.status, "reason": error.reason}
        if "Retry-After" in error.headers:
            # A refusal that may pass later (hub spawn limit, capacity): tell clients when,
            # also those that learn of it from the event log (POST ?wait=true, /events).
            event["retry_after"] = int(error.headers["Retry-After"])
        # Recorded and announced first: the cleanup may wait on the very upstream that
        # failed (a frozen hub), and clients must not wait with it.
        try:  # for as long as the reaper would wait before calling the spawn lost
            await self._persist(lambda: self.store.save(session), ORPHAN_GRACE)
            await self._persist(lambda: self.store.publish(session.id, event), ORPHAN_GRACE)
        except BrokerError as exc:
            log.error("could not record the failure of session %s (%s); the reaper ends it "
                      "as spawn_lost", session.id, exc.message)
        await self._release(session)  # the backend cleanup follows (_spawn)

    async def _cleanup_backend(self, session: Session) -> bool:
        """Stop the session's server, bounded; on failure remember it for the reaper to retry.

        Shielded, so a cancelled caller (a stopped spawn) does not abort the stop;
        bounded by ``BROKER_CLEANUP_TIMEOUT``, so a frozen upstream cannot hold
        the caller (and what it reports) hostage. True when the server is gone.
        """
        stop = asyncio.ensure_future(
            asyncio.wait_for(self.backend.stop(session), self.settings.cleanup_timeout))
        self._background.add(stop)
        stop.add_done_callback(_forget_in(self._background))
        try:
            await asyncio.shield(stop)
        except Exception as exc:
            if session.id not in self._cleanups:
                log.warning("could not stop the server of session %s (%s: %s); retrying on "
                            "the next reaper sweep", session.id, type(exc).__name__,
                            getattr(exc, "message", exc))
            self._cleanups[session.id] = session
            return False
        self._cleanups.pop(session.id, None)
        return True

    async def retry_cleanups(self) -> int:
        """Retry the backend cleanups that failed on this replica; returns how many are left."""
        for session in list(self._cleanups.values()):
            if await self._cleanup_backend(session):
                log.info("stopped the server of session %s on a later attempt", session.id)
        return len(self._cleanups)

    # -- lookup and authentication ---------------------------------------------------------
    async def authenticate(self, session_id: str, token: str | None) -> Session:
        """The session this token opens; 401 without a token, 404/403 otherwise."""
        if not token:
            raise Unauthorized(
                "A session token is required: an Authorization header or a token query parameter"
            )
        return self._opened_by(await self.store.get(session_id), token)

    @staticmethod
    def _opened_by(session: Session | None, token: str) -> Session:
        """``session`` if it exists and ``token`` opens it; 404/403 otherwise."""
        if session is None:
            raise NotFound("No such session, or it has expired", reason="unknown_session")
        if not session.token_matches(token):
            raise Forbidden("This token does not open this session", reason="wrong_token")
        return session

    async def ready_session(self, session_id: str, token: str | None) -> Session:
        """Like :meth:`authenticate`, but the session must be able to take traffic.

        This runs on every proxied request, so ready sessions are cached on
        this replica for :data:`READY_CACHE_SECONDS` (saving a store read and a
        decryption per request). Expiry and tokens are still checked on every
        use; a token the cached copy does not know is re-read from the store
        (another replica may just have minted it). A session stopped on
        *another* replica leaves this cache when its end is announced
        (:meth:`follow_ends`); should the announcement be lost, it is still
        proxied here for at most that long.
        """
        if not token:
            raise Unauthorized(
                "A session token is required: an Authorization header or a token query parameter"
            )
        cached = self._ready_cache.get(session_id)
        now = time.monotonic()
        if cached is not None and cached[0] > now and not cached[1].expired(self.clock()) \
                and cached[1].token_matches(token):
            return cached[1]
        session = await self._shared_read(session_id)
        if session is not None and not session.token_matches(token):
            # The shared read may have begun before this token was minted: read again.
            session = await self.store.get(session_id)
        session = self._opened_by(session, token)
        if session.status is Status.READY:
            if len(self._ready_cache) >= _READY_CACHE_SIZE:
                self._ready_cache.clear()
            self._ready_cache[session_id] = (now + READY_CACHE_SECONDS, session)
        if session.status is Status.PENDING:
            raise Unavailable("The session is still starting", reason="pending", retry_after=2)
        if session.status.terminal:
            raise NotFound(
                f"The session has ended ({session.ended_reason or session.status.value})",
                reason="session_ended",
            )
        return session

    async def _shared_read(self, session_id: str) -> Session | None:
        """One store read per session at a time on this replica.

        When a session's cache entry expires under load, every request in
        flight for it misses at once; they share one read (and decryption)
        instead of each making its own. A waiter that goes away does not
        cancel the read for the others.
        """
        pending = self._reads.get(session_id)
        if pending is None:
            pending = asyncio.ensure_future(self.store.get(session_id))
            self._reads[session_id] = pending

            def forget(done: asyncio.Future[Session | None]) -> None:
                self._reads.pop(session_id, None)
                if not done.cancelled():
                    done.exception()  # retrieved, even if every waiter went away

            pending.add_done_callback(forget)
        return await asyncio.shield(pending)

    def _wait_limit(self, session_id: str, spawned_here: bool) -> float:
        """How long POST ?wait=true waits for a pending session's outcome
        (:meth:`wait_outcome`'s default).

        A spawn this replica runs, or that waits in this replica's queue, may
        first wait its turn: the whole :attr:`Settings.spawn_deadline` (the
        wait ends earlier when the spawn's outcome arrives). A spawn this
        replica does not know is running elsewhere, or was lost with a replica
        that died: its outcome is due within the spawn timeout, and a waiter
        held for the queue's bound too would outlive the request's client (a
        spawn still queued on another replica answers 504 wait_timeout naming
        the session, which the client may follow through its events).
        """
        settings = self.settings
        if spawned_here or session_id in self._queued:
            return settings.spawn_deadline + 5
        return settings.spawn_timeout + 5

    async def wait(self, session_id: str, limit: float) -> Session | None:
        """Wait until the session's spawn reached a final phase (or ``limit`` seconds)."""
        session, _ = await self.wait_outcome(session_id, limit)
        return session

    async def wait_outcome(
        self, session_id: str, limit: float | None = None, spawning: Session | None = None
    ) -> tuple[Session | None, dict[str, Any] | None]:
        """Like :meth:`wait`, also returning the final event (None on timeout).

        ``spawning``: the session as :meth:`create` returned it when that call
        started its spawn here (None for a session reused or spawned elsewhere);
        it decides the default ``limit`` (:meth:`_wait_limit`). A failed spawn's
        event carries what the session record does not: the refusal's HTTP
        ``status_code`` and ``retry_after``. A store outage does not end the
        wait early: the session is None if the store is still away at the end,
        unless ``spawning`` (the object this replica's spawn updates) has failed
        meanwhile: then the wait ends there. ``limit`` allows for a wait in the
        spawn queue, so without that a store outage would hold the caller for
        the whole bound.
        """
        if limit is None:
            limit = self._wait_limit(session_id, spawned_here=spawning is not None)
        final: dict[str, Any] | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while final is None:
                    try:
                        async for event in self.store.subscribe(session_id):
                            if event is not None and event.get("phase") in FINAL_PHASES:
                                final = event
                                break
                        else:
                            break  # the session is gone
                    except Unavailable as exc:
                        if exc.reason != "store_unavailable":
                            raise
                        # The store is away: the outcome may still come. Look again
                        # until the limit (the caller answers 504 with the session id),
                        # or until this replica's own spawn has failed. A server that is
                        # ready but not yet recorded is no outcome: the spawn may still
                        # fail to record it (and then stops it), so "ready" is only
                        # answered once the store has it.
                        await asyncio.sleep(1)
                        if spawning is not None and spawning.status.terminal:
                            break
        try:
            return await self.store.get(session_id, include_expired=True), final
        except Unavailable as exc:
            if exc.reason != "store_unavailable":
                raise
            return None, final

    def events(
        self, session_id: str, keepalive: float = 15.0
    ) -> AsyncIterator[dict[str, Any] | None]:
        """The session's progress events, replayed then followed."""
        return self.store.subscribe(session_id, keepalive=keepalive)

    def first_reply(self, session: Session) -> None:
        """A kernel of ``session`` answered an execute_request: measure its first one.

        From the creation request (a pool claim's ``created_at`` is the claim)
        to the first reply this replica saw, once per session; the set is
        bounded, so a session forgotten by a busy replica may count again.
        """
        # Keyed with created_at too: a warm pool entry keeps its id when claimed, and
        # a reply to its warm-up before the claim must not stand for the visitor's.
        key = f"{session.id}@{session.created_at}"
        if key in self._replied:
            return
        if len(self._replied) >= _READY_CACHE_SIZE:
            self._replied.clear()
        self._replied.add(key)
        self.metrics.first_reply.observe(max(0.0, self.clock() - session.created_at))

    # -- activity ------------------------------------------------------------------
    def note_activity(self, session_id: str) -> None:
        """Record kernel activity without waiting for the store (hot path).

        At most one write per session every ACTIVITY_EVERY seconds from this
        replica, however many of its connections are busy: idle culling
        counts in minutes, and a notebook page holds several kernel sockets.
        """
        now = self.clock()
        last = self._touched.get(session_id)
        if last is not None and 0 <= now - last < ACTIVITY_EVERY:
            return
        if len(self._touched) >= 10_000:  # bounded: forget entries that no longer throttle
            self._touched = {k: t for k, t in self._touched.items()
                             if 0 <= now - t < ACTIVITY_EVERY}
        self._touched[session_id] = now
        task = asyncio.create_task(self.store.touch(session_id, now))
        self._background.add(task)
        # Best effort: a write lost to a store outage only makes the session look idler.
        task.add_done_callback(_forget_in(self._background))

    def register_closer(self, session_id: str, closer: Closer) -> Callable[[], None]:
        """Remember how to close one client connection; returns the unregister call."""
        self._closers.setdefault(session_id, set()).add(closer)
        self._no_connections.clear()

        def unregister() -> None:
            closers = self._closers.get(session_id)
            if closers is not None:
                closers.discard(closer)
                if not closers:
                    del self._closers[session_id]
            if not self._closers:
                self._no_connections.set()

        return unregister

    async def _close_connections(self, session_id: str, reason: str) -> None:
        """Close the session's connections here and have every other replica close its own."""
        try:
            await self.store.announce_end(session_id, reason)
        except Unavailable:
            # Replicas that miss it check their sessions when they resubscribe, and a
            # stopped session's proxying ends within READY_CACHE_SECONDS anyway.
            log.warning("could not announce the end of session %s to the other replicas",
                        session_id)
        await self._close_here(session_id, reason)

    async def _close_here(self, session_id: str, reason: str) -> None:
        self._ready_cache.pop(session_id, None)
        closers = list(self._closers.pop(session_id, ()))
        if not self._closers:
            self._no_connections.set()
        await asyncio.gather(*(c(1000, f"session ended: {reason}") for c in closers),
                             return_exceptions=True)

    async def follow_ends(self) -> None:
        """Close this replica's connections of sessions that ended on any replica (a task).

        Each close runs on its own, so one slow client cannot delay the next
        end. After each (re)subscription, the sessions this replica holds
        connections for are looked up once: ends announced while it was not
        listening (a Redis failover) are found that way.
        """
        while True:
            try:
                await self._follow_ends_once()
            except Exception:  # never end silently: every replica relies on this task
                log.exception("following session ends failed; starting again")
            await asyncio.sleep(1)  # backoff after an unexpected error, not a synchronisation

    async def _follow_ends_once(self) -> None:
        async for ended in self.store.follow_ends():
            if ended is None:
                held = list(self._closers)
                checks = [self.end_reason(session_id) for session_id in held]
                ended_away = await asyncio.gather(*checks, return_exceptions=True)
                gone = [(i, r) for i, r in zip(held, ended_away, strict=True) if isinstance(r, str)]
            else:
                gone = [ended]
            for session_id, reason in gone:
                if session_id in self._closers or session_id in self._ready_cache:
                    task = asyncio.create_task(self._close_here(session_id, reason))
                    self._background.add(task)
                    task.add_done_callback(_forget_in(self._background))

    async def end_reason(self, session_id: str) -> str | None:
        """The reason a session ended, if it did (None while it is live).

        Asked after a resubscription (ends announced while this replica was not
        listening) and by a kernel relay whose upstream vanished (was its server
        stopped because the session ended?)."""
        session = await self.store.get(session_id, include_expired=True)
        if session is None:
            return "deleted"
        return session.ended_reason or session.status.value if session.status.terminal else None

    def open_connections(self) -> int:
        """Kernel WebSockets open on this replica."""
        return sum(len(c) for c in self._closers.values())

    async def drain(self, limit: float) -> None:
        """Shutdown: let connections end by themselves for ``limit`` s, then close with 1001.

        1001 (going away) tells clients to reconnect — to another replica,
        which finds the session in the shared store. Sessions are left as
        they are.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_connections.wait(), limit)
        closers = [c for group in list(self._closers.values()) for c in list(group)]
        if closers:
            log.info("closing %d kernel connections for shutdown", len(closers))
        await asyncio.gather(*(c(1001, "server shutting down") for c in closers),
                             return_exceptions=True)

    # -- ending ------------------------------------------------------------------
    async def stop(self, session: Session, reason: str) -> None:
        """Stop a session for good: backend server, open connections, store state."""
        spawn = self._spawns.pop(session.id, None)
        if spawn is not None and not spawn.done():
            spawn.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await spawn
        session.status = Status.STOPPED
        self._ready_cache.pop(session.id, None)
        session.ended_reason = reason
        session.message = f"Session stopped ({reason})"
        await self.store.save(session)
        await self._release(session)
        await self.store.publish(session.id, {"phase": "stopped", "message": session.message,
                                              "reason": reason})
        await self._close_connections(session.id, reason)
        await self._cleanup_backend(session)
        self.metrics.ended(reason)
        log.info("session %s stopped: %s", session.id, reason)

    async def on_upstream_lost(self, session_id: str, message: str,
                               reason: str = "upstream_exited") -> None:
        """A backend noticed a server died: the session fails, its clients are told
        (on every replica: :meth:`_close_connections` announces the end)."""
        session = await self.store.get(session_id, include_expired=True)
        if session is None or session.status.terminal:
            return
        session.status = Status.FAILED
        self._ready_cache.pop(session.id, None)
        session.ended_reason = reason
        session.message = message
        self.metrics.ended(reason)
        self.metrics.upstream_error(session.backend, "exited")
        await self.store.save(session)
        await self._release(session)
        await self.store.publish(session_id, {"phase": "failed", "message": message,
                                              "reason": reason})
        await self._close_connections(session_id, reason)

    def spawning(self, session_id: str) -> bool:
        """Whether this replica is running the session's spawn right now."""
        return session_id in self._spawns

    async def reap_once(self) -> int:
        """One reaper sweep (see :class:`~broker.reaper.Reaper`); how many sessions it stopped."""
        return await self.reaper.reap_once()

    async def run_reaper(self) -> None:
        """The reaper's background loop (see :meth:`broker.reaper.Reaper.run`)."""
        await self.reaper.run()

    async def close(self) -> None:
        """Cancel spawns in flight (their servers are stopped) at shutdown."""
        for task in list(self._spawns.values()):
            task.cancel()
        await asyncio.gather(*self._spawns.values(), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
