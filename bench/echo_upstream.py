"""A stand-in for a Jupyter server's kernel channel, for benchmarking proxies.

Run as its own process (``python bench/echo_upstream.py --token T``, or the
token in ``$ECHO_UPSTREAM_TOKEN``). It binds 127.0.0.1 on a free port and,
once it accepts connections, prints ``port <N>`` on one line of stdout.
``--base-path /user/bench/`` serves everything under that prefix instead of
``/``, as a JupyterHub single-user server serves under its ``base_url`` (a
proxy routing the way JupyterHub does forwards the prefix unchanged).

What it serves (under the base path), shaped like jupyter_server so a
Jupyter proxy forwards it unchanged:

``/api/kernels/{kid}/channels`` (WebSocket)
    Echoes every text and binary frame back as it came. Accepts the
    ``v1.kernel.websocket.jupyter.org`` subprotocol when offered (the frames
    are echoed either way). No compression is negotiated.
``GET /api/status``, ``GET /api/kernels``, ``GET /api/kernels/{kid}``
    Small JSON answers, so a proxy's readiness and REST paths work.

Every request needs the token, as ``Authorization: token <T>`` (what proxies
send) or ``?token=<T>``; otherwise 403, as Jupyter answers. The token alone
is checked: any kernel id is "running", so benchmarks need no REST set-up.
It does nothing but echo, so its CPU time is the floor any upstream pays per
message; a proxy's CPU per message is compared against it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hmac
import os
import signal
import sys
from collections.abc import Coroutine

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

V1 = "v1.kernel.websocket.jupyter.org"
#: Largest frame echoed (the benchmark sends 1 MiB; proxies allow 64 MiB).
MAX_MESSAGE = 64 * 1024 * 1024
TOKEN: web.AppKey[str] = web.AppKey("token", str)
STARTED: web.AppKey[str] = web.AppKey("started", str)
CONNECTIONS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("connections", set)


def _presented_token(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() in ("token", "bearer"):
        return value.strip()
    return request.query.get("token", "")


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 unless the request carries the server's token (header or query)."""
    if not hmac.compare_digest(_presented_token(request), request.app[TOKEN]):
        return web.json_response({"message": "Forbidden", "reason": None}, status=403)
    return await handler(request)


def _kernel_model(request: web.Request, kid: str) -> dict[str, object]:
    return {
        "id": kid,
        "name": "echo",
        "last_activity": request.app[STARTED],
        "execution_state": "idle",
        "connections": len(request.app[CONNECTIONS]),
    }


async def status(request: web.Request) -> web.Response:
    """``GET /api/status`` as jupyter_server answers it."""
    return web.json_response(
        {
            "started": request.app[STARTED],
            "last_activity": request.app[STARTED],
            "connections": len(request.app[CONNECTIONS]),
            "kernels": 1,
        }
    )


async def kernels(request: web.Request) -> web.Response:
    """``GET /api/kernels``: one always-idle echo kernel."""
    return web.json_response([_kernel_model(request, "echo")])


async def kernel(request: web.Request) -> web.Response:
    """``GET /api/kernels/{kid}``: every id is an echo kernel."""
    return web.json_response(_kernel_model(request, request.match_info["kid"]))


async def channels(request: web.Request) -> web.StreamResponse:
    """The kernel WebSocket: every data frame comes straight back."""
    ws = web.WebSocketResponse(
        protocols=(V1,), max_msg_size=MAX_MESSAGE, compress=False, autoping=True
    )
    await ws.prepare(request)
    request.app[CONNECTIONS].add(ws)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            else:
                break
    finally:
        request.app[CONNECTIONS].discard(ws)
    return ws


def create_app(token: str, base_path: str = "/") -> web.Application:
    """The echo upstream under ``base_path``, answering only requests that carry ``token``."""
    base = "/" + base_path.strip("/") + "/" if base_path.strip("/") else "/"
    app = web.Application(middlewares=[require_token])
    app[TOKEN] = token
    app[STARTED] = datetime.datetime.now(datetime.UTC).isoformat()
    app[CONNECTIONS] = set()
    app.router.add_get(f"{base}api/status", status)
    app.router.add_get(f"{base}api/kernels", kernels)
    app.router.add_get(f"{base}api/kernels/{{kid}}", kernel)
    app.router.add_get(f"{base}api/kernels/{{kid}}/channels", channels)
    return app


async def serve(token: str, port: int, base_path: str = "/") -> None:
    """Listen until SIGTERM or SIGINT; announce the bound port on stdout."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(token, base_path), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        print(f"port {runner.addresses[0][1]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(main: Coroutine[None, None, None]) -> None:
    """Run on uvloop when installed (the broker does too: compare like with like)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", default=os.environ.get("ECHO_UPSTREAM_TOKEN", ""),
                        help="token clients must present (default: $ECHO_UPSTREAM_TOKEN)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 = any free)")
    parser.add_argument("--base-path", default="/",
                        help="URL prefix everything is served under (default /), e.g. "
                        "/user/bench/ like a JupyterHub single-user server")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("a token is required (--token or $ECHO_UPSTREAM_TOKEN)")
    run(serve(args.token, args.port, args.base_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
