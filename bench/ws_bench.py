"""Proxy benchmark: the same traffic direct, through configurable-http-proxy, and the broker.

Run ``make bench`` (or ``.venv/bin/python bench/ws_bench.py [--quick]``). One
run starts, each as its own loopback process: a private ``redis-server``, the
echo upstream (``bench/echo_upstream.py``), a plain ``jupyter server`` for the
direct and CHP real-kernel numbers, configurable-http-proxy (CHP) started
and routed as JupyterHub does (``bench/bench_chp.py``), and
``session-broker serve`` (local backend, that Redis). The echo upstream and
that jupyter server are two JupyterHub-style "users", serving under
``/user/bench/`` and ``/user/bench-kernel/``, the prefixes CHP forwards
unchanged; "direct" uses the same paths. The broker reaches the echo
upstream through a ready session written into its Redis with the broker's
own store classes; it reaches a real kernel through a session created on its
API, exactly as a visitor would.

Scenarios, each against every target (direct, chp, broker) in the same run:

a   200-byte text frames, sequential round trips on one connection
b   the same on 64 connections at once
c   1 MiB binary frames echoed on one connection
c64 the same on 64 connections at once (a few MiB per connection)
h1  HTTP GET ``api/kernels`` (Jupyter REST), sequential, one keep-alive connection
h64 the same on 64 connections at once
d1  ``kernel_info_request`` round trips on a real ipykernel
d2  ``execute_request`` of ``1`` (until ``execute_reply`` and ``status: idle``)

Each scenario runs in ``--rounds`` interleaved rounds (3; ``--quick`` 1): every
round gives every target a share of the counts and of the time cap, in an
order rotated from round to round, so that the machine's load drifting
during a run does not land on one target; a target's rounds are added up, and
the verdict gives the range over the rounds of its ratios. The notebook cell
is measured the same way (one node process per target, protocol and round).

Then, with ``--idle N``, the idle footprint: N kernel WebSockets held open
through the broker (and CHP) and the proxy's RSS per connection
(``bench/bench_idle.py``). It prints Markdown tables (``bench/bench_report.py``):
throughput and latency per target with ratios, CPU microseconds per round
trip for each process (client = this process, upstream, kernel, proxy = CHP
or the broker, store = Redis), the idle footprint, and a verdict against the
issue's targets (informative: the exit status is 0 either way). A target is
only a base URL, a token and the PIDs to charge, so another proxy is one
more :class:`Target` per scenario. Every process is stopped by its PID when
the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import bench_limits
from bench_cell import PROTOCOLS, CellResult, cells
from bench_chp import start_chp, user_prefix
from bench_clients import (
    V1,
    Result,
    Target,
    connect,
    echo_concurrent,
    echo_sequential,
    kernel_sequential,
    merge,
    rotated,
    start_kernel,
    text_payload,
    wait_kernel_ready,
)
from bench_env import environment, load_average
from bench_http import http_concurrent
from bench_idle import IdleResult, idle_capacity, idle_footprint, raise_nofile
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
from bench_report import cell_report, idle_report, report, verdict
from broker.models import Session, Status, hash_token, new_session_id
from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore

HERE = Path(__file__).resolve().parent
SCENARIOS: dict[str, str] = {
    "a": "text 200 B ping-pong, 1 connection",
    "b": "text 200 B ping-pong, {connections} connections",
    "c": "binary 1 MiB echo, 1 connection",
    "c64": "binary 1 MiB echo, {connections} connections",
    "h1": "HTTP GET api/kernels, 1 connection",
    "h64": "HTTP GET api/kernels, {connections} connections",
    "d1": "real kernel: kernel_info_request",
    "d2": "real kernel: execute_request '1'",
}
REDIS_PREFIX = "bench:"
#: JupyterHub-style user names: the echo upstream's and the real jupyter_server's.
ECHO_USER, KERNEL_USER = "bench", "bench-kernel"
#: Seconds any process may take to become ready.
START_TIMEOUT = 60.0
# The local backend starts each session's server as `python -m broker.localserver`.
LOCAL_SERVER = "broker.localserver"


@dataclass
class Config:
    round_trips: int = 2000
    connections: int = 64
    per_connection: int = 1200
    binary_messages: int = 100
    binary_per_connection: int = 4
    http_requests: int = 2000
    http_per_connection: int = 600
    kernel_round_trips: int = 200
    cell_round_trips: int = 200
    cell_protocols: tuple[str, ...] = PROTOCOLS
    max_seconds: float = 10.0
    #: Interleaved rounds: each runs a share of every count on every target, the
    #: targets' order rotated from round to round (see :func:`scenarios`).
    rounds: int = 3
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    kernel_protocol: str = "v1"
    client_ack: str = "delayed"
    idle: int = 5000
    idle_seconds: float = 60.0
    idle_settle: float = 1.0
    json_path: str = ""
    #: (name, value) pairs added to the broker's environment (BROKER_* settings).
    broker_env: tuple[tuple[str, str], ...] = ()
    limits: bool = False
    #: The 'raw' byte-copying relay as a fourth echo target (off in --quick).
    floor: bool = True


QUICK = {"round_trips": 200, "per_connection": 5, "binary_messages": 8,
         "binary_per_connection": 1, "http_requests": 200, "http_per_connection": 5,
         "kernel_round_trips": 20, "cell_round_trips": 10, "max_seconds": 3.0,
         "idle": 100, "idle_seconds": 20.0, "idle_settle": 0.2, "rounds": 1,
         "floor": False}
#: The REST call of scenarios h1 and h64 (a client polling its kernels).
HTTP_PATH = "api/kernels"


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


def progress(message: str) -> None:
    """What the run is doing now, on stderr (stdout carries only the report)."""
    print(f"... {message}", file=sys.stderr, flush=True)


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
@dataclass
class Outcome:
    results: list[Result] = field(default_factory=list)
    cells: list[CellResult] = field(default_factory=list)
    idle: list[IdleResult] = field(default_factory=list)
    #: The running broker's GET /versions.
    versions: dict[str, Any] = field(default_factory=dict)


async def run(config: Config, world: World) -> Outcome:
    want_kernel = (any(s.startswith("d") for s in config.scenarios)
                   or config.cell_round_trips > 0)
    echo_token, jupyter_token, broker_token = (secrets.token_urlsafe(24) for _ in range(3))
    secret = secrets.token_urlsafe(32)
    redis_port, broker_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    logs = world.tmp
    # Upstream paths, as JupyterHub's single-user servers serve them and CHP forwards them.
    echo_prefix, kernel_prefix = user_prefix(ECHO_USER), user_prefix(KERNEL_USER)

    progress("starting redis, the echo upstream, "
             + ("a jupyter server, " if want_kernel else "") + "configurable-http-proxy and "
             "the broker")
    redis = world.add(spawn("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                      "127.0.0.1", "--save", "", "--appendonly", "no"], logs,
                            cwd=world.tmp))
    echo = world.add(spawn("echo-upstream", [python(), str(HERE / "echo_upstream.py"),
                                             "--base-path", echo_prefix], logs,
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
             f"--ServerApp.base_url={kernel_prefix}",
             "--ServerApp.open_browser=False", "--ServerApp.allow_root=True",
             f"--ServerApp.root_dir={world.tmp / 'direct'}",
             "--ServerApp.terminals_enabled=False"],
            logs, cwd=world.tmp / "direct",
            env=clean_env(JUPYTER_TOKEN=jupyter_token,
                          JUPYTER_RUNTIME_DIR=str(world.tmp / "direct" / ".runtime"))))
    chp = start_chp(logs, world.tmp)
    world.add(chp.proc)
    broker = world.add(spawn(
        "broker", [str(Path(python()).parent / "session-broker"), "serve"], logs, cwd=world.tmp,
        env=clean_env(BROKER_HOST="127.0.0.1", BROKER_PORT=str(broker_port),
                      BROKER_REDIS_URL=redis_url, BROKER_REDIS_PREFIX=REDIS_PREFIX,
                      BROKER_SECRET_KEY=secret, BROKER_BACKEND="local",
                      BROKER_LOCAL_ROOT_DIR=str(world.tmp / "sessions"),
                      BROKER_MAX_SESSIONS_PER_OWNER="0",
                      # Every connection of a scenario is one session's (64, or the idle
                      # scenario's thousands): no per-session WebSocket cap.
                      BROKER_WS_SESSION_MAX_CONNECTIONS="0",
                      # The echo session is injected, not spawned by this broker's
                      # local backend: its reconciliation sweep would (rightly) end it.
                      BROKER_REAP_INTERVAL="3600", **dict(config.broker_env))))
    broker_url = f"http://127.0.0.1:{broker_port}"

    echo_port = int((await read_line(echo, "port ", START_TIMEOUT)).split()[1])
    echo_origin = f"http://127.0.0.1:{echo_port}/"
    store = RedisStore(redis_url, TokenCipher(secret), prefix=REDIS_PREFIX)
    try:
        await wait_redis(redis, store)
        echo_sid = await insert_session(store, echo_origin + echo_prefix[1:], echo_token,
                                        broker_token)
    finally:
        await store.close()
    progress("waiting for them to answer (routes on CHP, the broker's /health)")
    await chp.route_hub(START_TIMEOUT)
    chp_echo = await chp.add_user(ECHO_USER, echo_origin)
    chp_kernel = await chp.add_user(KERNEL_USER, jupyter_url) if jupyter_url else ""
    await wait_http(broker, f"{broker_url}/health", START_TIMEOUT)
    outcome = Outcome()
    async with aiohttp.ClientSession() as http, http.get(f"{broker_url}/versions") as resp:
        outcome.versions = await resp.json()
    if jupyter is not None:
        await wait_http(jupyter, f"{jupyter_url}{kernel_prefix[1:]}api/status", START_TIMEOUT,
                        {"Authorization": f"token {jupyter_token}"})

    proxy_pids = {"chp": {"proxy": [chp.proc.pid]},
                  "broker": {"proxy": [broker.pid], "store": [redis.pid]}}
    echo_targets = [
        Target("direct", echo_origin + echo_prefix[1:], echo_token, {"upstream": [echo.pid]}),
        Target("chp", chp_echo, echo_token, {"upstream": [echo.pid], **proxy_pids["chp"]}),
        Target("broker", f"{broker_url}/s/{echo_sid}/", broker_token,
               {"upstream": [echo.pid], **proxy_pids["broker"]}),
    ]
    if config.floor:
        raw = world.add(spawn("raw-relay", [python(), str(HERE / "raw_relay.py"), "--upstream",
                                            f"127.0.0.1:{echo_port}"], logs, stdout_pipe=True))
        raw_port = int((await read_line(raw, "port ", START_TIMEOUT)).split()[1])
        echo_targets.append(Target("raw", f"http://127.0.0.1:{raw_port}{echo_prefix}",
                                   echo_token, {"upstream": [echo.pid], "proxy": [raw.pid]}))
    async with aiohttp.ClientSession() as http:
        kernel_targets: list[Target] = []
        real: dict[str, Any] = {}
        try:
            if jupyter is not None:
                progress("creating a broker session and starting kernels")
                real = await create_broker_session(http, broker_url)
                upstream = child_running(broker.pid, LOCAL_SERVER)
                if upstream is None:
                    raise RuntimeError("the broker's session has no jupyter server process")
                world.strays[upstream] = LOCAL_SERVER
                direct = await kernel_target(http, world, Target(
                    "direct", jupyter_url + kernel_prefix[1:], jupyter_token,
                    {"upstream": [jupyter.pid]}), jupyter.pid)
                # CHP reaches the same server and kernel as direct: only the hop differs.
                kernel_targets = [
                    direct,
                    dataclasses.replace(direct, name="chp", base_url=chp_kernel,
                                        pids={**direct.pids, **proxy_pids["chp"]}),
                    await kernel_target(http, world, Target(
                        "broker", real["base_url"], real["token"],
                        {"upstream": [upstream], **proxy_pids["broker"]}), upstream),
                ]
            outcome.results = await scenarios(http, config, echo_targets, kernel_targets)
            if config.cell_round_trips > 0:
                # What a page's client waits for, direct and through the broker (each
                # node run starts its own kernel on the target's server).
                progress("notebook cells with @jupyterlab/services: "
                         + ", ".join(f"{t.name} {p}" for t in kernel_targets
                                     if t.name in ("direct", "broker")
                                     for p in config.cell_protocols))
                outcome.cells = await cells(
                    [t for t in kernel_targets if t.name in ("direct", "broker")],
                    config.cell_protocols, config.cell_round_trips, config.max_seconds,
                    config.rounds)
            if config.idle > 0:
                outcome.idle = await idle(config, echo_targets)
        finally:
            if real:  # the broker stops the session's server and kernel itself
                await http.delete(f"{broker_url}/api/v1/sessions/{real['id']}",
                                  headers={"Authorization": f"token {real['token']}"})
    return outcome


async def idle(config: Config, targets: Sequence[Target]) -> list[IdleResult]:
    """The idle footprint through each proxy (the broker first: it is the one judged)."""
    count = idle_capacity(config.idle)
    if count < config.idle:
        print(f"# idle: RLIMIT_NOFILE leaves room for {count} proxied connections, not "
              f"{config.idle}", flush=True)
    found = []
    for name in ("broker", "chp"):
        for target in targets:
            if target.name == name:
                progress(f"idle footprint: opening {count} kernel WebSockets through {name}")
                found.append(await idle_footprint(target, count, config.idle_seconds,
                                                  config.idle_settle))
    return found


async def scenarios(http: aiohttp.ClientSession, config: Config, echo: Sequence[Target],
                    kernels: Sequence[Target]) -> list[Result]:
    """Every scenario on every target, in ``config.rounds`` interleaved rounds.

    Each round runs a share of the scenario's counts (and of its time cap) on
    every target, in an order rotated from round to round, so a change in the
    machine's load during the run is spread over all targets instead of
    landing on whichever ran last; each target's rounds are then added up
    (:func:`merge`).
    """
    results: list[Result] = []
    text = text_payload(200)
    blob = os.urandom(1 << 20)
    rounds = max(1, config.rounds)
    for scenario in config.scenarios:
        targets = list(kernels if scenario.startswith("d") else echo)
        runs: dict[str, list[Result]] = {t.name: [] for t in targets}
        for n in range(rounds):
            for target in rotated(targets, n):
                progress(f"scenario {scenario} through {target.name}"
                         + (f" (round {n + 1} of {rounds})" if rounds > 1 else ""))
                runs[target.name].append(
                    await one_scenario(http, config, scenario, target, text, blob, rounds))
        results += [merge(runs[t.name]) for t in targets]
    return results


async def one_scenario(http: aiohttp.ClientSession, config: Config, scenario: str,
                       target: Target, text: str, blob: bytes, rounds: int) -> Result:
    """One round of ``scenario`` on ``target``: a ``1/rounds`` share of its counts and time."""
    def share(count: int) -> int:
        return max(1, math.ceil(count / rounds))

    limit = config.max_seconds / rounds
    if scenario == "a":
        return await echo_sequential(http, target, scenario, text, share(config.round_trips),
                                     limit)
    if scenario == "b":
        return await echo_concurrent(http, target, scenario, text, config.connections,
                                     share(config.per_connection), limit)
    if scenario == "c":
        return await echo_sequential(http, target, scenario, blob,
                                     share(config.binary_messages), limit, protocols=[V1])
    if scenario == "c64":
        return await echo_concurrent(http, target, scenario, blob, config.connections,
                                     share(config.binary_per_connection), limit, protocols=[V1])
    if scenario == "h1":
        return await http_concurrent(target, scenario, HTTP_PATH, 1,
                                     share(config.http_requests), limit)
    if scenario == "h64":
        return await http_concurrent(target, scenario, HTTP_PATH, config.connections,
                                     share(config.http_per_connection), limit)
    msg_type = "kernel_info_request" if scenario == "d1" else "execute_request"
    protocols = [V1] if config.kernel_protocol == "v1" else []
    ws = await connect(http, target, protocols)
    try:
        return await kernel_sequential(ws, target, scenario, msg_type,
                                       share(config.kernel_round_trips), limit,
                                       quickack=config.client_ack == "quick")
    finally:
        await ws.close()


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few-second smoke run with small counts")
    parser.add_argument("-n", "--round-trips", type=int, help="scenario a round trips (2000)")
    parser.add_argument("--connections", type=int,
                        help="connections of scenarios b, c64 and h64 (64)")
    parser.add_argument("--per-connection", type=int,
                        help="scenario b round trips per connection (1200)")
    parser.add_argument("--binary-messages", type=int, help="scenario c 1 MiB messages (100)")
    parser.add_argument("--binary-per-connection", type=int,
                        help="scenario c64 1 MiB messages per connection (4)")
    parser.add_argument("--http-requests", type=int, help="scenario h1 GET requests (2000)")
    parser.add_argument("--http-per-connection", type=int,
                        help="scenario h64 GET requests per connection (600)")
    parser.add_argument("--kernel-round-trips", type=int,
                        help="scenario d1 and d2 round trips each (200)")
    parser.add_argument("--cell-round-trips", type=int,
                        help="notebook cells timed with @jupyterlab/services under node, per "
                        "target (direct, broker) and protocol (200; 0 skips them)")
    parser.add_argument("--cell-protocols",
                        help="comma-separated kernel protocols of the cell measurement "
                        "(v1,json): v1 binary frames, the client's default, and/or JSON text")
    parser.add_argument("--max-seconds", type=float,
                        help="cap on each scenario's measured time per target (10), shared "
                        "by its rounds")
    parser.add_argument("--rounds", type=int,
                        help="interleaved rounds (3; --quick: 1): each runs a share of every "
                        "count on every target, the order of the targets rotated from round to "
                        "round; the report adds them up and gives the range over the rounds "
                        "of the verdict's ratios and of the cell p50")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--kernel-protocol", choices=["v1", "json"],
                        help="real-kernel frames: v1 binary subprotocol (default) or JSON text")
    parser.add_argument("--client-ack", choices=["delayed", "quick"],
                        help="real-kernel client: the stock delayed ACKs of a browser or any "
                        "Linux client (default; ~40 ms per round trip directly against "
                        "jupyter_server, which leaves Nagle on), or TCP_QUICKACK after each "
                        "read, which shows the server's own latency")
    parser.add_argument("--idle", type=int,
                        help="kernel WebSockets held open through each proxy for the idle "
                        "footprint (5000; 0 skips it)")
    parser.add_argument("--idle-seconds", type=float,
                        help="cap on the time spent opening them, per proxy (60)")
    parser.add_argument("--limits", action="store_true",
                        help="instead of the full run: scenario a through the broker with its "
                        "limits off and on, and the ratio (bench/bench_limits.py, ~10 s)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction,
                        help="a 'raw' target for the echo scenarios: a relay that only copies "
                        "bytes (bench/raw_relay.py), the floor for a proxy in Python (on, "
                        "except with --quick)")
    parser.add_argument("--broker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a BROKER_* setting for the broker under test (repeatable), e.g. "
                        "the relay's pure-Python switch; the header names every one")
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("round_trips", "connections", "per_connection", "binary_messages",
                 "binary_per_connection", "http_requests", "http_per_connection",
                 "kernel_round_trips", "cell_round_trips", "max_seconds", "rounds",
                 "kernel_protocol",
                 "client_ack",
                 "idle", "idle_seconds", "json_path"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["limits"] = args.limits
    pairs = [item.partition("=") for item in args.broker_env]
    if any(not name.startswith("BROKER_") or not sep for name, sep, _ in pairs):
        parser.error("--broker-env takes BROKER_<NAME>=<value>")
    values["broker_env"] = tuple((name, value) for name, _, value in pairs)
    if args.floor is not None:
        values["floor"] = args.floor
    if args.cell_protocols:
        protocols = tuple(p.strip() for p in args.cell_protocols.split(",") if p.strip())
        if not protocols or any(p not in PROTOCOLS for p in protocols):
            parser.error(f"--cell-protocols: choose from {list(PROTOCOLS)}")
        values["cell_protocols"] = protocols
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
    if config.limits:
        return bench_limits.run(5, config.round_trips, config.max_seconds)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    nofile = raise_nofile()  # before any child starts: they inherit it
    # Before anything starts: the load is the machine's, not the run's.
    header = environment(dict(config.broker_env))
    print(f"# proxy benchmark: {header}; open files {nofile}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        world = World(Path(tmp))
        try:
            outcome: Outcome = runner(run(config, world))
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
    relay = {k: v for k, v in outcome.versions.items() if "relay" in k.lower()}
    print("# relay in use, as the broker's GET /versions says: "
          f"{json.dumps(relay) if relay else 'no relay field'}; broker "
          f"settings from --broker-env: {dict(config.broker_env) or 'none'}")
    print(f"# real-kernel frames: {config.kernel_protocol}, client ACKs: {config.client_ack}; "
          f"whole run {time.monotonic() - started:.1f} s; load average at the end "
          f"{load_average()[0]:.2f} (the run's own included)\n")
    labels = {s: SCENARIOS[s].format(connections=config.connections) for s in SCENARIOS}
    print(report(config.scenarios, labels, outcome.results))
    if outcome.cells:
        print("\n" + cell_report(outcome.cells, outcome.results, config.kernel_protocol))
    if outcome.idle:
        print("\n" + idle_report(outcome.idle))
    print("\n" + verdict(outcome.results, outcome.idle, config.client_ack, outcome.cells))
    if config.json_path:
        Path(config.json_path).write_text(json.dumps(
            {"environment": header, "config": config.__dict__, "versions": outcome.versions,
             "results": [r.as_dict() for r in outcome.results],
             "cells": [r.as_dict() for r in outcome.cells],
             "idle": [r.as_dict() for r in outcome.idle]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
