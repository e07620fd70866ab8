"""A BinderHub stand-in for the broker's tests, written from docs/protocols.md.

BinderHub needs Kubernetes and a registry, which cannot run here, so this is
its launch API as docs/protocols.md#binderhub-launch-api describes it, with
*real* user servers behind it: every launch starts a local ``jupyter
server`` under ``/user/{name}/`` with a token of its own, so whatever the
broker does with the ready event (proxying REST, kernel WebSockets) runs
against a real Jupyter server. ``tests/binder/test_standin.py`` keeps it
faithful.

What it does, as BinderHub does it:

* ``GET /build/{provider}/{spec}``: the spec from the raw path (``%2F``
  stays escaped); every answer is HTTP 200 ``text/event-stream`` of unnamed
  ``data: {json}`` events whose messages end in a newline. Errors are
  ``failed`` events: 400 without ``Accept: text/event-stream``; no
  status_code for an unknown provider, an unresolvable ref or a quota
  ("Too many users running {repo_url}! Try again soon.", "Too many users on
  this BinderHub! Try again soon."); 429 "Rate limit exceeded. Try again in
  N seconds." past ``rate_limit`` launches per client IP in a fixed window,
  with ``x-ratelimit-limit/-remaining/-reset`` headers on every answer.
* Phases ``waiting`` → ``fetching`` → ``building`` (log lines, one with a
  capitalised phase, one without a phase, one with an unknown phase) →
  ``pushing`` → ``built`` (``imageName``) → ``launching`` (hub progress,
  "Launch attempt N failed, retrying...", "Server ready at /user/{name}/")
  → ``ready`` with every ready
  field. A repo/ref built before starts at ``built`` ("Found built image,
  launching...").
* ``:keepalive`` comments every ``keepalive`` seconds; after a *build* the
  stream is held open ``hold_open`` seconds (BinderHub's 60 s), so a client
  that does not close on ``ready`` is noticed: :attr:`Launch.client_left`
  is set when the client hangs up first.
* ``GET /health``, ``GET /versions``; the hub API's ``DELETE
  /hub/api/users/{name}/server`` (``hub_token`` required) stops a server.

Knobs for tests: ``chatty`` (a keepalive after every event), ``gate`` (an
event a launch waits for before ``launching``), ``launch_failures``,
``fail_builds``, quotas and the rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

PROVIDERS = ("gh", "gl", "git", "gist", "zenodo", "figshare", "dataverse", "hydroshare", "ckan")
LAUNCH_RETRIES = 3
VERSION = "1.0.0+standin"


class LaunchFailed(Exception):
    """Ends a launch with a failed event (message, optional status_code)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclass
class Launch:
    """What one /build request saw and was sent (for tests to inspect)."""

    spec: str
    client_ip: str
    headers: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Set when the client hung up before the stand-in ended the stream.
    client_left: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the handler is done, however it ended.
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def phases(self) -> list[str]:
        return [str(e.get("phase", "")) for e in self.events]


@dataclass
class UserServer:
    """One launched ``jupyter server`` process."""

    name: str
    repo_url: str
    url: str
    token: str
    proc: asyncio.subprocess.Process
    workdir: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _repo_url(provider: str, spec: str) -> str:
    """BinderHub's repo_url per provider (unresolved, as its providers report it)."""
    if provider == "gh":
        user, repo, _ref = spec.split("/", 2)
        return f"https://github.com/{user}/{repo}"
    if provider == "gl":
        return f"https://gitlab.com/{unquote(spec.split('/', 1)[0])}"
    if provider == "git":
        return unquote(spec.split("/", 1)[0])
    if provider == "gist":
        user, gist_id = spec.split("/")[:2]
        return f"https://gist.github.com/{user}/{gist_id}"
    if provider in ("zenodo", "figshare", "dataverse"):
        return f"https://doi.org/{unquote(spec)}"
    if provider == "hydroshare":
        return f"https://www.hydroshare.org/resource/{spec}"
    return unquote(spec)


class BinderStandin:
    """A running BinderHub stand-in on a loopback port."""

    def __init__(
        self,
        root: Path,
        *,
        keepalive: float = 25.0,
        hold_open: float = 60.0,
        rate_limit: int = 10,
        rate_period: float = 3600.0,
        repo_quota: int = 0,
        total_quota: int = 0,
        hub_token: str | None = None,
    ) -> None:
        self.root = root
        self.keepalive = keepalive
        self.hold_open = hold_open
        self.rate_limit = rate_limit
        self.rate_period = rate_period
        self.repo_quota = repo_quota
        self.total_quota = total_quota
        #: The hub API token that may stop servers (random unless given).
        self.hub_token = hub_token or secrets.token_hex(16)
        self.chatty = False
        self.gate: asyncio.Event | None = None
        self.launch_failures = 0
        self.fail_builds: set[str] = set()
        self.launches: list[Launch] = []
        self.servers: dict[str, UserServer] = {}
        self.stopped: list[str] = []
        self.built_images: set[str] = set()
        self._windows: dict[str, tuple[float, int]] = {}
        self._drains: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/build/{provider}/{spec:.+}", self._build)
        app.router.add_get("/health", self._health)
        app.router.add_get("/versions", self._versions)
        app.router.add_delete("/hub/api/users/{name}/server", self._stop_server)
        # Cancelling the handler when its client disconnects is how a held-open
        # stream notices that the client closed first.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._http = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        """Stop every server and the API; safe to call twice."""
        await asyncio.gather(*(self._terminate(name) for name in list(self.servers)))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- the launch API ---------------------------------------------------------------------
    async def _build(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path.split("?", 1)[0]
        provider = request.match_info["provider"]
        spec = raw[len(f"/build/{provider}/"):].rstrip("/")
        launch = Launch(spec=f"{provider}/{spec}", client_ip=request.remote or "",
                        headers=dict(request.headers))
        self.launches.append(launch)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        limited = self._count_launch(request.remote or "", response)
        await response.prepare(request)
        keepalive = asyncio.create_task(self._keepalive_loop(response))
        try:
            hold = await self._launch(request, response, launch, provider, spec, limited)
            if hold:
                # Well-behaved clients close on ready; wait for them, sending keepalives.
                await asyncio.sleep(self.hold_open)
            await response.write_eof()
        except LaunchFailed as failure:
            data: dict[str, Any] = {"phase": "failed", "message": failure.message + "\n"}
            if failure.status_code is not None:
                data["status_code"] = failure.status_code
            await self._emit(response, launch, data)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            launch.client_left.set()
            raise
        finally:
            keepalive.cancel()
            launch.finished.set()
        return response

    def _count_launch(self, ip: str, response: web.StreamResponse) -> int | None:
        """Fixed-window rate limit per client IP; seconds to wait if exceeded."""
        now = time.time()
        start, count = self._windows.get(ip, (now, 0))
        if now >= start + self.rate_period:
            start, count = now, 0
        count += 1
        self._windows[ip] = (start, count)
        reset = start + self.rate_period
        response.headers["x-ratelimit-limit"] = str(self.rate_limit)
        response.headers["x-ratelimit-remaining"] = str(max(0, self.rate_limit - count))
        response.headers["x-ratelimit-reset"] = str(int(reset))
        return max(1, int(reset - now)) if count > self.rate_limit else None

    async def _launch(
        self,
        request: web.Request,
        response: web.StreamResponse,
        launch: Launch,
        provider: str,
        spec: str,
        limited: int | None,
    ) -> bool:
        """Run one launch; True if the stream should then be held open (after a build)."""
        if "text/event-stream" not in request.headers.get("Accept", ""):
            raise LaunchFailed("Bad Request", status_code=400)
        if provider not in PROVIDERS:
            raise LaunchFailed(f"No provider found for prefix {provider}")
        if provider == "gh" and len(spec.split("/", 2)) != 3:
            raise LaunchFailed(f"Spec is not of the form 'user/repo/ref', provided: {spec}")
        if limited is not None:
            raise LaunchFailed(f"Rate limit exceeded. Try again in {limited} seconds.",
                               status_code=429)
        if "does-not-exist" in spec:
            raise LaunchFailed(
                f"Could not resolve ref for {provider}:{spec}. Double check your URL.")
        repo_url = _repo_url(provider, spec)
        # "Resolving" the ref: a stable fake commit id per spec.
        resolved = hashlib.sha256(f"{provider}/{spec}".encode()).hexdigest()[:40]
        if provider == "gh":
            user, repo, _ref = spec.split("/", 2)
            persistent = f"gh/{user}/{repo}/{resolved}"
        else:
            persistent = f"{provider}/{spec}"
        slug = hashlib.sha256(repo_url.encode()).hexdigest()[:12]
        image = f"standin-registry/binder-{slug}:{resolved}"
        built = image in self.built_images
        if built:
            await self._emit(response, launch, {"phase": "built", "imageName": image,
                                                "message": "Found built image, launching...\n"})
        else:
            await self._fake_build(response, launch, spec, image)
        await self._check_quota(repo_url)
        if self.gate is not None:
            await self.gate.wait()
        await self._emit(response, launch, {"phase": "launching",
                                            "message": "Launching server...\n"})
        server = await self._launch_server(response, launch, repo_url)
        # BinderHub relays the hub's progress, whose last message names the server's path.
        await self._emit(response, launch, {"phase": "launching",
                                            "message": f"Server ready at /user/{server.name}/\n"})
        ready = {
            "phase": "ready",
            "message": f"server running at {server.url}\n",
            "url": server.url,
            "token": server.token,
            "image": image,
            "repo_url": repo_url,
            "binder_ref_url": f"{repo_url}/tree/{resolved}",
            "binder_launch_host": f"{self.url}/",
            "binder_request": f"v2/{provider}/{spec}",
            "binder_persistent_request": f"v2/{persistent}",
            "binder_client_ip": request.remote or "",
        }
        await self._emit(response, launch, ready)
        return not built

    async def _fake_build(self, response: web.StreamResponse, launch: Launch, spec: str,
                          image: str) -> None:
        emit = self._emit
        await emit(response, launch, {"phase": "waiting",
                                      "message": "Waiting for build to start...\n"})
        await emit(response, launch, {"phase": "fetching", "message": "Fetching repository...\n"})
        await emit(response, launch, {"phase": "Building", "message": "Step 1/3 : FROM base\n"})
        await emit(response, launch, {"message": "a build log line without a phase\n"})
        await emit(response, launch, {"phase": "Unknown"})
        if any(name in spec for name in self.fail_builds):
            raise LaunchFailed("Error during build: repo2docker exited with code 1")
        await emit(response, launch, {"phase": "pushing", "progress": {"layer": "1/1"},
                                      "message": "Pushing image\n"})
        self.built_images.add(image)
        await emit(response, launch, {"phase": "built", "imageName": image,
                                      "message": "Built image, launching...\n"})

    async def _check_quota(self, repo_url: str) -> None:
        running = [s for s in self.servers.values() if s.proc.returncode is None]
        if self.repo_quota and sum(s.repo_url == repo_url for s in running) >= self.repo_quota:
            raise LaunchFailed(f"Too many users running {repo_url}! Try again soon.")
        if self.total_quota and len(running) >= self.total_quota:
            raise LaunchFailed("Too many users on this BinderHub! Try again soon.")

    async def _launch_server(self, response: web.StreamResponse, launch: Launch,
                             repo_url: str) -> UserServer:
        for attempt in range(1, LAUNCH_RETRIES + 1):
            await self._emit(response, launch, {"phase": "launching",
                                                "message": "Server requested\n"})
            if attempt <= self.launch_failures:
                if attempt == LAUNCH_RETRIES:
                    # BinderHub lets the last error escape: tornado's send_error, status 500.
                    raise LaunchFailed("Internal Server Error", status_code=500)
                await self._emit(response, launch, {
                    "phase": "launching",
                    "message": f"Launch attempt {attempt} failed, retrying...\n"})
                continue
            await self._emit(response, launch, {"phase": "launching",
                                                "message": "Spawning server...\n"})
            return await self._start_server(repo_url)
        raise AssertionError("unreachable")

    async def _emit(self, response: web.StreamResponse, launch: Launch,
                    data: dict[str, Any]) -> None:
        launch.events.append(data)
        await response.write(f"data: {json.dumps(data)}\n\n".encode())
        if self.chatty:
            await response.write(b":keepalive\n\n")

    async def _keepalive_loop(self, response: web.StreamResponse) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            while True:
                await asyncio.sleep(self.keepalive)
                await response.write(b":keepalive\n\n")

    # -- user servers ---------------------------------------------------------------------
    async def _start_server(self, repo_url: str) -> UserServer:
        slug = repo_url.rstrip("/").rsplit("/", 1)[-1].lower()
        slug = "".join(c if c.isalnum() else "-" for c in slug)[:20]
        name = f"{slug}-{secrets.token_hex(4)}"
        port, token = _free_port(), secrets.token_hex(24)
        workdir = self.root / name
        workdir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=str(workdir / ".runtime"))
        args = [
            "-m", "jupyter_server", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--ServerApp.base_url=/user/{name}/",
            f"--ServerApp.root_dir={workdir}", "--ServerApp.open_browser=False",
            "--ServerApp.terminals_enabled=False",
        ]
        if os.geteuid() == 0:  # containers often run tests as root
            args.append("--ServerApp.allow_root=True")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args,
            cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        server = UserServer(name, repo_url, f"http://127.0.0.1:{port}/user/{name}/", token,
                            proc, workdir)
        self.servers[name] = server
        assert proc.stderr is not None
        async for line in proc.stderr:  # jupyter_server announces itself on stderr
            if b"is running at" in line:
                break
        else:
            raise LaunchFailed("Internal Server Error", status_code=500)
        drain = asyncio.create_task(self._drain(proc))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)
        await self._until_answering(server)
        return server

    async def _drain(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for _line in proc.stderr:
            pass

    async def _until_answering(self, server: UserServer) -> None:
        """The log line comes a moment before the socket accepts; JupyterHub polls too."""
        assert self._http is not None
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.get(f"{server.url}api/status", headers={
                        "Authorization": f"token {server.token}"}) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise LaunchFailed("Internal Server Error", status_code=500)

    async def _terminate(self, name: str) -> bool:
        server = self.servers.pop(name, None)
        if server is None:
            return False
        if server.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(server.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
                await server.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.proc.pid, signal.SIGKILL)  # kernels share the group
        self.stopped.append(name)
        return True

    # -- the rest of the API ----------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "checks": [
            {"service": "Hub", "ok": True}, {"service": "Pod quota", "ok": True}]})

    async def _versions(self, request: web.Request) -> web.Response:
        return web.json_response({"builder_info": {"build_image": "standin"},
                                  "binderhub": VERSION})

    async def _stop_server(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization", "") != f"token {self.hub_token}":
            return web.json_response({"status": 403, "message": "Forbidden"}, status=403)
        if await self._terminate(request.match_info["name"]):
            return web.Response(status=204)
        return web.json_response({"status": 404, "message": "No such server"}, status=404)
