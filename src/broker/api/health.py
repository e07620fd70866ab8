"""Liveness and readiness for Kubernetes probes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from broker import __version__, keys

routes = web.RouteTableDef()
_CHECK_TIMEOUT = 3.0


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Deliberately checks nothing else."""
    return web.json_response({"ok": True, "version": __version__})


@routes.get("/ready")
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
