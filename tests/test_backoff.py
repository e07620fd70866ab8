"""The retry helper (broker.backoff) on a fake clock: schedules, deadlines, filters.

Every pause goes through an injected sleep that only moves the fake clock
forward, so the tests assert the exact pauses taken and never wait.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from broker.backoff import Backoff, poll, retry, retry_after_seconds


class FakeTime:
    """A clock that moves only when something sleeps; records every pause."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


class Flaky(Exception):
    pass


def failing(times: int, exc: Callable[[], Exception] = Flaky,
            result: str = "done") -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that raises ``exc()`` ``times`` times, then returns ``result``."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise exc()
        return result

    return call, calls


def run(coro: Awaitable[str | None]) -> str | None:
    async def main() -> str | None:
        return await coro
    return asyncio.run(main())


def retried(time: FakeTime, call: Callable[[], Awaitable[str]], backoff: Backoff,
            retry_on: Callable[[BaseException], bool] = lambda e: True,
            **bounds: float) -> str | None:
    """``retry`` on the fake clock, run to its end."""
    return run(retry(call, backoff, retry_on=retry_on, clock=time.clock, sleep=time.sleep,
                     **bounds))


def test_schedule_grows_by_factor_up_to_cap() -> None:
    assert list(itertools.islice(Backoff(0.1, 1.0).delays(), 6)) == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert list(itertools.islice(Backoff(1.0, 10.0, factor=3).delays(), 4)) == [1, 3, 9, 10]
    # A start above the cap is capped from the first pause on.
    assert list(itertools.islice(Backoff(500.0, 300.0).delays(), 2)) == [300.0, 300.0]


def test_each_iterator_starts_over() -> None:
    schedule = Backoff(0.25, 5.0)
    first = schedule.delays()
    assert [next(first), next(first), next(first)] == [0.25, 0.5, 1.0]
    assert next(schedule.delays()) == 0.25


def test_after_continues_a_kept_pause() -> None:
    schedule = Backoff(start=5.0, cap=300.0)
    pauses = [0.0]
    for _ in range(8):
        pauses.append(schedule.after(pauses[-1]))
    assert pauses[1:] == [5, 10, 20, 40, 80, 160, 300, 300]


def test_jitter_takes_off_at_most_its_fraction() -> None:
    draws = iter([0.0, 1.0, 0.5])
    schedule = Backoff(1.0, 8.0, jitter=0.5, rand=lambda: next(draws))
    # Undrawn pauses 1, 2, 4; each loses up to half of itself.
    assert list(itertools.islice(schedule.delays(), 3)) == [1.0, 1.0, 3.0]


def test_full_jitter_can_reach_zero() -> None:
    assert next(Backoff(2.0, 2.0, jitter=1.0, rand=lambda: 1.0).delays()) == 0.0


@pytest.mark.parametrize("kwargs", [dict(start=-1, cap=1), dict(start=1, cap=-1),
                                    dict(start=1, cap=2, factor=0.5),
                                    dict(start=1, cap=2, jitter=1.5)])
def test_nonsense_schedules_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_retry_pauses_by_the_schedule_until_the_call_succeeds() -> None:
    time = FakeTime()
    call, calls = failing(3)
    result = retried(time, call, Backoff(0.25, 5.0), lambda e: isinstance(e, Flaky))
    assert result == "done"
    assert len(calls) == 4
    assert time.pauses == [0.25, 0.5, 1.0]


def test_retry_raises_other_errors_at_once() -> None:
    time = FakeTime()
    call, calls = failing(5, exc=lambda: KeyError("not retried"))
    with pytest.raises(KeyError):
        retried(time, call, Backoff(0.25, 5.0), lambda e: isinstance(e, Flaky))
    assert len(calls) == 1
    assert time.pauses == []


def test_retry_takes_no_pause_that_ends_past_the_deadline() -> None:
    time = FakeTime()
    call, calls = failing(100)
    with pytest.raises(Flaky):
        retried(time, call, Backoff(1.0, 4.0), limit=10.0)
    # 1 + 2 + 4 = 7; a further 4 would end at 11 > 10, so the error is raised at 7.
    assert time.pauses == [1.0, 2.0, 4.0]
    assert len(calls) == 4
    assert time.now - 1000.0 <= 10.0


def test_retry_counts_the_time_the_calls_take() -> None:
    time = FakeTime()
    calls: list[int] = []

    async def slow() -> str:
        calls.append(1)
        time.now += 3.0  # each attempt takes 3 s of the limit
        raise Flaky()

    with pytest.raises(Flaky):
        retried(time, slow, Backoff(1.0, 1.0), limit=10.0)
    # Attempts end at 3, 7, 11: after the third no pause fits.
    assert len(calls) == 3
    assert time.pauses == [1.0, 1.0]


def test_retry_stops_after_its_attempts() -> None:
    time = FakeTime()
    call, calls = failing(5)
    with pytest.raises(Flaky):
        retried(time, call, Backoff(0.0, 0.0), attempts=2)
    assert len(calls) == 2
    assert time.pauses == [0.0]
    call, calls = failing(1)
    assert retried(time, call, Backoff(0.0, 0.0), attempts=2) == "done"


def test_retry_never_swallows_cancellation() -> None:
    time = FakeTime()

    async def cancelled() -> str:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        retried(time, cancelled, Backoff(0.1, 1.0))
    assert time.pauses == []


def test_poll_returns_the_first_answer() -> None:
    time = FakeTime()
    answers = iter([None, None, False])

    async def check() -> bool | None:
        return next(answers)

    # False is an answer (e.g. "the process died"), not "not yet".
    assert run(poll(check, Backoff(0.02, 0.25), clock=time.clock, sleep=time.sleep)) is False
    assert time.pauses == [0.02, 0.04]


def test_poll_gives_none_at_the_deadline() -> None:
    time = FakeTime()
    checks: list[int] = []

    async def never() -> str | None:
        checks.append(1)
        return None

    assert run(poll(never, Backoff(0.02, 0.25), limit=1.0, clock=time.clock,
                    sleep=time.sleep)) is None
    assert sum(time.pauses) <= 1.0
    # 0.02 .. 0.16, then 0.25s until the next would pass the deadline.
    assert time.pauses == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.25, 0.25])
    assert len(checks) == len(time.pauses) + 1


def test_poll_passes_on_the_checks_errors() -> None:
    time = FakeTime()

    async def broken() -> str | None:
        raise Flaky()

    with pytest.raises(Flaky):
        run(poll(broken, Backoff(0.1, 1.0), clock=time.clock, sleep=time.sleep))


def test_the_default_clock_and_sleep_are_the_loops() -> None:
    # No fake: a zero schedule must work on the running loop without waiting.
    call, calls = failing(2)
    assert run(retry(call, Backoff(0.0, 0.0), retry_on=lambda e: True)) == "done"
    assert len(calls) == 3


@pytest.mark.parametrize(("value", "seconds"), [
    ("120", 120.0), ("1.5", 1.5), ("0", 0.0), (None, None), ("", None), ("-3", None),
    ("soon", None), ("nan", None), ("inf", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", None)])
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value) == seconds
