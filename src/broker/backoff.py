"""One retry helper: exponential pauses, a deadline, and a filter for what is retried.

The broker waits on things outside it in a handful of places: a Jupyter
server that announced itself but does not accept connections yet, a hub
that finishes a stop without telling anyone, a Redis failover under a
spawn's writes, a lost pub/sub subscription, a warm pool whose refills keep
being refused, a kept-alive upstream connection closed just as a request
went out. Each used to carry its own loop (``delay = min(delay * 2, cap)``,
or one more attempt); they differed only in their numbers, so the numbers
stay with the callers and the loop lives here, in the spirit of
JupyterHub's ``exponential_backoff``.

* :class:`Backoff` is the schedule: ``start``, times ``factor`` per pause,
  at most ``cap``, optionally with jitter (each pause drawn from
  ``[pause * (1 - jitter), pause]``, so replicas that lost the same service
  at the same moment do not all come back at the same moment).
* :func:`retry` calls until the call returns, retrying only the exceptions
  its ``retry_on`` accepts; :func:`poll` calls until the check has an
  answer (anything but None).
* Both stop at a deadline ``limit`` seconds after they started: no pause
  is taken that would end past it, so the last attempt starts before the
  deadline and the caller's bound holds (an attempt in progress is not
  cut: a caller that needs that wraps the call in ``asyncio.timeout``).
  ``attempts`` bounds the number of calls instead of, or as well as, time.
* :func:`retry_after_seconds` reads a ``Retry-After`` header, for callers
  that let a server's own word lengthen their pause.

The clock and the sleep are arguments, so the helper's own tests run on a
fake clock without waiting; leaf module, imports nothing of the application.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


@dataclasses.dataclass(frozen=True)
class Backoff:
    """A schedule of pauses: ``start``, ``start * factor``, ..., never more than ``cap``."""

    start: float
    cap: float
    factor: float = 2.0
    #: Fraction of each pause that may be taken off at random (0: none, 1: full jitter).
    jitter: float = 0.0
    rand: Callable[[], float] = dataclasses.field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if self.start < 0 or self.cap < 0 or self.factor < 1:
            raise ValueError("a backoff needs start >= 0, cap >= 0 and factor >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter is a fraction between 0 and 1")

    def after(self, previous: float) -> float:
        """The pause that follows ``previous`` (0: none yet), before jitter; at most ``cap``.

        For callers that keep the current pause between calls, as the warm
        pool does between refills.
        """
        return min(self.cap, max(self.start, previous * self.factor))

    def delays(self) -> Iterator[float]:
        """The pauses in order, jittered, without end (a new iterator starts over)."""
        delay = min(self.start, self.cap)
        while True:
            yield self.jittered(delay)
            delay = self.after(delay)

    def jittered(self, delay: float) -> float:
        """``delay`` less a random part of up to ``jitter`` of it."""
        return delay * (1.0 - self.jitter * self.rand()) if self.jitter else delay


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header's delay in seconds; None when absent or not a delay.

    The broker, JupyterHub and BinderHub send a number of seconds; the
    HTTP-date form is not used by any of them and counts as absent, as does
    anything negative or not finite.
    """
    try:
        seconds = float(value) if value else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


async def retry(
    call: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    retry_on: Callable[[BaseException], bool],
    limit: float = math.inf,
    attempts: float = math.inf,
    clock: Clock = _loop_time,
    sleep: Sleep = asyncio.sleep,
) -> T:
    """``await call()``; an exception ``retry_on`` accepts is retried after a pause.

    The exception is raised after all when the next pause would end more
    than ``limit`` seconds after the first call started, or after
    ``attempts`` calls. Any other exception is raised at once.
    """
    # Nothing but the call itself on the first, usual, successful attempt: the REST
    # proxy's hot path goes through here.
    deadline = clock() + limit if limit != math.inf else math.inf
    delays: Iterator[float] | None = None
    made = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            made += 1
            if not retry_on(exc) or made >= attempts:
                raise
            delays = delays or backoff.delays()
            delay = next(delays)
            if deadline != math.inf and clock() + delay > deadline:
                raise
        await sleep(delay)


async def poll(
    check: Callable[[], Awaitable[T | None]],
    backoff: Backoff,
    *,
    limit: float = math.inf,
    clock: Clock = _loop_time,
    sleep: Sleep = asyncio.sleep,
) -> T | None:
    """``await check()`` until it answers (returns anything but None); None at the deadline.

    Exceptions of ``check`` are its caller's: they end the poll.
    """
    deadline = clock() + limit
    for delay in backoff.delays():
        answer = await check()
        if answer is not None:
            return answer
        if clock() + delay > deadline:
            return None
        await sleep(delay)
    raise AssertionError("unreachable: the delays never end")
