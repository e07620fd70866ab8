"""The reaper's liveness verdicts: several failures over a window, "cannot check"
never counts, and a starved sweep gives no verdict at all.

Probe results are fed to the real :class:`broker.reaper.Reaper` of a running
broker; what real probes return for a frozen server, EMFILE and so on is
tested in ``tests/test_local_sweep.py`` and ``tests/chaos/``.
"""

from __future__ import annotations

from broker.backends.base import Liveness
from broker.models import Session, Status, new_session_id
from tests.conftest import MakeBroker, ManualClock

ALIVE, DEAD, UNKNOWN = Liveness.ALIVE, Liveness.DEAD, Liveness.UNKNOWN


def _sessions(n: int) -> list[Session]:
    return [Session(id=new_session_id(), token_hash="", owner="o", backend="local",
                    created_at=0, expires_at=10**10, status=Status.READY) for _ in range(n)]


async def test_a_starved_sweep_gives_no_verdict(make_broker: MakeBroker,
                                                clock: ManualClock) -> None:
    broker = await make_broker(clock=clock, reap_probe_failures=1, reap_probe_window=0)
    reaper = broker.manager.reaper
    sessions = _sessions(3)
    # Most probes could not be made here: even a DEAD one is no verdict.
    assert reaper.verdicts(sessions, [UNKNOWN, UNKNOWN, DEAD], clock()) == ["", "", ""]
    # The same DEAD in a sweep that could look is enough with one failure allowed.
    assert reaper.verdicts(sessions, [ALIVE, ALIVE, DEAD], clock()) == ["", "", "upstream_gone"]


async def test_failures_must_repeat_over_the_window_and_cannot_check_never_counts(
    make_broker: MakeBroker, clock: ManualClock
) -> None:
    broker = await make_broker(clock=clock, reap_probe_failures=3, reap_probe_window=60)
    reaper = broker.manager.reaper
    flaky, healthy = _sessions(2)
    both = [flaky, healthy]
    assert reaper.verdicts(both, [DEAD, ALIVE], clock()) == ["", ""]  # 1
    clock.advance(30)
    assert reaper.verdicts(both, [UNKNOWN, ALIVE], clock()) == ["", ""]  # not counted
    assert reaper.verdicts(both, [DEAD, ALIVE], clock()) == ["", ""]  # 2
    clock.advance(31)
    assert reaper.verdicts(both, [ALIVE, ALIVE], clock()) == ["", ""]  # an answer resets
    assert reaper.verdicts(both, [DEAD, ALIVE], clock()) == ["", ""]  # 1 again
    assert reaper.verdicts(both, [DEAD, ALIVE], clock()) == ["", ""]  # 2
    assert reaper.verdicts(both, [DEAD, ALIVE], clock()) == ["", ""]  # 3, but over 0 s
    clock.advance(60)
    assert reaper.verdicts(both, [DEAD, ALIVE], clock()) == ["upstream_gone", ""]
