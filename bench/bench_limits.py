"""What the limits cost per kernel WebSocket message: scenario a with limits off and on.

Run ``.venv/bin/python bench/ws_bench.py --limits`` (or this file directly,
``--quick`` for a smoke run). It starts, as loopback processes stopped by
PID: a private ``redis-server``, the echo upstream, and two
``session-broker serve`` on that Redis — one with the defaults (no
per-connection limiter at all), one with every limit configured: the
per-connection WebSocket buckets (rates high enough never to throttle, so
what is measured is the limiter's per-message bookkeeping, not waiting), and
the admission limits, deny list and kernel cap (which act on the upgrade
request or on session creation, not per message).

Both brokers reach the echo upstream through the same ready session written
into their Redis, and the same client runs scenario a (200-byte text frames,
sequential round trips on one connection) against them in alternating
rounds, so drift on a shared machine hits both alike. It prints, per
broker, the median throughput, the pooled p50 latency and the broker's CPU
microseconds per round trip, then the ratio limits-on / limits-off. A ratio
near 1.0 means the limiter is lost in the relay's own per-message cost.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench_clients import Result, Target, echo_sequential, text_payload
from bench_procs import Proc, clean_env, free_port, python, read_line, spawn, wait_http
from broker.models import Session, Status, hash_token, new_session_id
from broker.policy.wsrate import WsLimits
from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore

HERE = Path(__file__).resolve().parent
PREFIX = "bench-limits:"
START_TIMEOUT = 60.0
#: Every limit on; WebSocket rates far above what one connection can send here.
LIMITS_ON = {
    "BROKER_WS_CLIENT_MESSAGES_PER_SECOND": "1000000",
    "BROKER_WS_CLIENT_MESSAGE_BURST": "100000",
    "BROKER_WS_CLIENT_BYTES_PER_SECOND": "1000000000",
    "BROKER_WS_CLIENT_BYTE_BURST": "1000000000",
    "BROKER_WS_CLIENT_MAX_MESSAGE_SIZE": "1048576",
    "BROKER_MAX_SESSIONS": "1000",
    "BROKER_MAX_SESSIONS_PER_OWNER": "10",
    "BROKER_MAX_CREATIONS_PER_OWNER": "100",
    "BROKER_MAX_CONCURRENT_SPAWNS": "20",
    "BROKER_MAX_KERNELS_PER_SESSION": "4",
    "BROKER_DENY_NETWORKS": "192.0.2.0/24,2001:db8::/32",
}


async def insert_session(redis_url: str, secret: str, upstream_url: str, upstream_token: str,
                         broker_token: str) -> str:
    """A ready session routing to ``upstream_url``, as a spawn would have stored it."""
    store = RedisStore(redis_url, TokenCipher(secret), prefix=PREFIX)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                await store.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        now = time.time()
        session = Session(
            id=new_session_id(), token_hash=hash_token(broker_token), owner="bench",
            backend="local", created_at=now, expires_at=now + 6 * 3600, last_activity=now,
            status=Status.READY, upstream_url=upstream_url, upstream_token=upstream_token)
        await store.create(session)
        await store.save(session)
        return session.id
    finally:
        await store.close()


async def measure(procs: list[Proc], tmp: Path, rounds: int, round_trips: int,
                  max_seconds: float) -> dict[str, list[Result]]:
    echo_token, broker_token, secret = (secrets.token_urlsafe(24) for _ in range(3))
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs.append(spawn("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no"], tmp, cwd=tmp))
    echo = spawn("echo-upstream", [python(), str(HERE / "echo_upstream.py")], tmp,
                 env=clean_env(ECHO_UPSTREAM_TOKEN=echo_token), stdout_pipe=True)
    procs.append(echo)
    brokers: dict[str, tuple[Proc, str]] = {}
    for name, extra in (("limits off", {}), ("limits on", LIMITS_ON)):
        port = free_port()
        env = {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": str(port),
               "BROKER_REDIS_URL": redis_url, "BROKER_REDIS_PREFIX": PREFIX,
               "BROKER_SECRET_KEY": secret, "BROKER_LOG_LEVEL": "WARNING",
               "BROKER_MAX_SESSIONS_PER_OWNER": "0",
               "BROKER_REAP_INTERVAL": "3600"} | extra  # injected session: no sweeps
        proc = spawn(name.replace(" ", "-"), [str(Path(python()).parent / "session-broker"),
                                              "serve"], tmp, cwd=tmp, env=clean_env(**env))
        procs.append(proc)
        brokers[name] = (proc, f"http://127.0.0.1:{port}")
    echo_port = int((await read_line(echo, "port ", START_TIMEOUT)).split()[1])
    sid = await insert_session(redis_url, secret, f"http://127.0.0.1:{echo_port}/", echo_token,
                               broker_token)
    targets = []
    for name, (proc, url) in brokers.items():
        await wait_http(proc, f"{url}/health", START_TIMEOUT)
        targets.append(Target(name, f"{url}/s/{sid}/", broker_token,
                              {"upstream": [echo.pid], "proxy": [proc.pid]}))
    results: dict[str, list[Result]] = {t.name: [] for t in targets}
    text = text_payload(200)
    async with aiohttp.ClientSession() as http:
        for n in range(rounds):
            # Alternate which goes first, so neither always runs on a warmer machine.
            for target in targets if n % 2 == 0 else targets[::-1]:
                results[target.name].append(
                    await echo_sequential(http, target, "a", text, round_trips, max_seconds))
    return results


def _cpu(results: Sequence[Result]) -> float:
    spent = sum(r.cpu.get("proxy", 0.0) for r in results)
    trips = sum(r.round_trips for r in results)
    return spent / trips * 1e6 if trips else float("nan")


def _p50(results: Sequence[Result]) -> float:
    latencies = sorted(ns for r in results for ns in r.latencies_ns)
    return latencies[len(latencies) // 2] / 1e6 if latencies else float("nan")


def take_cost() -> float:
    """Nanoseconds per ``WsLimiter.take`` on the fast path, timed in this process.

    The end-to-end ratio moves by several percent with the machine's noise;
    this is the part of it that is the limiter's own.
    """
    limiter = WsLimits(messages_per_second=1e9, message_burst=10**9, bytes_per_second=1e12,
                       byte_burst=10**12).new()
    take = limiter.take
    calls = 1_000_000
    best = min(timeit.repeat(lambda: take(200), number=calls, repeat=5))
    return best / calls * 1e9


def report(results: dict[str, list[Result]]) -> str:
    """The comparison table and the one number asked for: the ratio on/off."""
    off, on = results["limits off"], results["limits on"]
    rows = [
        "| broker | rounds | round trips/s (median) | p50 ms | proxy CPU µs per round trip |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        rows.append(f"| {name} | {len(runs)} | {statistics.median(r.rate for r in runs):.0f} | "
                    f"{_p50(runs):.3f} | {_cpu(runs):.1f} |")
    cpu_ratio = _cpu(on) / _cpu(off)
    rate_ratio = statistics.median(r.rate for r in on) / statistics.median(r.rate for r in off)
    take_ns = take_cost()
    rows += ["", f"limits on / off: proxy CPU per message {cpu_ratio:.3f}, "
             f"throughput {rate_ratio:.3f}, p50 latency {_p50(on) / _p50(off):.3f}",
             f"WsLimiter.take alone: {take_ns:.0f} ns per message, "
             f"{take_ns / 10 / _cpu(off):.2f}% of the broker's CPU per round trip with "
             "limits off (two messages, one limited)"]
    return "\n".join(rows)


def run(rounds: int = 3, round_trips: int = 2000, max_seconds: float = 10.0) -> int:
    """Start everything, measure, print; every process is stopped by its PID at the end."""
    print("# limiter cost: scenario a through the broker, limits off vs on", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        procs: list[Proc] = []
        try:
            import uvloop  # the client on uvloop, as in ws_bench.py

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        try:
            results = runner(measure(procs, Path(tmp), rounds, round_trips, max_seconds))
        except Exception as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            for proc in procs:
                print(f"--- {proc.name} log (end) ---\n{proc.tail()}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):
                proc.stop()
    print(report(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200 round trips")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (5)")
    parser.add_argument("-n", "--round-trips", type=int, default=None,
                        help="round trips per round (2000)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    trips = args.round_trips or (200 if args.quick else 2000)
    return run(rounds, trips, 3.0 if args.quick else 10.0)


if __name__ == "__main__":
    sys.exit(main())
