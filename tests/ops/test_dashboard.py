"""The shipped Grafana dashboard queries only metrics the broker exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from broker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "session-broker" / "files" / "dashboard.json"


def test_dashboard_is_current() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen-dashboard.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_query_names_an_exported_series() -> None:
    exported = set()
    metrics = Metrics("local")
    metrics.add_members(["example"])  # the federation's series, as with BROKER_UPSTREAMS
    metrics.pools(["default"])  # pool series exist once BROKER_POOL names a pool
    for family in metrics.registry.collect():
        exported |= {sample.name for sample in family.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Launches by outcome", "Spawn latency", "Live sessions (cluster-wide)",
                   "Open kernel WebSockets", "Refusals and failures by reason",
                   "Upstream errors"):
        assert wanted in titles
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\bbroker_[a-z_]+", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
