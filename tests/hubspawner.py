"""The spawner the test JupyterHub runs (imported by the hub process, not by pytest).

A :class:`~jupyterhub.spawner.SimpleLocalProcessSpawner` whose behaviour is
chosen per spawn by ``user_options["profile"]``, the way KubeSpawner's
``profile_list`` is, so one hub can serve every behaviour the broker must
handle:

``""`` / ``"default"``
    A real ``jupyterhub-singleuser`` (``--allow-root`` when running as root).
``"exits"``
    A process that exits at once with code 3; the spawner reports the exit
    code as a failed start, as KubeSpawner reports a crashed pod.
``"never"``
    A process that never answers HTTP: the spawn stays pending until the
    hub's ``http_timeout`` (or until someone stops it).
``"fast"``
    A minimal HTTP server answering every GET (``api/status`` included) with
    200: a server that starts at once, for tests about routing, not kernels.
anything else
    Refused by ``apply_user_options`` with HTTP 400 "No such profile", the
    hub's standard way of rejecting bad user_options.

Every PID started is appended to ``pid_log`` so the test fixture can make
sure no server outlives the test session, whatever state the hub is in.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from jupyterhub.spawner import SimpleLocalProcessSpawner
from tornado import web
from traitlets import Unicode

#: The "fast" profile's server: answers every GET with a Jupyter-like api/status
#: document on the address the hub assigned, and starts in a fraction of the time a
#: jupyterhub-singleuser needs (for tests about where sessions go, not what runs).
_FAST_SERVER = """
import http.server, os, urllib.parse
url = urllib.parse.urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
body = b'{"started": "", "last_activity": "", "connections": 0, "kernels": 0}'
class Status(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((url.hostname, url.port), Status).serve_forever()
"""

_PROFILES: dict[str, list[str] | None] = {
    "": None,  # None: the configured jupyterhub-singleuser command
    "default": None,
    "exits": [sys.executable, "-c", "import sys; sys.exit(3)"],
    "never": [sys.executable, "-c", "import time; time.sleep(3600)"],
    "fast": [sys.executable, "-c", _FAST_SERVER],
}


def apply_profile(spawner: ProfileSpawner, user_options: dict[str, Any]) -> None:
    """``c.Spawner.apply_user_options``: validate the profile and pick the command."""
    profile = user_options.get("profile", "")
    if not isinstance(profile, str) or profile not in _PROFILES:
        raise web.HTTPError(400, f"No such profile: {profile!r}")
    spawner.profile = profile
    command = _PROFILES[profile]
    if command is not None:
        spawner.cmd = command
        spawner.args = []


class ProfileSpawner(SimpleLocalProcessSpawner):  # type: ignore[misc]
    """SimpleLocalProcessSpawner with behaviour profiles and a PID log."""

    pid_log = Unicode("", config=True, help="File to append every started PID to.")
    profile = Unicode("")

    async def start(self) -> Any:
        """Start the process, log its PID, and fail visibly if it dies at once."""
        address = await super().start()
        if self.pid_log:
            with open(self.pid_log, "a") as fh:
                fh.write(f"{self.pid}\n")
        if self.profile == "exits":
            code = await asyncio.to_thread(self.proc.wait, 30)
            raise RuntimeError(f"The single-user server exited with code {code}")
        return address

