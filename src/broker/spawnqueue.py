"""A per-replica fair queue of spawn slots, in front of every backend spawn.

Why: a herd of new visitors (a lecture starting, a book page posted
somewhere) used to start every spawn at once. On the local backend twenty
``jupyter server`` processes then share two cores, every one of them is slow,
and the last kernels miss their start timeout: everyone waits half a minute
and some get an error. Started a few at a time, the same spawns finish one
after another, the first visitors are served in seconds and nobody times out.
JupyterHub has the same problem one level up (its ``concurrent_spawn_limit``
answers 429 beyond it), so the broker queues there too, below that limit.

Rules (the invariants the tests hold):

* At most ``slots`` spawns hold a slot at once on this replica
  (``BROKER_SPAWN_SLOTS``; 0 picks a number per backend, :func:`auto_slots`).
* Visitors (``kind="visitor"``) are served first come, first served.
* Warm-pool refills (``kind="pool"``) get a slot only while no visitor is
  waiting and only up to their share (``BROKER_POOL_SPAWN_SHARE`` of the
  slots, rounded down), and never the last slot: with ``slots`` = 1 the pool
  does not refill at all. A pool spawn already running is not interrupted.
* A waiter hears its place in line (1 = next) and an estimated wait, derived
  from how long the last few slots were held, every time its place changes,
  through its ``on_progress`` callback (run in the waiter's own task).
* A waiter gives up after ``limit`` seconds (BROKER_SPAWN_QUEUE_TIMEOUT) with
  :class:`~broker.errors.SpawnQueueTimeout` (503 ``spawn_queue_timeout``,
  Retry-After); a cancelled waiter (its client went away) leaves the line at
  once and moves everyone behind it forward.
* The time a spawn may take (``BROKER_SPAWN_TIMEOUT``) starts when it leaves
  the queue, not when it joined it.

The API, for the session core and for the pool::

    async with queue.slot(kind="pool", on_progress=report):
        ...spawn through the backend...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from broker.errors import SpawnQueueTimeout
from broker.metrics import Metrics

Kind = Literal["visitor", "pool"]
KINDS: tuple[Kind, ...] = ("visitor", "pool")
#: Slots per replica for the hub-based backends when BROKER_SPAWN_SLOTS is 0.
#: JupyterHub's ``concurrent_spawn_limit`` defaults to 100: five replicas stay below it.
HUB_SLOTS = 20
#: Slot hold times remembered for the wait estimate.
_HISTORY = 20


@dataclass(frozen=True)
class QueueProgress:
    """Where a waiter stands: ``position`` 1 is next; ``wait`` is seconds, None if unknown."""

    position: int
    wait: float | None
    slots: int

    def event(self) -> dict[str, object]:
        """The progress event a visitor's event stream carries (BinderHub's ``waiting``)."""
        ahead = self.position - 1
        line = ("you are next" if ahead == 0
                else f"{ahead} {'visitor' if ahead == 1 else 'visitors'} ahead of you")
        estimate = "" if self.wait is None else f", about {math.ceil(self.wait)} s"
        data: dict[str, object] = {
            "phase": "waiting",
            "message": f"Waiting for a free launch slot: {line}{estimate}",
            "queue_position": self.position,
        }
        if self.wait is not None:
            data["queue_wait"] = math.ceil(self.wait)
        return data


def auto_slots(backend: str, cpus: int | None = None) -> int:
    """The slot count BROKER_SPAWN_SLOTS=0 stands for (the rule docs/limits.md states).

    local: twice the CPUs this process may run on. A server start is about
    half CPU (imports) and half waiting (the process coming up, the readiness
    probes), so two per core keep the cores busy; many more only make every
    start slower. Measured on 2 cores, a herd of 20 (bench_first_output.py):
    2 slots p95 45-142 s, 4 slots 40 s, 8 slots 48 s, 20 slots 46.5 s.
    jupyterhub and binderhub: :data:`HUB_SLOTS` per replica.
    """
    if backend != "local":
        return HUB_SLOTS
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    return 2 * max(1, cpus)


class _Waiter:
    """One request in line; ``granted`` is set when it holds a slot."""

    __slots__ = ("granted", "kind", "moved")

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.granted = False
        #: Set whenever this waiter's place may have changed (or it was granted).
        self.moved = asyncio.Event()


class SpawnQueue:
    """Spawn slots of one replica (see the module docstring for the rules)."""

    def __init__(self, slots: int, *, pool_share: float = 0.5, timeout: float = 300.0,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slots < 1:
            raise ValueError("a spawn queue needs at least one slot")
        self.slots = slots
        #: Slots pool refills may hold at once: their share, never the last slot.
        self.pool_slots = max(0, min(math.floor(slots * pool_share), slots - 1))
        self.timeout = timeout
        self.metrics = metrics
        self._clock = clock
        self._running: dict[Kind, int] = {"visitor": 0, "pool": 0}
        self._line: dict[Kind, collections.deque[_Waiter]] = {
            "visitor": collections.deque(), "pool": collections.deque()}
        self._held: collections.deque[float] = collections.deque(maxlen=_HISTORY)
        if metrics is not None:
            metrics.spawn_slots.set(slots)

    # -- what a dashboard or the admin API shows ---------------------------------------
    def waiting(self, kind: Kind | None = None) -> int:
        """Requests waiting for a slot (of one kind, or all)."""
        return sum(len(self._line[k]) for k in KINDS if kind in (None, k))

    def running(self, kind: Kind | None = None) -> int:
        """Slots held (by one kind, or all)."""
        return sum(self._running[k] for k in KINDS if kind in (None, k))

    def snapshot(self) -> dict[str, object]:
        """The queue's state as the admin API shows it."""
        return {"slots": self.slots, "pool_slots": self.pool_slots,
                "running": dict(self._running),
                "waiting": {k: len(self._line[k]) for k in KINDS},
                "typical_spawn_seconds": self.typical_hold()}

    def typical_hold(self) -> float | None:
        """Mean of the recent slot hold times (None before the first spawn ended)."""
        return sum(self._held) / len(self._held) if self._held else None

    def progress(self, waiter: _Waiter) -> QueueProgress:
        """Where ``waiter`` stands now."""
        position = self._line[waiter.kind].index(waiter) + 1
        if waiter.kind == "pool":
            position += len(self._line["visitor"])
        typical = self.typical_hold()
        # Each place ahead needs one slot to come free; ``slots`` of them free in
        # about one typical hold. Slots already part-way through count as fresh.
        wait = None if typical is None else position * typical / self.slots
        return QueueProgress(position, wait, self.slots)

    # -- the API ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(
        self,
        kind: Kind = "visitor",
        on_progress: Callable[[QueueProgress], Awaitable[None]] | None = None,
        limit: float | None = None,
    ) -> AsyncIterator[None]:
        """Hold one spawn slot for the body of the ``async with``.

        Waits in line first (``limit`` seconds at most, default the
        queue's timeout; ``math.inf`` for no bound), telling ``on_progress`` each
        new place. A refill passes ``kind="pool"``. Cancelling the waiting
        task leaves the line; leaving the body frees the slot for the next.
        """
        waiter = _Waiter(kind)
        started = self._clock()
        self._line[kind].append(waiter)
        self._gauge(kind)
        self._grant()
        try:
            await self._wait(waiter, self.timeout if limit is None else limit, on_progress)
        except BaseException as exc:
            if waiter.granted:  # granted just as it was cancelled: the slot goes on
                self._release(kind, None)
            else:
                self._line[kind].remove(waiter)
                self._gauge(kind)
                self._moved(kind)
            self._waited(kind, "timeout" if isinstance(exc, SpawnQueueTimeout) else "left",
                         started)
            raise
        self._waited(kind, "granted", started)
        held_from = self._clock()
        try:
            yield
        finally:
            self._release(kind, self._clock() - held_from)

    def _waited(self, kind: Kind, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.spawn_queue_wait.labels(kind, outcome).observe(self._clock() - started)

    def _release(self, kind: Kind, held: float | None) -> None:
        """A slot comes free (``held``: for how long, None if it was never used)."""
        self._running[kind] -= 1
        if held is not None:
            self._held.append(held)
        if self.metrics is not None:
            self.metrics.spawn_slots_in_use.labels(kind).set(self._running[kind])
        self._grant()

    async def _wait(self, waiter: _Waiter, limit: float,
                    on_progress: Callable[[QueueProgress], Awaitable[None]] | None) -> None:
        told = 0
        bound = asyncio.timeout(None if math.isinf(limit) else limit)
        try:
            async with bound:
                while not waiter.granted:
                    waiter.moved.clear()
                    where = self.progress(waiter)
                    if on_progress is not None and where.position != told:
                        told = where.position
                        await on_progress(where)
                        continue  # the line may have moved meanwhile
                    await waiter.moved.wait()
        except TimeoutError:
            if not bound.expired():  # from on_progress, not the queue's bound
                raise
            if waiter.granted:  # granted at the moment the bound ran out: keep the slot
                return
            raise SpawnQueueTimeout(
                f"No launch slot came free within {limit:g} s: the broker is busy starting "
                "other sessions. Try again in a minute.", retry_after=60) from None

    def _grant(self) -> None:
        """Hand free slots out: visitors first, then pool refills within their share."""
        changed: set[Kind] = set()
        while self.running() < self.slots:
            if self._line["visitor"]:
                kind: Kind = "visitor"
            elif self._line["pool"] and self._running["pool"] < self.pool_slots:
                kind = "pool"
            else:
                break
            waiter = self._line[kind].popleft()
            waiter.granted = True
            waiter.moved.set()
            self._running[kind] += 1
            changed.add(kind)
            if self.metrics is not None:
                self.metrics.spawn_slots_in_use.labels(kind).set(self._running[kind])
        for kind in changed:
            self._gauge(kind)
            self._moved(kind)

    def _moved(self, kind: Kind) -> None:
        """Wake the waiters whose place may have changed after ``kind``'s line moved."""
        for line in ((self._line["visitor"], self._line["pool"]) if kind == "visitor"
                     else (self._line["pool"],)):
            for waiter in line:
                waiter.moved.set()

    def _gauge(self, kind: Kind) -> None:
        if self.metrics is not None:
            self.metrics.spawn_queue_length.labels(kind).set(len(self._line[kind]))
