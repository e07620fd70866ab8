"""docs/metrics.md is generated from broker.metrics and must not go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_reference_is_current() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen-metrics-docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_metric_is_documented_and_prefixed() -> None:
    from broker.metrics import Metrics

    text = (ROOT / "docs" / "metrics.md").read_text()
    for family in Metrics("local").registry.collect():
        assert family.name.startswith("broker"), family.name
        assert f"`{family.name}" in text
