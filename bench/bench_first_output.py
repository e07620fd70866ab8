"""First output of a new visitor: from asking the broker for a session to ``print(1)``'s output.

What a reader of a page with live cells, or an agent opening a sandbox, waits
for before anything happens. Every visitor is new (no token, no cookie), so
each one needs a server of its own: a warm-pool hit when the broker has a
ready one (``BROKER_POOL``), a spawn otherwise (a miss).

Clients, each timed from its first request to the first ``stream`` output:

``js-native``
    ``@jupyterlab/services`` under node (tests/js/first_output.mjs):
    ``POST /api/v1/sessions?wait=true``, then the server's running kernel (a
    pool entry's warm one) or a new one, ``requestExecute({code: 'print(1)'})``
    until its first iopub ``stream`` message.
``js-build``
    The same, launched through ``GET /build/...`` read as thebe's EventSource.
``py-client``
    :class:`broker.client.AgentSession`: ``start()`` then ``execute("print(1)")``
    (the execute API answers with the output once the cell is done, which for
    ``print(1)`` is its first output too).
``herd``
    ``--herd`` new visitors at the same moment through ``js-native``: every one
    must be served; p50/p95 over all of them.

Per backend: ``local`` (a broker with the local backend) and ``jupyterhub`` (a
real JupyterHub with configurable-http-proxy, started with the test suite's
own set-up, tests/hubfixture.py). That hub starts its servers as processes on
this machine, so its broker gets the local rule's spawn slots (2 per CPU)
rather than the hub default of 20, unless ``--broker-env`` says otherwise.
Each backend runs as a miss (no pool); when the broker under test has
``BROKER_POOL``, a second broker per backend runs with a pool big enough for
the herd (and one for the spec ``js-build`` launches, as large as ``--count``:
``/build`` always names a spec), waits until the pool is full before each
visitor, and measures hits.
Targets are printed beside the results.

Usage::

    .venv/bin/python bench/bench_first_output.py [--backend local|jupyterhub|both]
        [--count 5] [--herd 20] [--clients js-native,js-build,py-client] [--misses-only]
        [--json FILE] [--broker-env BROKER_X=Y ...]

``make bench-first-output`` runs it with its defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench_cell import JS_DIR, check_client
from bench_env import environment
from bench_procs import Proc, clean_env, free_port, python, spawn, wait_http

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.hubfixture: the suite's own hub set-up

from broker.client import AgentSession  # noqa: E402
from broker.settings import Settings  # noqa: E402
from broker.spawnqueue import auto_slots  # noqa: E402

SCRIPT = JS_DIR / "first_output.mjs"
#: The spec first_output.mjs launches through /build (it has its own pool in hit mode).
BUILD_SPEC = "gh/bench/first-output/HEAD"
CLIENTS = ("js-native", "js-build", "py-client")
#: Targets from the issue: a pool hit, and a herd against a pool that holds it.
TARGETS = {"hit_p50_ms": 250.0, "hit_p95_ms": 1000.0, "herd_p95_ms": 2000.0}
#: Seconds to wait for a pool to be full before a measurement.
POOL_FILL_LIMIT = 300.0


@dataclass
class Series:
    """The samples of one (backend, pool hit or miss, client)."""

    backend: str
    mode: str
    client: str
    samples_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Visitors whose spawn waited in the spawn queue (10 ms or more), from /metrics.
    queued: int = 0
    #: Visitors served from the warm pool, from /metrics (broker_pool_claims_total).
    hits: int = 0

    def percentile(self, q: float) -> float:
        """Nearest-rank quantile, as the proxy benchmark computes it."""
        if not self.samples_ms:
            return math.nan
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "mode": self.mode, "client": self.client,
                "visitors": len(self.samples_ms) + len(self.errors),
                "served": len(self.samples_ms), "queued": self.queued, "hits": self.hits,
                "p50_ms": self.percentile(0.5), "p95_ms": self.percentile(0.95),
                "max_ms": max(self.samples_ms, default=math.nan),
                "samples_ms": self.samples_ms, "errors": self.errors}


def has_pool() -> bool:
    """Whether the broker under test has warm pools (the BROKER_POOL setting)."""
    return "pool" in Settings.model_fields


# -- clients -------------------------------------------------------------------------------
async def node_visitors(node: str, broker_url: str, door: str, visitors: int,
                        limit: float) -> dict[str, Any]:
    """One node process with ``visitors`` new visitors at once; its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), broker_url, door, str(visitors), str(limit), cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit + 10)
    except BaseException:
        if proc.returncode is None:
            proc.kill()  # by its own PID
            await proc.wait()
        raise
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-5:])
        raise RuntimeError(f"first_output.mjs ({door}) exited {proc.returncode}:\n{tail}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


async def py_visitor(broker_url: str) -> float:
    """One new visitor with broker.client: milliseconds to print(1)'s output."""
    started = time.perf_counter()
    async with AgentSession(broker_url, retry_budget=0) as sandbox:
        result = await sandbox.execute("print(1)")
        elapsed = (time.perf_counter() - started) * 1000
    if not result.ok or result.stdout != "1\n":
        raise RuntimeError(f"print(1) gave {result.status}: {result.stdout!r}")
    return elapsed


# -- brokers -------------------------------------------------------------------------------
async def start_broker(tmp: Path, name: str, settings: dict[str, str]) -> tuple[Proc, str]:
    port = free_port()
    env = clean_env(BROKER_HOST="127.0.0.1", BROKER_PORT=str(port),
                    BROKER_LOCAL_ROOT_DIR=str(tmp / name / "sessions"),
                    BROKER_MAX_SESSIONS_PER_OWNER="0", BROKER_REAP_INTERVAL="3600", **settings)
    proc = spawn(name, [str(Path(python()).parent / "session-broker"), "serve"], tmp, env=env,
                 cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    await wait_http(proc, f"{url}/health", 60)
    return proc, url


async def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The broker's /metrics as {(name, labels): value}."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").split(",") if p)
        out[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


def sample(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


async def counts(url: str) -> tuple[float, float]:
    """(spawns that waited in the queue, pool hits) so far on this broker."""
    m = await samples(url)
    granted = dict(kind="visitor", outcome="granted")
    waited = (sample(m, "broker_spawn_queue_wait_seconds_count", **granted)
              - sample(m, "broker_spawn_queue_wait_seconds_bucket", le="0.01", **granted))
    hits = sum(value for (name, labels), value in m.items()
               if name == "broker_pool_claims_total" and ("outcome", "hit") in labels)
    return waited, hits


async def pool_ready(url: str, pool: str) -> int:
    """Ready entries of one pool, from /metrics (broker_pool_entries)."""
    return int(sample(await samples(url), "broker_pool_entries", pool=pool, state="ready"))


async def wait_pool(proc: Proc, url: str, size: int, pool: str = "default") -> None:
    deadline = time.monotonic() + POOL_FILL_LIMIT
    while await pool_ready(url, pool) < size:
        proc.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool did not reach {size} ready entries within "
                               f"{POOL_FILL_LIMIT:g} s")
        await asyncio.sleep(0.5)  # polled: the pool offers no event to an outside client


async def measure(node: str, backend: str, mode: str, url: str, proc: Proc, count: int,
                  herd: int, pool: int, clients: Sequence[str]) -> list[Series]:
    """Every client on one broker: ``count`` visitors one after the other, then the herd."""
    out = []
    for client in clients if count else ():
        series = Series(backend, mode, client)
        before = await counts(url)
        for _ in range(count):
            if pool and client == "js-build":  # /build always names a spec: its own pool
                await wait_pool(proc, url, count, BUILD_SPEC)
            elif pool:
                await wait_pool(proc, url, pool)
            try:
                if client == "py-client":
                    series.samples_ms.append(await py_visitor(url))
                else:
                    door = client.removeprefix("js-")
                    report = await node_visitors(node, url, door, 1, 300)
                    series.samples_ms += report["samples_ms"]
                    series.errors += report["errors"]
            except Exception as exc:  # a failed visitor is a result, not a crash
                series.errors.append(f"{type(exc).__name__}: {exc}")
        await count_into(series, url, before)
        out.append(series)
        progress(f"{backend} {mode} {client}: p50 {series.percentile(0.5):.0f} ms")
    if herd:
        if pool:
            await wait_pool(proc, url, pool)
        series = Series(backend, mode, f"herd of {herd}")
        before = await counts(url)
        report = await node_visitors(node, url, "native", herd, 600)
        series.samples_ms, series.errors = report["samples_ms"], report["errors"]
        await count_into(series, url, before)
        out.append(series)
        progress(f"{backend} {mode} herd: p95 {series.percentile(0.95):.0f} ms, "
                 f"{len(series.errors)} errors")
    return out


async def count_into(series: Series, url: str, before: tuple[float, float]) -> None:
    after = await counts(url)
    series.queued, series.hits = (round(a - b) for a, b in zip(after, before, strict=True))


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


async def run_backend(node: str, backend: str, tmp: Path, count: int, herd: int,
                      extra: dict[str, str], clients: Sequence[str],
                      hits: bool) -> list[Series]:
    hub = None
    settings = dict(extra)
    if backend == "jupyterhub":
        from tests.hubfixture import start_hub

        hub = await asyncio.to_thread(start_hub, tmp / "hub", "bench-hub")
        # The suite's hub spawns its servers as processes on this machine: its broker
        # gets the local backend's slots (a hub on a cluster would take the hub default).
        settings = {"BROKER_SPAWN_SLOTS": str(auto_slots("local"))} | settings | {
            "BROKER_BACKEND": "jupyterhub", "BROKER_HUB_URL": hub.api_url,
            "BROKER_HUB_PUBLIC_URL": hub.public_url, "BROKER_HUB_API_TOKEN": hub.service_token}
    results: list[Series] = []
    try:
        modes = [("miss", 0)] + ([("hit", max(herd, 1))] if hits and has_pool() else [])
        for mode, pool in modes:
            pools = f"default={pool}" + (f",{BUILD_SPEC}={max(count, 1)}"
                                         if "js-build" in clients else "")
            env = settings | ({"BROKER_POOL": pools} if pool else {})
            proc, url = await start_broker(tmp, f"broker-{backend}-{mode}", env)
            try:
                results += await measure(node, backend, mode, url, proc, count, herd, pool,
                                         clients)
            finally:
                proc.stop()
    finally:
        if hub is not None:
            hub.stop()
    return results


# -- report ---------------------------------------------------------------------------------
def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def report(results: Sequence[Series], count: int, herd: int) -> str:
    lines = [f"# first-output benchmark: {environment({})}",
             f"# {count} new visitors one after the other per client, then a herd of {herd} "
             "at once; milliseconds from the first request to print(1)'s first output",
             "# queued: visitors whose spawn waited 10 ms or more for a spawn slot; hits: "
             "visitors served from the warm pool (both from the broker's /metrics)",
             "", "| backend | pool | client | served | hits | queued | p50 ms | p95 ms | max ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in results:
        served = f"{len(s.samples_ms)}/{len(s.samples_ms) + len(s.errors)}"
        lines.append(f"| {s.backend} | {s.mode} | {s.client} | {served} | {s.hits} | "
                     f"{s.queued} | "
                     f"{_ms(s.percentile(0.5))} | {_ms(s.percentile(0.95))} | "
                     f"{_ms(max(s.samples_ms, default=math.nan))} |")
    lines += ["", f"targets: pool hit p50 <= {TARGETS['hit_p50_ms']:.0f} ms and p95 <= "
              f"{TARGETS['hit_p95_ms']:.0f} ms; a herd of 20 on a pool of 20 p95 <= "
              f"{TARGETS['herd_p95_ms']:.0f} ms, every visitor served"]
    for s in results:
        verdict = _verdict(s)
        if verdict:
            lines.append(f"- {s.backend} {s.client}: {verdict}")
    if not has_pool():
        lines.append("- pool hits: not measured (this broker has no BROKER_POOL yet): "
                     "every figure above is a miss")
    errors = [f"{s.backend} {s.mode} {s.client}: {e}" for s in results for e in s.errors[:3]]
    if errors:
        lines += ["", "errors:"] + [f"- {e}" for e in errors]
    return "\n".join(lines)


def _verdict(s: Series) -> str:
    if s.mode != "hit":
        return ""
    if s.client.startswith("herd"):
        met = not s.errors and s.percentile(0.95) <= TARGETS["herd_p95_ms"]
        return f"herd p95 {_ms(s.percentile(0.95))} ms: {'met' if met else 'NOT met'}"
    met = (s.percentile(0.5) <= TARGETS["hit_p50_ms"]
           and s.percentile(0.95) <= TARGETS["hit_p95_ms"])
    return (f"hit p50 {_ms(s.percentile(0.5))} / p95 {_ms(s.percentile(0.95))} ms: "
            f"{'met' if met else 'NOT met'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "jupyterhub", "both"), default="both")
    parser.add_argument("--count", type=int, default=5,
                        help="visitors per client, one after the other (default 5)")
    parser.add_argument("--herd", type=int, default=20,
                        help="visitors arriving at once (0: no herd; default 20)")
    parser.add_argument("--clients", default=",".join(CLIENTS),
                        help=f"comma-separated, of {', '.join(CLIENTS)} (default: all)")
    parser.add_argument("--misses-only", action="store_true",
                        help="no pool-hit measurement even where the broker has BROKER_POOL")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--broker-env", action="append", default=[], metavar="BROKER_X=Y",
                        help="a BROKER_* setting for the brokers under test (repeatable)")
    args = parser.parse_args(argv)
    pairs = [item.partition("=") for item in args.broker_env]
    if any(not name.startswith("BROKER_") or not sep for name, sep, _ in pairs):
        parser.error("--broker-env takes BROKER_<NAME>=<value>")
    args.extra = {name: value for name, _, value in pairs}
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not set(args.clients) <= set(CLIENTS):
        parser.error(f"--clients takes some of {', '.join(CLIENTS)}")
    return args


async def main_async(args: argparse.Namespace) -> int:
    node = check_client()
    backends = ["local", "jupyterhub"] if args.backend == "both" else [args.backend]
    tmp = Path(tempfile.mkdtemp(prefix="bench-first-output-"))
    try:
        results: list[Series] = []
        for backend in backends:
            results += await run_backend(node, backend, tmp, args.count, args.herd, args.extra,
                                         args.clients, not args.misses_only)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(results, args.count, args.herd))
    if args.json:
        args.json.write_text(json.dumps({"results": [s.as_dict() for s in results]}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
