"""/metrics after real traffic: counters move by the right amounts, with the right labels."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker import appkeys
from tests.conftest import BrokerHarness, MakeBroker
from tests.kernelproto import execute


async def scrape(broker: BrokerHarness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with broker.http.get(f"{broker.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_follow_real_traffic(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_sessions_per_owner=2)
    before = await scrape(broker)
    # Every labelled series exists before any traffic (pre-created at zero).
    assert value(before, "broker_session_creations_total", outcome="refused",
                 reason="owner_sessions") == 0
    assert ("broker_websocket_messages_total",
            (("channel", "iopub"), ("direction", "to_client"))) in before

    session = await broker.ready_session()
    status, _ = await broker.create(token=session["token"])  # reuse
    assert status == 200
    await broker.ready_session()
    status, refused = await broker.create()  # third live session for this owner
    assert status == 429 and refused["reason"] == "owner_sessions"

    kernel = await broker.start_kernel(session)
    async with broker.http.ws_connect(f"{session['ws_url']}api/kernels/{kernel}/channels",
                                      params={"token": session["token"]}) as ws:
        result = await execute(ws, "print(6*7)")
        assert result.stdout == "42\n"
    # The bridge flushes its tallies as it unregisters; wait for that, not for time.
    await asyncio.wait_for(broker.manager._no_connections.wait(), 10)
    after = await scrape(broker)

    creations = "broker_session_creations_total"
    assert value(after, creations, outcome="created", reason="none") == 2
    assert value(after, creations, outcome="reused", reason="none") == 1
    assert value(after, creations, outcome="refused", reason="owner_sessions") == 1
    assert value(after, "broker_spawn_duration_seconds_count", backend="local",
                 outcome="success") == 2
    assert value(after, "broker_spawns_in_progress", backend="local") == 0
    assert value(after, "broker_kernel_executions_total") == 1
    assert value(after, "broker_kernel_execution_duration_seconds_count") == 1
    assert value(after, "broker_websocket_messages_total", direction="to_kernel",
                 channel="shell") == 1
    # busy, execute_input, stream, idle on iopub; execute_reply on shell
    assert value(after, "broker_websocket_messages_total", direction="to_client",
                 channel="iopub") >= 4
    assert value(after, "broker_websocket_messages_total", direction="to_client",
                 channel="shell") >= 1
    assert value(after, "broker_websocket_bytes_total", direction="to_kernel",
                 channel="shell") > 100
    assert value(after, "broker_websocket_connections") == 0
    assert value(after, "broker_http_request_duration_seconds_count",
                 route="sessions_create", status_class="2xx") == 3
    assert value(after, "broker_http_request_duration_seconds_count",
                 route="sessions_create", status_class="4xx") == 1
    assert value(after, "broker_http_request_duration_seconds_count",
                 route="jupyter_ws", status_class="2xx") == 1
    assert value(after, "broker_store_operation_duration_seconds_count", op="create") == 2
    # Cluster-wide session gauge, refreshed from the store.
    from broker.api.gauges import refresh_sessions
    await refresh_sessions(broker.app[appkeys.MANAGER])
    gauged = await scrape(broker)
    assert value(gauged, "broker_sessions", backend="local", status="ready") == 2
    # No label carries a session id, IP or path.
    text_labels = " ".join(str(k[1]) for k in after)
    assert session["id"] not in text_labels and "127.0.0.1" not in text_labels


async def test_failures_are_counted(make_broker: MakeBroker) -> None:
    broker = await make_broker(local_server_args=["--ServerApp.port=not-a-port"])
    status, body = await broker.create()
    assert status == 502, body
    samples = await scrape(broker)
    assert value(samples, "broker_session_creations_total", outcome="failed",
                 reason="upstream_failed") == 1
    assert value(samples, "broker_upstream_errors_total", backend="local", kind="spawn") == 1
    assert value(samples, "broker_spawn_duration_seconds_count", backend="local",
                 outcome="failure") == 1
