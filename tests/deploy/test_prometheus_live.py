"""A real Prometheus scrapes a real broker under traffic: the dashboard and the alert
rules work on the series it actually exports (issue #16).

``session-broker serve`` (local backend, an empty warm pool) is scraped every second by the
``prometheus`` binary (``scripts/setup.d/prometheus.sh``), with the target
labels a ServiceMonitor gives (``namespace``, ``job``, ``pod``). After a
launch, a proxied REST call and a delete, every dashboard expression, with
its variables set to this release, returns data, and the panels the traffic
touched show finite values; with another namespace selected they are empty
(the variables really scope them). The chart's alert rules are loaded into
the same Prometheus and every one evaluates without error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.brokerproc import broker_process
from tests.conftest import free_port
from tests.deploy.conftest import CHART, ROOT, Helm, one

PROMETHEUS = ROOT / ".tools" / "prometheus" / "prometheus"
TARGET = {"namespace": "jupyter", "job": "t-session-broker", "pod": "t-session-broker-0"}


def _binary() -> Path:
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    if not PROMETHEUS.exists():  # `make test` runs the setup steps first
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.d" / "prometheus.sh")],
                       check=True, cwd=ROOT, timeout=600)
    assert PROMETHEUS.exists(), "scripts/setup.d/prometheus.sh did not install prometheus"
    return PROMETHEUS


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def scoped(expr: str, namespace: str = TARGET["namespace"]) -> str:
    return (expr.replace("$namespace", namespace).replace("$job", TARGET["job"])
            .replace("$pod", TARGET["pod"]))


class Prometheus:
    """The HTTP API of a Prometheus started for one test."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}{path}", params=params) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["status"] == "success", (path, params, body)
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def until(self, expr: str, deadline: float = 30) -> list[dict[str, Any]]:
        """Poll (an external process, bounded) until ``expr`` returns data."""
        end = time.monotonic() + deadline
        while True:
            result = await self.query(expr)
            if result:
                return result
            assert time.monotonic() < end, f"no data for {expr} within {deadline} s"
            await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, broker_port: int, rules: Path) -> AsyncIterator[Prometheus]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": "broker",
            # What a ServiceMonitor's target carries: the Service's name as job.
            "honor_labels": False,
            "static_configs": [{"targets": [f"127.0.0.1:{broker_port}"], "labels": {
                "namespace": TARGET["namespace"], "pod": TARGET["pod"]}}],
            "relabel_configs": [{"target_label": "job", "replacement": TARGET["job"]}],
        }],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(_binary()), f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 30
            while True:  # bounded wait for an external process
                assert proc.returncode is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < end, "prometheus did not become ready"
                await asyncio.sleep(0.2)
            yield Prometheus(url, http)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


@pytest.mark.timeout(110)
async def test_dashboard_and_alerts_on_a_real_prometheus_scraping_a_real_broker(
        helm: Helm, tmp_path: Path) -> None:
    groups = one(helm.template("z2jh"), "PrometheusRule")["spec"]["groups"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    scrapes = f'count_over_time(up{{job="{TARGET["job"]}"}}[1m]) >= 3'

    metrics_port = free_port()  # scraped there, as the chart's ServiceMonitor does
    # A warm pool configured but empty (no extra server), so the pool panels have their
    # pre-created series and the launch is a miss that spawns; the
    # federation panels fall back to the single upstream's own series.
    env = {"BROKER_METRICS_PORT": str(metrics_port), "BROKER_POOL": "default=0"}
    async with broker_process(tmp_path, env) as broker, \
            prometheus(tmp_path, metrics_port, rules) as prom:
        [up] = await prom.until(f'up{{job="{TARGET["job"]}"}} == 1')
        assert {k: up["metric"][k] for k in TARGET} == TARGET
        await prom.until(scrapes)

        # Traffic: a launch that waits for its spawn, a proxied REST call, a delete.
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{broker.url}/api/v1/sessions", params={"wait": "true"}) as r:
                assert r.status == 201, await r.text()
                session = await r.json()
            headers = {"Authorization": f"token {session['token']}"}
            async with http.get(f"{session['base_url']}api/status", headers=headers) as r:
                assert r.status == 200, await r.text()
            async with http.get(f"{broker.url}/api/v1/sessions/{session['id']}",
                                headers=headers) as r:
                assert r.status == 200, await r.text()
            async with http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                   headers=headers) as r:
                assert r.status in (200, 204), await r.text()
        # The scrapes after the traffic.
        await prom.until('sum(broker_session_creations_total{outcome="created"}) >= 1')
        await prom.until('sum(broker_sessions_ended_total) >= 1')
        await prom.until(
            'sum(rate(broker_http_request_duration_seconds_count{route="session_delete"}[1m]))'
            ' > 0')

        # The dashboard's variables: label_values(broker_info, ...) finds this release.
        for label in ("namespace", "job", "pod"):
            values = await prom.get(f"/api/v1/label/{label}/values", **{"match[]": "broker_info"})
            assert TARGET[label] in values, (label, values)

        # Every expression is valid and returns data for this release, none for another.
        empty = []
        for title, expr in dashboard_expressions():
            if not await prom.query(scoped(expr)):
                empty.append((title, expr))
            assert not await prom.query(scoped(expr, namespace="elsewhere")), (title, expr)
        assert not empty, f"dashboard expressions without data: {empty}"

        # Panels the traffic touched show finite numbers.
        exprs = dict(dashboard_expressions())  # title -> its first expression
        launches = await prom.query(scoped(exprs["Launches by outcome"]))
        assert any(r["metric"].get("outcome") == "created" and float(r["value"][1]) > 0
                   for r in launches), launches
        spawn = await prom.query(scoped(exprs["Spawn latency"]))
        assert all(math.isfinite(v) and v > 0 for v in _values(spawn)), spawn
        [rest] = [e for t, e in exprs.items() if t.startswith("REST latency")]
        rest_routes = {r["metric"]["route"]: float(r["value"][1])
                       for r in await prom.query(scoped(rest))}
        assert math.isfinite(rest_routes["session_delete"]), rest_routes
        assert "sessions_create" not in rest_routes
        [long] = [e for t, e in exprs.items() if t.startswith("Long-lived")]
        long_routes = {r["metric"]["route"]: float(r["value"][1])
                       for r in await prom.query(scoped(long))}
        assert math.isfinite(long_routes["sessions_create"]), long_routes
        assert "session_delete" not in long_routes

        # The alert rules evaluate on the real series without error.
        end = time.monotonic() + 20
        while True:
            loaded = (await prom.get("/api/v1/rules"))["groups"]
            evaluated = [r for g in loaded for r in g["rules"]]
            if evaluated and all(r["health"] != "unknown" for r in evaluated):
                break  # every rule evaluated at least once
            assert time.monotonic() < end, evaluated
            await asyncio.sleep(0.25)
        names = {r["alert"] for g in groups for r in g["rules"]}
        assert {r["name"] for r in evaluated} == names
        unhealthy = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
        assert not unhealthy, unhealthy
