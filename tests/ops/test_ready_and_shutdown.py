"""Readiness follows Redis; SIGTERM drains kernel sockets with 1001 and keeps sessions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import aiohttp
import pytest

from broker.models import Status
from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore
from tests.conftest import MakeBroker, free_port


def start_redis(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            return proc
    raise AssertionError("redis-server did not start")


@pytest.fixture
def own_redis() -> Iterator[tuple[int, list[subprocess.Popen[str]]]]:
    """A Redis this test may stop and restart (never the shared one)."""
    port = free_port()
    procs = [start_redis(port)]
    yield port, procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


async def test_ready_flips_with_redis(make_broker: MakeBroker, own_redis) -> None:
    port, procs = own_redis
    broker = await make_broker(redis_url=f"redis://127.0.0.1:{port}/0", secret_key="k")
    async with broker.http.get(f"{broker.url}/ready") as resp:
        assert resp.status == 200
    procs[0].terminate()
    procs[0].wait(10)
    async with broker.http.get(f"{broker.url}/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    failing = [c["service"] for c in body["checks"] if not c["ok"]]
    assert failing == ["store"]
    async with broker.http.get(f"{broker.url}/health") as resp:
        assert resp.status == 200  # liveness does not depend on Redis
    procs.append(start_redis(port))
    async with broker.http.get(f"{broker.url}/ready") as resp:
        assert resp.status == 200


async def test_sigterm_drains_websockets_and_keeps_sessions(redis_url: str, tmp_path) -> None:
    port = free_port()
    prefix = f"s{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "BROKER_PORT": str(port), "BROKER_REDIS_URL": redis_url,
           "BROKER_SECRET_KEY": "shutdown-test", "BROKER_REDIS_PREFIX": prefix,
           "BROKER_SHUTDOWN_DRAIN": "2", "BROKER_LOCAL_ROOT_DIR": str(tmp_path),
           "BROKER_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "serve", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await asyncio.wait_for(proc.stdout.readline(), 30)  # "Broker listening on ..."
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/v1/sessions?wait=true",
                                 headers={"X-Request-Id": "trace-abc-123"}) as resp:
                assert resp.status == 201
                assert resp.headers["X-Request-Id"] == "trace-abc-123"
                session = await resp.json()
            token = session["token"]
            async with http.post(f"{session['base_url']}api/kernels?token={token}",
                                 json={"name": "python3"}) as resp:
                kernel = (await resp.json())["id"]
            ws = await http.ws_connect(f"{session['ws_url']}api/kernels/{kernel}/channels",
                                       params={"token": token})
            loop = asyncio.get_running_loop()
            sent = loop.time()
            proc.send_signal(signal.SIGTERM)
            closing = await ws.receive(timeout=20)
            while closing.type is aiohttp.WSMsgType.TEXT:  # kernel chatter on connect
                closing = await ws.receive(timeout=20)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert closing.data == 1001
            await ws.close()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert loop.time() - sent < 2 + 5  # the drain period plus process teardown
    finally:
        if proc.returncode is None:
            # Gracefully first: a SIGKILLed broker cannot stop its local servers.
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    logs = (await proc.stderr.read()).decode()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert lines, logs
    traced = [line for line in lines if line.get("request_id") == "trace-abc-123"]
    assert any(line.get("event") == "request" and line["status"] == 201 for line in traced)
    assert token not in logs
    assert any("[secret]" in line.get("path", "") for line in lines)
    store = RedisStore(redis_url, TokenCipher("shutdown-test"), prefix=prefix)
    try:
        kept = await store.get(session["id"])
        assert kept is not None and kept.status is Status.READY
    finally:
        await store.close()
