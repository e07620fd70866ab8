"""Operational endpoints: liveness, readiness, versions and Prometheus metrics.

Readiness is about this pod, not its dependencies. ``/ready`` answers 200
while the process serves (it has started and is not draining), whatever the
state of Redis or the upstream hub: when every replica shares one Redis, a
readiness that followed it would take every pod out of the Service at once,
and browsers would get the ingress's own 503 page, without CORS headers,
instead of the broker's JSON 503 with ``Retry-After`` that the requests which
need the missing dependency get anyway (``store_unavailable``,
``upstream_unreachable``). The dependencies' states are still reported: in
``/ready``'s body and as ``broker_dependency_up{dependency=store|upstream}``,
refreshed every :data:`DEPENDENCY_EVERY` seconds in the background so a
probe never waits on a hanging dependency.

``/metrics`` and ``/versions`` are :data:`ops_routes`; with
``BROKER_METRICS_PORT`` set they are served only by :func:`create_ops_app` on
that port, and the public port answers them with 404.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker import __version__, appkeys
from broker.proxy import wire

routes = web.RouteTableDef()
ops_routes = web.RouteTableDef()
#: Longest wait for one dependency check; a slower answer counts as down.
_CHECK_TIMEOUT = 3.0
#: Seconds between background dependency checks.
DEPENDENCY_EVERY = 5.0


async def check_dependencies(app: web.Application) -> None:
    """Probe the store and the backend once; update ``/ready``'s body and the gauge."""
    probes = (
        ("store", "store", app[appkeys.STORE].ping),
        (f"backend:{app[appkeys.BACKEND].name}", "upstream", app[appkeys.BACKEND].health),
    )

    async def one(probe: Any) -> str | None:
        try:
            await asyncio.wait_for(probe(), _CHECK_TIMEOUT)
        except Exception as exc:
            return type(exc).__name__
        return None

    errors = await asyncio.gather(*(one(probe) for _, _, probe in probes))
    readiness, metrics = app[appkeys.READINESS], app[appkeys.METRICS]
    previous = {c["service"]: c for c in readiness.checks}
    checks = []
    for (service, dependency, _), error in zip(probes, errors, strict=True):
        ok = error is None
        before = previous.get(service)
        since = before["since"] if before and before["ok"] == ok else time.time()
        check: dict[str, Any] = {"service": service, "dependency": dependency, "ok": ok,
                                 "since": since}
        if error:
            check["error"] = error
        checks.append(check)
        metrics.dependency_up.labels(dependency).set(1 if ok else 0)
    readiness.checks = checks


async def _watch(app: web.Application) -> None:
    while True:
        await asyncio.sleep(DEPENDENCY_EVERY)
        await check_dependencies(app)


async def dependencies_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after the store and backend exist): a first check, then one every few s."""
    await check_dependencies(app)
    task = asyncio.create_task(_watch(app), name="dependency-checks")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def start_draining(app: web.Application) -> None:
    """on_shutdown: /ready turns 503 for whoever still asks on an open connection."""
    app[appkeys.READINESS].draining = True


@routes.get("/health", name="health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Deliberately checks nothing else."""
    return web.json_response({"ok": True, "version": __version__})


@routes.get("/ready", name="ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 unless draining; dependency states (latest check) in the body."""
    readiness = request.app[appkeys.READINESS]
    ok = not readiness.draining
    return web.json_response(
        {"ok": ok, "draining": readiness.draining,
         "dependencies_ok": all(c["ok"] for c in readiness.checks),
         "checks": readiness.checks},
        status=200 if ok else 503)


@ops_routes.get("/versions", name="versions")
async def versions(request: web.Request) -> web.Response:
    """What is running, for support requests and dashboards."""
    return web.json_response({
        "broker": __version__,
        "backend": request.app[appkeys.BACKEND].name,  # "federation" with BROKER_UPSTREAMS
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        # Whether the kernel WebSocket relay runs compiled (Cython) or as Python.
        "relay": wire.mode(request.app[appkeys.SETTINGS].ws_relay_compiled),
    })


@ops_routes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this replica's registry."""
    body = generate_latest(request.app[appkeys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_ops_app(main: web.Application) -> web.Application:
    """The BROKER_METRICS_PORT listener's app: /metrics and /versions of ``main``, a
    started broker app (its backend exists once its cleanup contexts have run)."""
    app = web.Application()
    app[appkeys.SETTINGS] = main[appkeys.SETTINGS]
    app[appkeys.METRICS] = main[appkeys.METRICS]
    app[appkeys.BACKEND] = main[appkeys.BACKEND]
    app.add_routes(ops_routes)
    return app
