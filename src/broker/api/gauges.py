"""Background measurements behind gauges that no request updates.

``broker_sessions`` is read from the store (so it is cluster-wide and
survives restarts) every :data:`SESSIONS_EVERY` seconds rather than at
scrape time, so a scrape never waits on Redis. ``broker_event_loop_lag_seconds``
is how late a timer fires: the broker's own measure of a blocked loop (every
measurement also goes into ``broker_event_loop_delay_seconds``, a histogram).
"""

from __future__ import annotations

import asyncio
import collections
import logging

from broker.metrics import BACKENDS, STATUSES, Metrics, label_or_other
from broker.sessions import SessionManager

log = logging.getLogger(__name__)

SESSIONS_EVERY = 15.0
LAG_EVERY = 1.0


async def refresh_sessions(manager: SessionManager) -> None:
    """Set ``broker_sessions`` from the store's live sessions, once."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    now = manager.clock()
    for session in await manager.store.list_live():
        if not session.expired(now):
            counts[(label_or_other(session.backend, BACKENDS, "local"), session.status.value)] += 1
    for backend in BACKENDS:
        for status in STATUSES:
            manager.metrics.sessions.labels(backend, status).set(counts[(backend, status)])


async def track_sessions(manager: SessionManager) -> None:
    """Refresh the sessions gauge forever (until cancelled)."""
    while True:
        try:
            await refresh_sessions(manager)
        except Exception as exc:  # the store may be down; /ready reports that
            log.debug("could not refresh the sessions gauge: %s", exc)
        await asyncio.sleep(SESSIONS_EVERY)


async def track_loop_lag(metrics: Metrics) -> None:
    """Measure event-loop lag forever (until cancelled)."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(LAG_EVERY)
        lag = max(0.0, loop.time() - start - LAG_EVERY)
        metrics.loop_lag.set(lag)
        metrics.loop_delay.observe(lag)
