"""configurable-http-proxy, started and routed the way JupyterHub does it.

JupyterHub runs configurable-http-proxy (CHP) with ``--ip/--port`` for the
public side, ``--api-ip/--api-port`` for its REST API (token in
``$CONFIGPROXY_AUTH_TOKEN``), ``--error-target <hub>/hub/error`` and
``--log-level info`` (``jupyterhub/proxy.py``, ``ConfigurableHTTPProxy.start``),
then adds one route per user server: ``POST /api/routes/user/<name>`` with
``{"user": <name>, "server_name": "", "target": "http://<ip>:<port>",
"jupyterhub": true}``, plus ``/`` to the hub itself. CHP forwards the whole
path, prefix included; the single-user server serves under its own
``base_url`` ``/user/<name>/``. The benchmark does the same: each upstream
is a "user" served under :func:`user_prefix` (the echo upstream one, the
real jupyter_server another), and clients present the upstream's own token
as they would through the hub.

No hub runs: the ``/`` route and the error target point at a closed port,
and only ``/user/<name>/`` paths are ever requested.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench_procs import Proc, clean_env, free_port, spawn

REPO = Path(__file__).resolve().parent.parent
#: Where ``scripts/setup.d/chp.sh`` installs configurable-http-proxy (npm).
CHP_BINARY = REPO / ".tools" / "chp" / "node_modules" / ".bin" / "configurable-http-proxy"
SETUP_SCRIPT = REPO / "scripts" / "setup.d" / "chp.sh"


def user_prefix(name: str) -> str:
    """A user server's prefix, as JupyterHub routes it and the server's ``base_url``."""
    return f"/user/{name}/"


def chp_binary() -> Path:
    """The CHP executable, installed with the project's own setup step if missing."""
    if not CHP_BINARY.exists():
        print(f"# {CHP_BINARY.relative_to(REPO)} is missing: running "
              f"bash {SETUP_SCRIPT.relative_to(REPO)}", flush=True)
        subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, timeout=600)
    return CHP_BINARY


def chp_version() -> str:
    try:
        done = subprocess.run([str(CHP_BINARY), "--version"], capture_output=True, text=True,
                              timeout=30)
    except OSError:
        return "absent"
    return done.stdout.strip() or "unknown"


@dataclass
class Chp:
    """A running CHP: its process, public base URL and REST API."""

    proc: Proc
    public_url: str
    api_url: str
    token: str
    #: The hub's URL in CHP's routes (``/`` and the error target); nothing listens there.
    hub_url: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    async def wait(self, limit: float) -> None:
        """Until the REST API answers (or the process dies, or ``limit`` seconds pass)."""
        deadline = time.monotonic() + limit
        async with aiohttp.ClientSession() as http:
            while True:
                self.proc.check()
                try:
                    async with http.get(f"{self.api_url}/api/routes", headers=self.headers,
                                        timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"configurable-http-proxy did not answer within "
                                       f"{limit:g} s:\n{self.proc.tail()}")
                await asyncio.sleep(0.05)

    async def add_route(self, routespec: str, target: str, data: dict[str, Any]) -> None:
        """``ConfigurableHTTPProxy.add_route``: POST /api/routes<spec without trailing />."""
        path = routespec.rstrip("/") if routespec != "/" else "/"
        body = {**data, "target": target, "jupyterhub": True}
        async with aiohttp.ClientSession() as http, http.post(
            f"{self.api_url}/api/routes{path}", json=body, headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            if resp.status != 201:
                raise RuntimeError(f"CHP refused route {routespec} -> {target}: {resp.status} "
                                   f"{await resp.text()}")

    async def route_hub(self, limit: float) -> None:
        """Wait for the API, then route ``/`` to the hub, as JupyterHub does first."""
        await self.wait(limit)
        await self.add_route("/", self.hub_url, {"hub": True})

    async def add_user(self, name: str, server_origin: str) -> str:
        """``Proxy.add_user``: route ``/user/<name>/`` to a server; its public base URL."""
        await self.add_route(user_prefix(name), server_origin.rstrip("/"),
                             {"user": name, "server_name": ""})
        return f"{self.public_url}{user_prefix(name)}"


def start_chp(logdir: Path, cwd: Path) -> Chp:
    """Start CHP on free loopback ports with JupyterHub's command line."""
    binary = chp_binary()
    port, api_port, hub_port = free_port(), free_port(), free_port()
    token = secrets.token_urlsafe(24)
    hub = f"http://127.0.0.1:{hub_port}"  # nothing listens: no hub in the benchmark
    proc = spawn("chp", [str(binary), "--ip", "127.0.0.1", "--port", str(port),
                         "--api-ip", "127.0.0.1", "--api-port", str(api_port),
                         "--error-target", f"{hub}/hub/error", "--log-level", "info"],
                 logdir, env=clean_env(CONFIGPROXY_AUTH_TOKEN=token), cwd=cwd)
    return Chp(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{api_port}", token, hub)
