"""The first-output benchmark runs end to end on the local backend.

Only behaviour is asserted, never a timing: it exits 0, its header says how
loaded the machine was, every visitor of a herd (the one-by-one series are the
same visitors, one at a time) was served with a number, the herd on one spawn slot shows queued
visitors, and the targets are printed beside the results.
"""

from __future__ import annotations

import math
import shutil

import pytest

from tests.test_bench_smoke import run_bench, tables

LIMIT = 240


def test_first_output_benchmark_serves_every_visitor_and_reports_it() -> None:
    if shutil.which("node") is None:
        pytest.fail("node is not installed: run `make test`, which installs the node clients")
    out = run_bench("bench_first_output.py", "--backend", "local", "--count", "0", "--herd",
                    "2", "--misses-only", "--broker-env", "BROKER_SPAWN_SLOTS=1", limit=LIMIT)
    assert out.startswith("# first-output benchmark: machine "), out
    [rows] = tables(out)
    misses = {row["client"]: row for row in rows if row["pool"] == "miss"}
    assert set(misses) == {"herd of 2"}, rows
    assert misses["herd of 2"]["served"] == "2/2"
    assert int(misses["herd of 2"]["queued"]) >= 1  # one slot: the second visitor waited
    for row in misses.values():
        assert math.isfinite(float(row["p50 ms"])) and float(row["p50 ms"]) > 0, row
    assert "targets: pool hit p50 <= 250 ms" in out
