"""Kernel-WebSocket benchmark: the same traffic direct to an upstream and through the broker.

Run ``make bench`` (or ``.venv/bin/python bench/ws_bench.py [--quick]``). One
run starts, each as its own loopback process: a private ``redis-server``, the
echo upstream (``bench/echo_upstream.py``), a plain ``jupyter server`` for the
direct real-kernel numbers, and ``session-broker serve`` (local backend, that
Redis). The broker reaches the echo upstream through a ready session written
into its Redis with the broker's own store classes; it reaches a real kernel
through a session created on its API, exactly as a visitor would.

Scenarios, each against every target (direct, broker) in the same run:

a  200-byte text frames, sequential round trips on one connection
b  the same on 64 connections at once
c  1 MiB binary frames echoed on one connection
d1 ``kernel_info_request`` round trips on a real ipykernel
d2 ``execute_request`` of ``1`` (until ``execute_reply`` and ``status: idle``)

It prints two Markdown tables: throughput and latency per target with the
ratio to direct, and CPU microseconds per round trip for each process
(client = this process, upstream, kernel, proxy = the broker, store = Redis).
A target is only a base URL, a token and the PIDs to charge, so another proxy
(configurable-http-proxy, say) is one more :class:`Target` per scenario.
Every process is stopped by its PID when the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

from bench_clients import (
    V1,
    Result,
    Target,
    connect,
    echo_concurrent,
    echo_sequential,
    kernel_sequential,
    start_kernel,
    text_payload,
    wait_kernel_ready,
)
from bench_procs import (
    Proc,
    child_running,
    clean_env,
    free_port,
    python,
    read_line,
    spawn,
    stop_pid,
    wait_http,
)
from broker.models import Session, Status, hash_token, new_session_id
from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore

HERE = Path(__file__).resolve().parent
SCENARIOS: dict[str, str] = {
    "a": "text 200 B ping-pong, 1 connection",
    "b": "text 200 B ping-pong, {connections} connections",
    "c": "binary 1 MiB echo, 1 connection",
    "d1": "real kernel: kernel_info_request",
    "d2": "real kernel: execute_request '1'",
}
REDIS_PREFIX = "bench:"
#: Seconds any process may take to become ready.
START_TIMEOUT = 60.0


@dataclass
class Config:
    round_trips: int = 2000
    connections: int = 64
    per_connection: int = 100
    binary_messages: int = 100
    kernel_round_trips: int = 200
    max_seconds: float = 10.0
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    kernel_protocol: str = "v1"
    client_ack: str = "quick"
    json_path: str = ""


QUICK = {"round_trips": 200, "per_connection": 5, "binary_messages": 8,
         "kernel_round_trips": 20, "max_seconds": 3.0}


@dataclass
class World:
    """Everything started for a run, in start order (stopped in reverse)."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    #: Grandchildren (the broker's jupyter server, kernels): PID -> command-line marker.
    strays: dict[int, str] = field(default_factory=dict)

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for pid, marker in self.strays.items():
            stop_pid(pid, marker)


# -- set-up ---------------------------------------------------------------------------------
async def wait_redis(proc: Proc, store: RedisStore) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        proc.check()
        try:
            await store.ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def insert_session(store: RedisStore, upstream_url: str, upstream_token: str,
                         broker_token: str) -> str:
    """A ready session routing to ``upstream_url``, as a spawn would have stored it."""
    now = time.time()
    session = Session(
        id=new_session_id(), token_hash=hash_token(broker_token), owner="bench",
        backend="local", created_at=now, expires_at=now + 6 * 3600, last_activity=now,
        status=Status.READY, upstream_url=upstream_url, upstream_token=upstream_token,
        message="benchmark echo upstream",
    )
    await store.create(session)
    await store.save(session)
    return session.id


async def create_broker_session(http: aiohttp.ClientSession, broker_url: str) -> dict[str, Any]:
    async with http.post(f"{broker_url}/api/v1/sessions", params={"wait": "true"}, json={},
                         timeout=aiohttp.ClientTimeout(total=START_TIMEOUT)) as resp:
        body: dict[str, Any] = await resp.json()
        if resp.status != 201 or body.get("status") != "ready":
            raise RuntimeError(f"broker session creation failed: {resp.status} {body}")
        return body


async def kernel_target(http: aiohttp.ClientSession, world: World, target: Target,
                        server_pid: int) -> Target:
    """``target`` with a fresh kernel, its PID charged as ``kernel``."""
    target = dataclasses.replace(target, kernel_id=await start_kernel(http, target))
    ws = await connect(http, target)
    try:
        await wait_kernel_ready(ws, START_TIMEOUT)
    finally:
        await ws.close()
    kernel = child_running(server_pid, "ipykernel")
    if kernel is None:
        raise RuntimeError(f"{target.name}: no kernel process under PID {server_pid}")
    world.strays[kernel] = "ipykernel"
    return dataclasses.replace(target, pids={**target.pids, "kernel": [kernel]})


# -- the run -----------------------------------------------------------------------------------
async def run(config: Config, world: World) -> list[Result]:
    want_kernel = any(s.startswith("d") for s in config.scenarios)
    echo_token, jupyter_token, broker_token = (secrets.token_urlsafe(24) for _ in range(3))
    secret = secrets.token_urlsafe(32)
    redis_port, broker_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    logs = world.tmp

    redis = world.add(spawn("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no"], logs,
                            cwd=world.tmp))
    echo = world.add(spawn("echo-upstream", [python(), str(HERE / "echo_upstream.py")], logs,
                           env=clean_env(ECHO_UPSTREAM_TOKEN=echo_token), stdout_pipe=True))
    jupyter: Proc | None = None
    jupyter_url = ""
    if want_kernel:
        jupyter_port = free_port()
        jupyter_url = f"http://127.0.0.1:{jupyter_port}/"
        (world.tmp / "direct").mkdir()
        jupyter = world.add(spawn(
            "jupyter-direct",
            [python(), "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={jupyter_port}", "--ServerApp.port_retries=0",
             "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
             f"--ServerApp.root_dir={world.tmp / 'direct'}",
             "--ServerApp.terminals_enabled=False"],
            logs, cwd=world.tmp / "direct",
            env=clean_env(JUPYTER_TOKEN=jupyter_token,
                          JUPYTER_RUNTIME_DIR=str(world.tmp / "direct" / ".runtime"))))
    broker = world.add(spawn(
        "broker", [str(Path(python()).parent / "session-broker"), "serve"], logs, cwd=world.tmp,
        env=clean_env(BROKER_HOST="127.0.0.1", BROKER_PORT=str(broker_port),
                      BROKER_REDIS_URL=redis_url, BROKER_REDIS_PREFIX=REDIS_PREFIX,
                      BROKER_SECRET_KEY=secret, BROKER_BACKEND="local",
                      BROKER_LOCAL_ROOT_DIR=str(world.tmp / "sessions"),
                      BROKER_MAX_SESSIONS_PER_OWNER="0")))
    broker_url = f"http://127.0.0.1:{broker_port}"

    echo_port = int((await read_line(echo, "port ", START_TIMEOUT)).split()[1])
    echo_url = f"http://127.0.0.1:{echo_port}/"
    store = RedisStore(redis_url, TokenCipher(secret), prefix=REDIS_PREFIX)
    try:
        await wait_redis(redis, store)
        echo_sid = await insert_session(store, echo_url, echo_token, broker_token)
    finally:
        await store.close()
    await wait_http(broker, f"{broker_url}/health", START_TIMEOUT)
    if jupyter is not None:
        await wait_http(jupyter, f"{jupyter_url}api/status", START_TIMEOUT,
                        {"Authorization": f"token {jupyter_token}"})

    echo_targets = [
        Target("direct", echo_url, echo_token, {"upstream": [echo.pid]}),
        Target("broker", f"{broker_url}/s/{echo_sid}/", broker_token,
               {"upstream": [echo.pid], "proxy": [broker.pid], "store": [redis.pid]}),
    ]
    results: list[Result] = []
    async with aiohttp.ClientSession() as http:
        kernel_targets: list[Target] = []
        real: dict[str, Any] = {}
        try:
            if jupyter is not None:
                real = await create_broker_session(http, broker_url)
                upstream = child_running(broker.pid, "jupyter_server")
                if upstream is None:
                    raise RuntimeError("the broker's session has no jupyter server process")
                world.strays[upstream] = "jupyter_server"
                kernel_targets = [
                    await kernel_target(http, world, Target(
                        "direct", jupyter_url, jupyter_token, {"upstream": [jupyter.pid]}),
                        jupyter.pid),
                    await kernel_target(http, world, Target(
                        "broker", real["base_url"], real["token"],
                        {"upstream": [upstream], "proxy": [broker.pid], "store": [redis.pid]}),
                        upstream),
                ]
            results = await scenarios(http, config, echo_targets, kernel_targets)
        finally:
            if real:  # the broker stops the session's server and kernel itself
                await http.delete(f"{broker_url}/api/v1/sessions/{real['id']}",
                                  headers={"Authorization": f"token {real['token']}"})
    return results


async def scenarios(http: aiohttp.ClientSession, config: Config, echo: Sequence[Target],
                    kernels: Sequence[Target]) -> list[Result]:
    results: list[Result] = []
    limit = config.max_seconds
    text = text_payload(200)
    blob = os.urandom(1 << 20)
    for scenario in config.scenarios:
        targets = kernels if scenario.startswith("d") else echo
        for target in targets:
            job: Coroutine[Any, Any, Result]
            if scenario == "a":
                job = echo_sequential(http, target, scenario, text, config.round_trips, limit)
            elif scenario == "b":
                job = echo_concurrent(http, target, scenario, text, config.connections,
                                      config.per_connection, limit)
            elif scenario == "c":
                job = echo_sequential(http, target, scenario, blob, config.binary_messages,
                                      limit, protocols=[V1])
            else:
                msg_type = "kernel_info_request" if scenario == "d1" else "execute_request"
                protocols = [V1] if config.kernel_protocol == "v1" else []
                ws = await connect(http, target, protocols)
                try:
                    result = await kernel_sequential(ws, target, scenario, msg_type,
                                                     config.kernel_round_trips, limit,
                                                     quickack=config.client_ack == "quick")
                finally:
                    await ws.close()
                results.append(result)
                continue
            results.append(await job)
    return results


# -- report ------------------------------------------------------------------------------------
def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2g}"


def metrics(scenario: str) -> list[tuple[str, str]]:
    """(label, Result attribute or percentile) rows shown for a scenario."""
    first = ("MiB/s", "mib_per_s") if scenario == "c" else ("round trips/s", "rate")
    return [first, ("p50 ms", "p50"), ("p99 ms", "p99")]


def value(result: Result, key: str) -> float:
    if key == "p50":
        return result.percentile(0.50)
    if key == "p99":
        return result.percentile(0.99)
    return float(getattr(result, key))


def report(config: Config, results: Sequence[Result]) -> str:
    names = list(dict.fromkeys(r.target for r in results))
    others = [n for n in names if n != "direct"]
    by = {(r.scenario, r.target): r for r in results}
    lines = [
        "| id | scenario | metric | " + " | ".join(names) + " | "
        + " | ".join(f"{n}/direct" for n in others) + " |",
        "|---|---|---|" + "---:|" * (len(names) + len(others)),
    ]
    for scenario in config.scenarios:
        label = SCENARIOS[scenario].format(connections=config.connections)
        for metric, key in metrics(scenario):
            values = [value(by[scenario, n], key) if (scenario, n) in by else None
                      for n in names]
            base = values[names.index("direct")] if "direct" in names else None
            ratios = [v / base if v is not None and base else None
                      for v in values[len(names) - len(others):]]
            lines.append(f"| {scenario} | {label} | {metric} | "
                         + " | ".join(fmt(v) for v in values) + " | "
                         + " | ".join(fmt(r) for r in ratios) + " |")
    roles = ["client", "upstream", "kernel", "proxy", "store"]
    lines += [
        "",
        "CPU per round trip (microseconds of CPU time, all threads, over the measured window):",
        "",
        "| id | target | round trips | seconds | " + " | ".join(roles)
        + " | proxy/upstream |",
        "|---|---|---:|---:|" + "---:|" * (len(roles) + 1),
    ]
    for r in results:
        cpu = {role: r.cpu_per_round_trip(role) for role in roles}
        proxy, upstream = cpu["proxy"], cpu["upstream"]
        ratio = proxy / upstream if proxy is not None and upstream else None
        lines.append(f"| {r.scenario} | {r.target} | {r.round_trips} | {r.seconds:.2f} | "
                     + " | ".join(fmt(cpu[role]) for role in roles) + f" | {fmt(ratio)} |")
    return "\n".join(lines)


def environment() -> str:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    return (f"{os.cpu_count()} CPUs, load {load}; Python {platform.python_version()}, "
            f"aiohttp {version('aiohttp')}, uvloop {version('uvloop')}, "
            f"jupyter_server {version('jupyter_server')}, ipykernel {version('ipykernel')}")


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few-second smoke run with small counts")
    parser.add_argument("-n", "--round-trips", type=int, help="scenario a round trips (2000)")
    parser.add_argument("--connections", type=int, help="scenario b connections (64)")
    parser.add_argument("--per-connection", type=int,
                        help="scenario b round trips per connection (100)")
    parser.add_argument("--binary-messages", type=int, help="scenario c 1 MiB messages (100)")
    parser.add_argument("--kernel-round-trips", type=int,
                        help="scenario d1 and d2 round trips each (200)")
    parser.add_argument("--max-seconds", type=float,
                        help="cap on each scenario's measured time per target (10)")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--kernel-protocol", choices=["v1", "json"],
                        help="real-kernel frames: v1 binary subprotocol (default) or JSON text")
    parser.add_argument("--client-ack", choices=["quick", "delayed"],
                        help="real-kernel client: TCP_QUICKACK after each read (default), or "
                        "the stock delayed ACKs of a browser, which add ~40 ms to every round "
                        "trip against jupyter_server and so hide what a proxy adds")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("round_trips", "connections", "per_connection", "binary_messages",
                 "kernel_round_trips", "max_seconds", "kernel_protocol", "client_ack",
                 "json_path"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.scenarios:
        chosen = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
        unknown = [s for s in chosen if s not in SCENARIOS]
        if unknown:
            parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
        values["scenarios"] = chosen
    return Config(**values)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds into the finally that stops every process


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(f"# kernel WebSocket benchmark: {environment()}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        world = World(Path(tmp))
        try:
            results = runner(run(config, world))
        except Exception as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            for proc in world.procs:
                print(f"--- {proc.name} log (end) ---\n{proc.tail()}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, SystemExit):
            print("benchmark interrupted; stopping its processes", file=sys.stderr)
            raise
        finally:
            world.stop()
    print(f"# real-kernel frames: {config.kernel_protocol}, client ACKs: {config.client_ack}; "
          "whole run "
          f"{time.monotonic() - started:.1f} s\n")
    print(report(config, results))
    if config.json_path:
        Path(config.json_path).write_text(json.dumps(
            {"environment": environment(), "config": config.__dict__,
             "results": [r.as_dict() for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
