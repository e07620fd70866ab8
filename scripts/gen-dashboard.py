#!/usr/bin/env python3
"""Generate the Grafana dashboard the Helm chart ships (helm/.../files/dashboard.json).

Panels are written as data here so every query names a metric from
broker.metrics; tests/ops/test_dashboard.py checks each query's metric
exists and the file is current (``--check``). Namespace, job and pod
variables (from ``broker_info``) scope every query, and REST latency is
plotted apart from the long-lived routes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from generated import write_or_check

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "helm" / "session-broker" / "files" / "dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

#: Every query is narrowed to the chosen namespaces, jobs and pods, so two releases
#: scraped by one Prometheus are never summed together.
SCOPE = 'namespace=~"$namespace", job=~"$job", pod=~"$pod"'


def sel(extra: str = "") -> str:
    """A label selector: the dashboard's scope plus ``extra`` matchers."""
    return "{" + SCOPE + (", " + extra if extra else "") + "}"


#: Routes whose requests last as long as a spawn or a stream: /build (BinderHub's event
#: stream), session creation (``wait=true`` waits for the spawn; the route label cannot tell
#: it from a plain POST), the session events stream and /execute (waits for the kernel).
#: Their latency is plotted apart so it does not drown REST latency.
LONG_ROUTES = "build|sessions_create|session_events|execute"
REST = sel(f'route!~"{LONG_ROUTES}"')
#: Sessions that hold a server (pending or ready).
LIVE = 'status=~"pending|ready"'
UPSTREAM_DEP = 'dependency="upstream"'
LONG = sel(f'route=~"{LONG_ROUTES}"')

# (title, unit, [(expr, legend)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Launches by outcome", "reqps", [
        (f"sum by (outcome) (rate(broker_session_creations_total{sel()}[5m]))",
         "{{outcome}}")], 12),
    ("Refusals and failures by reason", "reqps", [
        ("sum by (outcome, reason) (rate(broker_session_creations_total"
         + sel('outcome=~"refused|failed"') + '[5m]))', "{{outcome}}: {{reason}}")], 12),
    ("Spawn latency", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(broker_spawn_duration_seconds_bucket"
         + sel('outcome="success"') + '[10m])))', "p50"),
        ("histogram_quantile(0.95, sum by (le) (rate(broker_spawn_duration_seconds_bucket"
         + sel('outcome="success"') + '[10m])))', "p95")], 8),
    ("Live sessions (cluster-wide)", "short", [
        ("max by (status) (broker_sessions" + sel('status=~"pending|ready"') + ")",
         "{{status}}")],
     8),
    ("Spawns in progress", "short", [
        (f"sum(broker_spawns_in_progress{sel()})", "spawning")], 8),
    ("Spawn queue (waiting and slots in use)", "short", [
        (f"sum by (kind) (broker_spawn_queue_length{sel()})", "waiting: {{kind}}"),
        (f"sum by (kind) (broker_spawn_slots_in_use{sel()})", "in a slot: {{kind}}"),
        (f"sum(broker_spawn_slots{sel()})", "slots")], 12),
    ("Spawn queue wait", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(broker_spawn_queue_wait_seconds_bucket"
         + sel('kind="visitor"') + '[10m])))', "visitor p50"),
        ("histogram_quantile(0.95, sum by (le) (rate(broker_spawn_queue_wait_seconds_bucket"
         + sel('kind="visitor"') + '[10m])))', "visitor p95"),
        ("sum by (outcome) (rate(broker_spawn_queue_wait_seconds_count"
         + sel('outcome!="granted"') + '[10m]))', "gave up: {{outcome}}")], 12),
    # Shared pools (hub, BinderHub) report the same count from every replica: max, not sum.
    ("Warm pool entries", "short", [
        ("max by (pool, state) (broker_pool_entries" + sel() + ")", "{{pool}} {{state}}")], 8),
    ("Warm pool claims by outcome", "reqps", [
        (f"sum by (pool, outcome) (rate(broker_pool_claims_total{sel()}[5m]))",
         "{{pool}} {{outcome}}")], 8),
    ("Warm pool refill failures", "short", [
        (f"sum by (pool, reason) (increase(broker_pool_refill_failures_total{sel()}[1h]))",
         "{{pool}} {{reason}}")], 8),
    ("New visitor to first cell (request to first execute_reply)", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(broker_session_first_reply_seconds_bucket"
         + sel() + '[10m])))', "p50"),
        ("histogram_quantile(0.95, sum by (le) (rate(broker_session_first_reply_seconds_bucket"
         + sel() + '[10m])))', "p95")], 12),
    ("Open kernel WebSockets", "short", [
        (f"sum(broker_websocket_connections{sel()})", "all selected pods"),
        (f"broker_websocket_connections{sel()}", "{{pod}}")], 8),
    ("Kernel executions", "reqps", [
        (f"sum(rate(broker_kernel_executions_total{sel()}[5m]))", "executions/s")], 8),
    ("Execution time", "s", [
        ("histogram_quantile(0.5, sum by (le) "
         f"(rate(broker_kernel_execution_duration_seconds_bucket{sel()}[10m])))", "p50"),
        ("histogram_quantile(0.95, sum by (le) "
         f"(rate(broker_kernel_execution_duration_seconds_bucket{sel()}[10m])))", "p95")], 8),
    ("WebSocket traffic", "Bps", [
        (f"sum by (direction) (rate(broker_websocket_bytes_total{sel()}[5m]))",
         "{{direction}}")], 12),
    ("Limit refusals by reason", "reqps", [
        (f"sum by (reason) (rate(broker_limit_refusals_total{sel()}[5m]))", "{{reason}}"),
        (f"sum(rate(broker_websocket_throttled_total{sel()}[5m]))", "WebSocket throttled")], 12),
    ("Upstream errors", "reqps", [
        (f"sum by (backend, kind) (rate(broker_upstream_errors_total{sel()}[5m]))",
         "{{backend}}: {{kind}}")], 12),
    # A broker with one upstream (no BROKER_UPSTREAMS) is shown as a federation of one
    # member named after its backend, from the series every broker exports: `or on()`
    # takes the right-hand side only when the federation's own series are absent.
    ("Upstream members: sessions and health", "short", [
        (f"max by (member) (broker_upstream_sessions{sel()}) or on() label_replace("
         f"max by (backend) (sum by (pod, backend) (broker_sessions{sel(LIVE)})),"
         ' "member", "$1", "backend", "(.*)")', "{{member}} sessions"),
        (f"min by (member) (broker_upstream_up{sel()}) or on() label_replace("
         f"min by (backend) (broker_dependency_up{sel(UPSTREAM_DEP)} * on(namespace, job, pod) "
         f'group_left(backend) broker_info{sel()}), "member", "$1", "backend", "(.*)")',
         "{{member}} up (all pods)")], 12),
    ("Upstream members: spawn attempts by outcome", "reqps", [
        (f"sum by (member, outcome) (rate(broker_upstream_spawns_total{sel()}[5m])) or on() "
         f"label_replace(sum by (backend, outcome) (rate(broker_spawn_duration_seconds_count"
         f'{sel()}[5m])), "member", "$1", "backend", "(.*)")', "{{member}}: {{outcome}}")], 12),
    ("REST latency p95 by route", "s", [
        ("histogram_quantile(0.95, sum by (le, route) "
         "(rate(broker_http_request_duration_seconds_bucket" + REST +
         "[5m])))", "{{route}}")], 12),
    ("Long-lived requests p95 (/build, create with wait=true, events, execute)", "s", [
        ("histogram_quantile(0.95, sum by (le, route) "
         "(rate(broker_http_request_duration_seconds_bucket" + LONG +
         "[5m])))", "{{route}}")], 12),
    ("HTTP errors", "reqps", [
        ("sum by (route, status_class) (rate(broker_http_request_duration_seconds_count"
         + sel('status_class=~"4xx|5xx"') + '[5m]))', "{{route}} {{status_class}}")], 12),
    ("Sessions ended by reason", "short", [
        (f"sum by (reason) (increase(broker_sessions_ended_total{sel()}[1h]))", "{{reason}}")],
     8),
    ("Store latency p99", "s", [
        ("histogram_quantile(0.99, sum by (le, op) "
         f"(rate(broker_store_operation_duration_seconds_bucket{sel()}[5m])))", "{{op}}"),
        (f"sum(rate(broker_store_errors_total{sel()}[5m]))", "errors/s")], 8),
    ("Event loop lag", "s", [
        ("histogram_quantile(0.99, sum by (le, pod) "
         f"(rate(broker_event_loop_delay_seconds_bucket{sel()}[5m])))", "p99 {{pod}}"),
        (f"max by (pod) (max_over_time(broker_event_loop_lag_seconds{sel()}[5m]))",
         "max sampled {{pod}}")], 8),
    ("Dependencies up (store, upstream)", "short", [
        (f"min by (pod, dependency) (broker_dependency_up{sel()})", "{{pod}} {{dependency}}")],
     8),
    ("CPU per pod", "short", [
        (f"rate(broker_process_cpu_seconds_total{sel()}[5m])", "{{pod}} cores")], 8),
    ("Memory per pod", "bytes", [
        (f"broker_process_resident_memory_bytes{sel()}", "{{pod}} resident")], 8),
    ("Open files per pod", "short", [
        (f"broker_process_open_fds{sel()}", "{{pod}} open"),
        (f"broker_process_max_fds{sel()}", "{{pod}} limit")], 8),
]


def variable(name: str, label: str, scope: str) -> dict[str, Any]:
    """A multi-value query variable over broker_info's ``name`` label, narrowed by ``scope``."""
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": f"label_values(broker_info{scope}, {name})", "refId": name},
            "definition": f"label_values(broker_info{scope}, {name})",
            "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1}


TEMPLATING = [
    {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
    variable("namespace", "Namespace", ""),
    variable("job", "Job", '{namespace=~"$namespace"}'),
    variable("pod", "Pod", '{namespace=~"$namespace", job=~"$job"}'),
]


def render() -> str:
    """The dashboard JSON, two panels per row where widths allow."""
    panels: list[dict[str, Any]] = []
    x = y = 0
    for number, (title, unit, queries, width) in enumerate(PANELS, start=1):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": number, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": expr,
                         "legendFormat": legend} for i, (expr, legend) in enumerate(queries)],
        })
        x += width
    dashboard = {
        "title": "Session broker", "uid": "session-broker",
        "description": "jupyter-session-broker: launches, sessions, kernels, upstreams. "
        "Generated by scripts/gen-dashboard.py; metric reference in docs/metrics.md.",
        "tags": ["jupyter", "session-broker"], "timezone": "browser", "schemaVersion": 39,
        "version": 1, "editable": True, "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s", "annotations": {"list": []},
        "templating": {"list": TEMPLATING},
        "panels": panels,
    }
    return json.dumps(dashboard, indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    return write_or_check(OUTPUT, render(), args.check,
                          ".venv/bin/python scripts/gen-dashboard.py")

if __name__ == "__main__":
    sys.exit(main())
