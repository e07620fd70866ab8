"""The shipped Grafana dashboard tells releases and pods apart, and REST latency from
long-lived requests (issue #16).

Every series a query reads is narrowed by the namespace, job and pod variables
(two releases in one Prometheus are never summed); the variables come from
``broker_info``; the REST and long-lived latency panels split the routes
between them; and every expression, with the variables at "All", is valid
PromQL for Prometheus's own parser (``promtool check rules``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from broker.metrics import ROUTES
from tests.deploy.conftest import CHART
from tests.deploy.test_alerts import _run, promtool  # noqa: F401  (fixture)

DASHBOARD = CHART / "files" / "dashboard.json"
SCOPE = 'namespace=~"$namespace", job=~"$job", pod=~"$pod"'


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def test_namespace_job_and_pod_variables_come_from_broker_info() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["namespace"]["definition"] == "label_values(broker_info, namespace)"
    assert variables["job"]["definition"] == \
        'label_values(broker_info{namespace=~"$namespace"}, job)'
    assert variables["pod"]["definition"] == \
        'label_values(broker_info{namespace=~"$namespace", job=~"$job"}, pod)'
    for name in ("namespace", "job", "pod"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_series_a_query_reads_is_scoped() -> None:
    for title, expr in expressions():
        selectors = re.findall(r"\b(broker_[a-z_]+)(\{[^}]*\})?", expr)
        assert selectors, (title, expr)
        for metric, labels in selectors:
            assert labels.startswith("{" + SCOPE), (title, metric, expr)


def _route_matcher(expr: str) -> tuple[str, set[str]]:
    [(op, routes)] = re.findall(r'route(!~|=~)"([^"]+)"', expr)
    return op, set(routes.split("|"))


def test_rest_latency_is_apart_from_long_lived_routes() -> None:
    panels = {p["title"]: p for p in dashboard()["panels"]}
    [rest] = [p for t, p in panels.items() if t.startswith("REST latency")]
    [long] = [p for t, p in panels.items() if t.startswith("Long-lived requests")]
    rest_op, rest_routes = _route_matcher(rest["targets"][0]["expr"])
    long_op, long_routes = _route_matcher(long["targets"][0]["expr"])
    assert (rest_op, long_op) == ("!~", "=~") and rest_routes == long_routes
    assert {"build", "sessions_create", "session_events"} <= long_routes <= set(ROUTES)
    assert not any("route" not in t["expr"] and "http_request_duration_seconds_bucket" in
                   t["expr"] for p in panels.values() for t in p["targets"]), \
        "a latency panel mixes every route"


def test_every_expression_parses_as_promql(promtool: Path, tmp_path: Path) -> None:  # noqa: F811
    """Variables at "All" (.*), each expression as a recording rule: promtool parses them."""
    rules = [{"record": f"dashboard:expr_{n}",
              "expr": expr.replace("$namespace", ".*").replace("$job", ".*").replace("$pod", ".*")}
             for n, (_, expr) in enumerate(expressions())]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(
        {"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run(promtool, ["check", "rules", "dashboard.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout
