"""A tiny Jupyter-shaped upstream and a backend that "spawns" onto it instantly.

The load tests create hundreds of sessions on a machine with two cores, so
they cannot start a ``jupyter server`` per session. What they exercise is
the broker's admission (its real HTTP API on real app instances sharing a
real Redis); the upstream only has to be a real HTTP server that answers
like Jupyter where the broker talks to it:

``GET/POST api/kernels``, ``DELETE api/kernels/{id}``, ``GET/POST api/sessions``
    an in-memory kernel list with Jupyter Server's semantics for sessions
    (an existing ``path`` or a running ``kernel.id`` starts nothing);
``api/kernels/{id}/channels`` (WebSocket)
    echoes every frame back; any kernel id is accepted;
``GET api/status``
    for liveness.

Every request needs the upstream token (``Authorization: token``), as
Jupyter requires. :class:`InstantBackend` implements the broker's
:class:`~broker.backends.base.Backend` protocol for real: its spawn yields a
``ready`` event pointing at this upstream (after an optional
:class:`SpawnGate` opens), ``stop`` is recorded, ``is_alive`` asks nothing
but is false for stopped sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSMsgType, web

from broker.backends.base import BackendContext, LostCallback
from broker.errors import UpstreamFailed
from broker.models import ProgressEvent, Session

TOKEN = "upstream-secret-token"


class FakeJupyter:
    """The upstream: one aiohttp app on a loopback port."""

    def __init__(self) -> None:
        self.kernels: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.kernel_posts = 0

    def _check(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"token {TOKEN}":
            raise web.HTTPForbidden()

    def _new_kernel(self, name: str) -> dict[str, Any]:
        kernel = {"id": uuid.uuid4().hex, "name": name or "python3",
                  "execution_state": "idle", "connections": 0}
        self.kernels[kernel["id"]] = kernel
        return kernel

    async def status(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response({"kernels": len(self.kernels)})

    async def list_kernels(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response(list(self.kernels.values()))

    async def post_kernel(self, request: web.Request) -> web.Response:
        self._check(request)
        self.kernel_posts += 1
        body = await request.json() if request.can_read_body else {}
        await asyncio.sleep(0)  # a start takes a turn of the loop, as a real one takes longer
        return web.json_response(self._new_kernel(body.get("name", "")), status=201)

    async def delete_kernel(self, request: web.Request) -> web.Response:
        self._check(request)
        self.kernels.pop(request.match_info["kid"], None)
        return web.Response(status=204)

    async def list_sessions(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response(list(self.sessions.values()))

    async def post_session(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        path = body["path"]
        for existing in self.sessions.values():
            if existing["path"] == path:
                return web.json_response(existing, status=201)
        kernel_id = (body.get("kernel") or {}).get("id")
        kernel = self.kernels.get(kernel_id) if kernel_id else None
        if kernel is None:
            kernel = self._new_kernel((body.get("kernel") or {}).get("name", ""))
        model = {"id": uuid.uuid4().hex, "path": path, "type": body.get("type", "notebook"),
                 "kernel": kernel}
        self.sessions[model["id"]] = model
        return web.json_response(model, status=201)

    async def channels(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        ws = web.WebSocketResponse(protocols=("v1.kernel.websocket.jupyter.org",),
                                   max_msg_size=0, compress=False)
        await ws.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the broker may close mid-echo
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/api/kernels", self.list_kernels)
        app.router.add_post("/api/kernels", self.post_kernel)
        app.router.add_delete("/api/kernels/{kid}", self.delete_kernel)
        app.router.add_get("/api/sessions", self.list_sessions)
        app.router.add_post("/api/sessions", self.post_session)
        app.router.add_get("/api/kernels/{kid}/channels", self.channels)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class SpawnGate:
    """Holds spawns until opened, counting how many are waiting (shared by replicas)."""

    def __init__(self, open_: bool = True) -> None:
        self.opened = asyncio.Event()
        if open_:
            self.opened.set()
        self.waiting = 0
        self.changed = asyncio.Condition()
        #: Ask the next spawns to fail instead of becoming ready.
        self.fail = False

    async def wait_for_waiting(self, count: int) -> None:
        """Until ``count`` spawns are held at the gate."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.waiting >= count)

    async def pass_through(self) -> None:
        async with self.changed:
            self.waiting += 1
            self.changed.notify_all()
        try:
            await self.opened.wait()
        finally:
            async with self.changed:
                self.waiting -= 1
                self.changed.notify_all()


class InstantBackend:
    """A :class:`~broker.backends.base.Backend` whose servers are all the one FakeJupyter."""

    name = "local"

    def __init__(self, upstream: FakeJupyter, gate: SpawnGate) -> None:
        self.upstream = upstream
        self.gate = gate
        self.on_lost: LostCallback | None = None
        self.stopped: set[str] = set()

    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        yield ProgressEvent("launching", "Starting (instantly)")
        await self.gate.pass_through()
        if self.gate.fail:
            raise UpstreamFailed("The test backend was told to fail")
        yield ProgressEvent("ready", "ready", upstream_url=self.upstream.url,
                            upstream_token=TOKEN)

    async def stop(self, session: Session) -> None:
        self.stopped.add(session.id)

    async def is_alive(self, session: Session) -> bool:
        return session.id not in self.stopped

    async def health(self) -> None:
        return None

    async def close(self) -> None:
        return None


def factory(upstream: FakeJupyter, gate: SpawnGate) -> Any:
    """A ``create_app(backend=...)`` factory: one InstantBackend per app."""

    def make(_context: BackendContext) -> InstantBackend:
        return InstantBackend(upstream, gate)

    return make
