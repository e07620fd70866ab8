"""The benchmark's interleaved rounds and its per-frame cost tool, without a full run.

``make bench`` runs every scenario in rounds whose target order rotates
(``bench/ws_bench.py``); a target's rounds are added up and the verdict gives
the range of its ratios over the rounds. The quick run of
``test_bench_smoke.py`` runs a single round, so the adding up and the ranges
are checked here on made-up results. ``bench/bench_wire.py`` (instructions
per round trip through the relay's pumps) is run briefly on both builds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.proxy import wire

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The benchmark's modules, imported as its scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_clients
    import bench_report

    return bench_clients, bench_report


def test_every_target_leads_one_round(bench: Any) -> None:
    clients, _report = bench
    orders = [clients.rotated(["direct", "chp", "broker"], n) for n in range(3)]
    assert orders == [["direct", "chp", "broker"], ["chp", "broker", "direct"],
                      ["broker", "direct", "chp"]]
    assert clients.rotated([], 2) == []


def test_rounds_add_up_and_the_verdict_gives_their_range(bench: Any) -> None:
    clients, report = bench

    def run(target: str, trips: int, seconds: float, proxy_cpu: float) -> Any:
        return clients.Result("b", target, trips, seconds, 200, [1_000_000] * trips,
                              {"upstream": 1.0, "proxy": proxy_cpu})

    broker = clients.merge([run("broker", 100, 1.0, 1.2), run("broker", 100, 2.0, 1.5)])
    chp = clients.merge([run("chp", 100, 1.0, 2.0), run("chp", 100, 1.0, 2.0)])
    assert (broker.round_trips, broker.seconds, broker.cpu) == (200, 3.0, {"upstream": 2.0,
                                                                          "proxy": 2.7})
    assert len(broker.latencies_ns) == 200 and len(broker.rounds) == 2
    assert clients.merge([chp.rounds[0]]) is chp.rounds[0]  # one round: itself
    lines = report.verdict([broker, chp], [], "delayed").splitlines()
    share = next(line for line in lines if "WS small frames" in line)
    assert "b 1.35x (rounds 1.2-1.5)" in share, share  # proxy CPU / upstream CPU
    tput = next(line for line in lines if "throughput >= chp's" in line)
    assert "b 0.667 (rounds 0.5-1)" in tput, tput  # 200/3 s against 200/2 s



def test_the_verdict_shows_the_byte_copying_floor_without_judging_it(bench: Any) -> None:
    """The ``raw`` target (``--floor``) appears beside the targets it bounds; the
    verdict's met / not met still compares the broker alone."""
    clients, report = bench

    def run(target: str, seconds: float, proxy_cpu: float) -> Any:
        return clients.merge([clients.Result("b", target, 100, seconds, 200, [1_000_000] * 100,
                                             {"upstream": 1.0, "proxy": proxy_cpu})])

    results = [run("broker", 1.0, 1.4), run("chp", 1.0, 1.6), run("raw", 0.5, 1.2)]
    lines = report.verdict(results, [], "delayed").splitlines()
    share = next(line for line in lines if "WS small frames" in line)
    assert share.startswith("- [NOT met]") and "b 1.4x" in share, share
    assert "; raw 1.2x" in share, share
    tput = next(line for line in lines if "throughput >= chp's" in line)
    assert tput.startswith("- [met]") and "raw/chp: b 2" in tput, tput


@pytest.mark.parametrize("build", ["compiled", "python"])
def test_the_per_frame_cost_tool_runs_on_both_builds(build: str) -> None:
    if build == "compiled" and wire.COMPILED is None:
        pytest.skip("installed without a C compiler")
    done = subprocess.run([sys.executable, str(BENCH / "bench_wire.py"), "--build", build,
                           "-n", "50"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{build}: "), done.stdout
