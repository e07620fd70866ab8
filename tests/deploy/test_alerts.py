"""The chart's alert rules, loaded by Prometheus's own ``promtool``.

The PrometheusRule rendered from the ``z2jh`` value set (max_sessions 100,
so the capacity alert is there too) is written out as a rules file;
``promtool check rules`` parses every expression and template, and
``promtool test rules`` replays synthetic series through Prometheus's rule
engine: each alert fires on its scenario (with its labels and its rendered
annotations), does not fire before its ``for`` has elapsed, and stays quiet
on a healthy scenario, including when another release in the same
Prometheus is failing (the rules select this release's job and namespace).

promtool comes from ``scripts/setup.d/prometheus.sh`` (Debian's prometheus
package, unpacked into ``.tools/prometheus/``) when it is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT, Helm, one

PROMTOOL_DIR = ROOT / ".tools" / "prometheus"
OURS = 'namespace="jupyter", job="t-session-broker", pod="t-session-broker-1", instance="a:8765"'
# The same broker metrics from another release in the same Prometheus.
OTHER = 'namespace="other", job="other-session-broker", pod="o-1", instance="b:8765"'
POD_LABELS = {"namespace": "jupyter", "job": "t-session-broker", "pod": "t-session-broker-1",
              "instance": "a:8765"}


def series(metric: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{metric}{{{labels}}}", "values": values}


LAG_BUCKETS = ("0.001", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
               "10", "+Inf")


def loop_delay(labels: str, late_from: int) -> list[dict[str, str]]:
    """``broker_event_loop_delay_seconds`` with 60 ticks a minute, every one in the bucket
    ``LAG_BUCKETS[late_from]`` (0: on time)."""
    return [series("broker_event_loop_delay_seconds_bucket", f'{labels}, le="{le}"',
                   "0+60x40" if i >= late_from else "0+0x40")
            for i, le in enumerate(LAG_BUCKETS)]


# alert: (series when it should fire, labels it fires with, how its
#         annotation templates render, series when it should stay quiet,
#         time at which it has fired; the same series earlier than its `for`
#         must not have fired yet)
Scenario = tuple[list[dict[str, str]], dict[str, str], dict[str, str], list[dict[str, str]], str]
SCENARIOS: dict[str, Scenario] = {
    "SessionBrokerSpawnFailures": (
        [series("broker_spawn_duration_seconds_count", OURS + ', outcome="failure"', "0+3x40"),
         series("broker_spawn_duration_seconds_count", OURS + ', outcome="success"', "0+3x40")],
        {"severity": "warning"},
        {"{{ $value | humanizePercentage }}": "50%"},
        [series("broker_spawn_duration_seconds_count", OURS + ', outcome="failure"', "0+0x40"),
         series("broker_spawn_duration_seconds_count", OURS + ', outcome="success"', "0+3x40"),
         series("broker_spawn_duration_seconds_count", OTHER + ', outcome="timeout"', "0+9x40")],
        "30m"),
    "SessionBrokerCapacityRefusals": (
        [series("broker_limit_refusals_total", OURS + ', reason="capacity"', "0+2x40")],
        {"severity": "warning"}, {},
        [series("broker_limit_refusals_total", OURS + ', reason="capacity"', "0+0x40"),
         series("broker_limit_refusals_total", OURS + ', reason="creation_rate"', "0+5x40"),
         series("broker_limit_refusals_total", OTHER + ', reason="capacity"', "0+5x40")],
        "30m"),
    "SessionBrokerCapacityNearLimit": (
        # pending + ready count: 60 + 35 = 95 of max_sessions 100 (threshold 90).
        [series("broker_sessions", OURS + ', backend="jupyterhub", status="ready"', "60x40"),
         series("broker_sessions", OURS + ', backend="jupyterhub", status="pending"', "35x40"),
         series("broker_sessions", OURS + ', backend="jupyterhub", status="stopped"', "500x40")],
        {"severity": "info"}, {"{{ $value }}": "95"},
        [series("broker_sessions", OURS + ', backend="jupyterhub", status="ready"', "60x40"),
         series("broker_sessions", OURS + ', backend="jupyterhub", status="stopped"', "500x40"),
         series("broker_sessions", OTHER + ', backend="jupyterhub", status="ready"', "99x40")],
        "30m"),
    "SessionBrokerUpstreamErrors": (
        [series("broker_upstream_errors_total", OURS + ', backend="jupyterhub", kind="unreachable"',
                "0+12x40")],
        {"severity": "warning"}, {"{{ $value | humanize }}": "200m"},
        [series("broker_upstream_errors_total", OURS + ', backend="jupyterhub", kind="unreachable"',
                "0+3x40"),
         series("broker_upstream_errors_total", OTHER + ', backend="jupyterhub", kind="refused"',
                "0+60x40")],
        "30m"),
    "SessionBrokerStoreErrors": (
        [series("broker_store_errors_total", OURS + ', op="get"', "0+1x40")],
        {"severity": "critical"}, {},
        [series("broker_store_errors_total", OURS + ', op="get"', "0+0x40"),
         series("broker_store_errors_total", OTHER + ', op="get"', "0+5x40")],
        "30m"),
    "SessionBrokerDependencyDown": (
        [series("broker_dependency_up", OURS + ', dependency="store"', "0x40"),
         series("broker_dependency_up", OURS + ', dependency="upstream"', "1x40")],
        {"severity": "critical", "pod": "t-session-broker-1", "dependency": "store"},
        {"{{ $labels.pod }}": "t-session-broker-1", "{{ $labels.dependency }}": "store"},
        # Both up here; another release's store is down.
        [series("broker_dependency_up", OURS + ', dependency="store"', "1x40"),
         series("broker_dependency_up", OURS + ', dependency="upstream"', "1x40"),
         series("broker_dependency_up", OTHER + ', dependency="store"', "0x40")],
        "30m"),
    "SessionBrokerEventLoopLag": (
        # One tick a second, every one 2.5-5 s late.
        loop_delay(OURS, late_from=10),
        {"severity": "warning", "pod": "t-session-broker-1"},
        {"{{ $labels.pod }}": "t-session-broker-1", "{{ $value | humanizeDuration }}": "4.975s"},
        # Ticks on time (under 1 ms); another release's loop is stuck.
        [*loop_delay(OURS, late_from=0), *loop_delay(OTHER, late_from=10)],
        "30m"),
    "SessionBrokerDown": (
        [series("up", OURS, "0x40")],
        {"severity": "critical", **POD_LABELS},
        {"{{ $labels.pod }}": "t-session-broker-1"},
        [series("up", OURS, "1x40"), series("up", OTHER, "0x40")],
        "30m"),
    "SessionBrokerPodsNotReady": (
        [series("kube_deployment_status_replicas_unavailable",
                'namespace="jupyter", deployment="t-session-broker", job="kube-state-metrics"',
                "1x40")],
        {"severity": "warning", "namespace": "jupyter", "deployment": "t-session-broker",
         "job": "kube-state-metrics"},
        {"{{ $value }}": "1"},
        [series("kube_deployment_status_replicas_unavailable",
                'namespace="jupyter", deployment="t-session-broker", job="kube-state-metrics"',
                "0x40"),
         series("kube_deployment_status_replicas_unavailable",
                'namespace="jupyter", deployment="hub", job="kube-state-metrics"', "1x40")],
        "30m"),
}


@pytest.fixture(scope="module")
def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    binary = PROMTOOL_DIR / "promtool"
    if not binary.exists():  # `make test` runs the setup steps first; this keeps the file whole
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.d" / "prometheus.sh")],
                       check=True, cwd=ROOT, timeout=600)
    assert binary.exists(), "scripts/setup.d/prometheus.sh did not install promtool"
    return binary


@pytest.fixture(scope="module")
def groups(helm: Helm) -> list[dict[str, Any]]:
    rule = one(helm.template("z2jh"), "PrometheusRule")
    found: list[dict[str, Any]] = rule["spec"]["groups"]
    return found


def _alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _expected_annotations(rule: dict[str, Any], rendered: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, text in rule.get("annotations", {}).items():
        for template, value in rendered.items():
            text = text.replace(template, value)
        assert "{{" not in text, f"{rule['alert']}: unrendered template left in {key}: {text}"
        out[key] = text
    return out


def _minutes(duration: str) -> int:
    return int(duration[:-1]) * {"m": 1, "h": 60}[duration[-1]]


def _run(promtool: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_the_alerts_the_issue_asks_for_exist(groups: list[dict[str, Any]]) -> None:
    alerts = _alerts(groups)
    assert set(alerts) == set(SCENARIOS), "every alert needs a scenario below (and vice versa)"
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_promtool_check_rules_accepts_every_rule(promtool: Path, groups: list[dict[str, Any]],
                                                 tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    proc = _run(promtool, ["check", "rules", "rules.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts(groups))} rules found" in proc.stdout

    # promtool is strict enough to matter: a broken expression fails the check.
    broken = yaml.safe_load(yaml.safe_dump(groups))
    broken[0]["rules"][0]["expr"] = "sum(rate(broker_store_errors_total[5m]) > 0"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"groups": broken}))
    assert _run(promtool, ["check", "rules", "broken.yaml"], tmp_path).returncode != 0


def _unit_tests(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    alerts = _alerts(groups)
    tests = []
    for name, (firing, labels, rendered, quiet, at) in SCENARIOS.items():
        rule = alerts[name]
        expected = {"exp_labels": labels,
                    "exp_annotations": _expected_annotations(rule, rendered)}
        early = f"{max(_minutes(rule.get('for', '0m')) - 1, 1)}m"
        tests.append({"name": f"{name} fires", "interval": "1m", "input_series": firing,
                      "alert_rule_test": [
                          {"eval_time": early, "alertname": name, "exp_alerts": []},
                          {"eval_time": at, "alertname": name, "exp_alerts": [expected]}]})
        tests.append({"name": f"{name} stays quiet", "interval": "1m", "input_series": quiet,
                      "alert_rule_test": [{"eval_time": at, "alertname": name,
                                           "exp_alerts": []}]})
    return tests


def test_promtool_test_rules_every_alert_fires_when_it_should_and_not_otherwise(
        promtool: Path, groups: list[dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
            "tests": _unit_tests(groups)}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    proc = _run(promtool, ["test", "rules", "tests.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout

    # The harness can fail: the healthy series of every alert, claimed to fire, fail the run.
    lying = {**unit, "tests": [
        {"interval": "1m", "input_series": quiet,
         "alert_rule_test": [{"eval_time": at, "alertname": name,
                              "exp_alerts": [{"exp_labels": labels}]}]}
        for name, (_, labels, _, quiet, at) in SCENARIOS.items()]}
    (tmp_path / "lying.yaml").write_text(yaml.safe_dump(lying, sort_keys=False))
    proc = _run(promtool, ["test", "rules", "lying.yaml"], tmp_path)
    assert proc.returncode != 0
    assert proc.stdout.count("FAILED") + proc.stderr.count("FAILED") >= 1
    for name in SCENARIOS:
        assert f"alertname: {name}," in proc.stdout + proc.stderr, name


def test_capacity_alert_follows_max_sessions(helm: Helm) -> None:
    """Without a session cap there is no limit to be near; the refusal alert still applies."""
    sets = {"serviceMonitor.enabled": True, "prometheusRule.enabled": True}
    capped = _alerts(one(helm.template(sets={**sets, "config.max_sessions": 40}),
                         "PrometheusRule")["spec"]["groups"])
    assert "> 36" in capped["SessionBrokerCapacityNearLimit"]["expr"]
    uncapped = _alerts(one(helm.template(sets=sets), "PrometheusRule")["spec"]["groups"])
    assert "SessionBrokerCapacityNearLimit" not in uncapped
    assert "SessionBrokerCapacityRefusals" in uncapped
