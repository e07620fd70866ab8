"""The benchmark runs end to end and reports every scenario for every target.

Only behaviour is asserted (it exits 0; each row has numbers for direct and
for the broker), never timing: the machine is shared and noisy.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["a", "b", "c", "d1", "d2"]
TARGETS = ["direct", "broker"]


def run_quick_bench() -> str:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ws_bench.py"), "--quick"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the benchmark then stops every process it started.
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the benchmark did not finish in 120 s:\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def tables(output: str) -> list[list[dict[str, str]]]:
    """Each Markdown table in ``output`` as a list of {column: cell} rows."""
    found: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in output.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            found.append([])
        elif not set("".join(cells)) <= set("-:"):
            found[-1].append(dict(zip(header, cells, strict=True)))
    return found


def number(cell: str) -> float:
    value = float(cell)  # raises on "-" or text: every reported cell must be a number
    assert math.isfinite(value), cell
    return value


@pytest.fixture(scope="module")
def bench_output() -> str:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    return run_quick_bench()


def test_every_scenario_has_numbers_for_direct_and_broker(bench_output: str) -> None:
    results, _cpu = tables(bench_output)
    for scenario in SCENARIOS:
        rows = [row for row in results if row["id"] == scenario]
        assert {row["metric"] for row in rows} >= {"p50 ms", "p99 ms"}, (scenario, rows)
        assert len(rows) == 3, rows
        for row in rows:
            assert number(row["direct"]) > 0, row
            assert number(row["broker"]) > 0, row
            number(row["broker/direct"])
    throughput = {row["id"]: row["metric"] for row in results if not row["metric"].endswith("ms")}
    assert throughput == {"a": "round trips/s", "b": "round trips/s", "c": "MiB/s",
                          "d1": "round trips/s", "d2": "round trips/s"}


def test_cpu_is_charged_to_each_process(bench_output: str) -> None:
    _results, cpu = tables(bench_output)
    seen = {(row["id"], row["target"]) for row in cpu}
    assert seen == {(s, t) for s in SCENARIOS for t in TARGETS}
    for row in cpu:
        assert int(row["round trips"]) > 0, row
        assert number(row["client"]) >= 0, row
        assert number(row["upstream"]) >= 0, row
        if row["id"].startswith("d"):
            number(row["kernel"])
        if row["target"] == "broker":
            number(row["proxy"])
            number(row["store"])
        else:
            assert row["proxy"] == "-", row
