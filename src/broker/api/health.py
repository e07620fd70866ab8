"""Operational endpoints: liveness, readiness, versions and Prometheus metrics."""

from __future__ import annotations

import asyncio
import platform

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker import __version__, keys
from broker.proxy import wire

routes = web.RouteTableDef()
_CHECK_TIMEOUT = 3.0


@routes.get("/health", name="health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Deliberately checks nothing else."""
    return web.json_response({"ok": True, "version": __version__})


@routes.get("/ready", name="ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: the store and the selected backend both answer (503 names the failing one)."""
    checks = []
    for name, probe in (
        ("store", request.app[keys.STORE].ping),
        (f"backend:{request.app[keys.BACKEND].name}", request.app[keys.BACKEND].health),
    ):
        try:
            await asyncio.wait_for(probe(), _CHECK_TIMEOUT)
            checks.append({"service": name, "ok": True})
        except Exception as exc:
            checks.append({"service": name, "ok": False, "error": type(exc).__name__})
    ok = all(c["ok"] for c in checks)
    return web.json_response({"ok": ok, "checks": checks}, status=200 if ok else 503)


@routes.get("/versions", name="versions")
async def versions(request: web.Request) -> web.Response:
    """What is running, for support requests and dashboards."""
    return web.json_response({
        "broker": __version__,
        "backend": request.app[keys.BACKEND].name,  # "federation" with BROKER_UPSTREAMS
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        # Whether the kernel WebSocket relay runs compiled (Cython) or as Python.
        "relay": wire.mode(request.app[keys.SETTINGS].ws_relay_compiled),
    })


@routes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this replica's registry."""
    body = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
