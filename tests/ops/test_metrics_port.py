"""BROKER_METRICS_PORT: /metrics and /versions on their own listener, gone from the public one.

A real ``session-broker serve`` (the CLI wires the second listener) with both
ports on loopback; the public port keeps serving the API, /health and /ready.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.brokerproc import broker_process
from tests.conftest import free_port


async def test_metrics_and_versions_move_to_their_own_port(tmp_path: Path) -> None:
    metrics_port = free_port()
    async with broker_process(tmp_path, {"BROKER_METRICS_PORT": str(metrics_port)}) as broker, \
            aiohttp.ClientSession() as http:
        ops = f"http://127.0.0.1:{metrics_port}"
        async with http.get(f"{ops}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        assert 'broker_dependency_up{dependency="store"} 1.0' in text
        assert "broker_http_request_duration_seconds_bucket" in text
        async with http.get(f"{ops}/versions") as resp:
            assert resp.status == 200
            assert (await resp.json())["backend"] == "local"
        # The metrics listener serves nothing else.
        for path in ("/health", "/ready", "/api/v1/sessions", "/"):
            async with http.get(f"{ops}{path}") as resp:
                assert resp.status == 404, path

        # The public port: no metrics, no versions; everything else as before.
        for path in ("/metrics", "/versions"):
            async with http.get(f"{broker.url}{path}") as resp:
                assert resp.status == 404, path
                assert (await resp.json())["reason"] == "not_found"
        for path in ("/health", "/ready"):
            async with http.get(f"{broker.url}{path}") as resp:
                assert resp.status == 200, path

        # One registry behind both: a public request shows up on the metrics port.
        async with http.get(f"{ops}/metrics") as resp:
            text = await resp.text()
        assert 'broker_http_request_duration_seconds_count{route="ready",status_class="2xx"} 1.0' \
            in text
        assert any("metrics and versions on 127.0.0.1:" in line for line in broker.log_lines())

