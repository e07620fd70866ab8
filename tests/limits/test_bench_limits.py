"""The limits benchmark runs end to end and prints its ratio (numbers, never timing, asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ws_bench_limits_prints_the_ratio() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ws_bench.py"), "--limits",
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| limits ")]
    assert [row.split("|")[1].strip() for row in rows] == ["limits off", "limits on"]
    ratio = re.search(r"limits on / off: proxy CPU per message (\d+\.\d+)", proc.stdout)
    assert ratio is not None and float(ratio.group(1)) > 0, proc.stdout
    assert re.search(r"WsLimiter.take alone: \d+ ns per message", proc.stdout), proc.stdout
