"""Named locks that hold across replicas: a local queue first, then the store's expiring lock.

Waiters on one replica queue on an ``asyncio.Lock`` per name (no polling
among themselves); only the one at the head asks the store
(:meth:`~broker.store.base.SessionStore.try_lock`, a Redis ``SET NX PX``
when the store is Redis), polling briefly while another replica holds it.
The store's lock expires after ``ttl`` seconds, so a replica that died
holding one blocks the others for at most that long; a waiter gives up after
``wait`` seconds in all (queue and store) with the caller's error. A store
outage (a Redis failover) raises at once, or is waited out within the same
``wait`` when the caller asks; a lock that cannot be released is left to
expire.

Used for the kernels-per-session check (:mod:`broker.policy.kernels`) and
for JupyterHub's per-user server creation (:mod:`broker.backends.jupyterhub`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from broker.errors import BrokerError, Unavailable
from broker.store.base import SessionStore

#: Seconds between attempts at a lock another replica holds.
LOCK_POLL = 0.05
#: Seconds between attempts while the store is unavailable (within the same ``wait``).
OUTAGE_POLL = 0.5

log = logging.getLogger(__name__)


class KeyedLocks:
    """One asyncio lock per key, forgotten when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


class ClusterLocks:
    """Locks by name, held on this replica and in the store (see the module docstring)."""

    def __init__(self, store: SessionStore | None) -> None:
        #: None: this replica's queue only (a backend built without a store).
        self._store = store
        self._local = KeyedLocks()

    @contextlib.asynccontextmanager
    async def hold(self, name: str, *, ttl: float, wait: float, busy: Callable[[], BrokerError],
                   through_outages: bool = False) -> AsyncIterator[None]:
        """Hold ``name`` for the block; raise ``busy()`` if it is not free within ``wait`` s.

        ``through_outages``: a store outage is waited out within ``wait`` (for
        background work such as a spawn) instead of raising at once (for a
        client's request, which should get its 503 now).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout_at(deadline):
                    await stack.enter_async_context(self._local.hold(name))
            except TimeoutError:
                raise busy() from None
            if self._store is None:
                yield
                return
            while True:
                try:
                    if await self._store.try_lock(name, ttl):
                        break
                    pause = LOCK_POLL  # another replica holds it: it expires by itself
                except Unavailable as exc:  # the store is away (a failover): wait for it
                    if (exc.reason != "store_unavailable" or not through_outages
                            or loop.time() > deadline):
                        raise
                    pause = OUTAGE_POLL
                else:
                    if loop.time() > deadline:
                        raise busy()
                await asyncio.sleep(pause)
            try:
                yield
            finally:
                try:
                    await self._store.release_lock(name)
                except Unavailable:  # the block's own outcome stands; the lock expires
                    log.warning("could not release lock %s; it expires in %g s", name, ttl)
