"""Local backend: one ``jupyter server`` subprocess per session, on this machine.

The embedded default, for development and single-machine sites. Each
session's server binds 127.0.0.1 on a free port with a random token (passed
in the environment, never on the command line where ``ps`` would show it),
runs in its own process group and its own working directory, and gets an
environment without the broker's own settings. The processes run as the
broker's OS user: sessions are separated by directory and token, not by the
operating system, so use JupyterHub or BinderHub for untrusted public traffic
at scale.

Invariants: a server whose process exits while its session is live is
reported through ``on_lost``; ``stop`` ends the whole process group (kernels
included) and removes the working directory; ``close`` stops every server
this broker started, because nothing else could stop them later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from broker.backends.base import LostCallback, server_answers
from broker.errors import UpstreamFailed
from broker.models import ProgressEvent, Session, new_token

log = logging.getLogger(__name__)

#: Environment variables never passed to a session's server: the broker's
#: own configuration (secrets included) and other services' credentials.
_PRIVATE_ENV_PREFIXES = ("BROKER_", "JUPYTERHUB_", "REDIS_")
#: Environment variable that marks every process of one session.
_MARKER_ENV = "JSB_SESSION_MARK"
#: Longest wait for a started server to answer api/status.
_ANSWER_LIMIT = 90.0
_STOP_GRACE = 5.0
_PORT_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """One running ``jupyter server`` and the task watching it."""

    def __init__(self, proc: asyncio.subprocess.Process, workdir: Path, log_path: Path,
                 marker: str) -> None:
        self.proc = proc
        self.workdir = workdir
        self.log_path = log_path
        #: In the environment of the server, its kernels and their children:
        #: how every process of the session is found again (kernels run in
        #: sessions of their own, out of reach of a process-group signal).
        self.marker = marker
        self.stopping = False
        #: Set once the session was handed this server; exits before that are
        #: start-up failures, which spawn() reports itself.
        self.live = False
        self.watch: asyncio.Task[None] | None = None

    def tail(self, lines: int = 30) -> str:
        """The end of the server's log (start-up errors are in the last line)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def _kill_marked(marker: str) -> int:
    """SIGKILL every process whose environment carries ``marker`` (blocking: /proc scan)."""
    needle = f"{_MARKER_ENV}={marker}".encode()
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError):
            continue
    return killed


class LocalBackend:
    """A :class:`~broker.backends.base.Backend` running servers as subprocesses."""

    name = "local"

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        root_dir: str = "",
        extra_args: list[str] | None = None,
        on_lost: LostCallback | None = None,
    ) -> None:
        self._http = http
        self._own_root = not root_dir
        self._root = Path(root_dir or tempfile.mkdtemp(prefix="session-broker-"))
        self._root.mkdir(parents=True, exist_ok=True)
        self._extra_args = list(extra_args or [])
        self.on_lost = on_lost
        self._servers: dict[str, _Server] = {}

    # -- spawning -----------------------------------------------------------------
    def _command(self, port: int, workdir: Path) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={workdir}",
            "--ServerApp.terminals_enabled=False",
            # Files deleted through the API must go with the session, not into
            # the broker user's trash where they would outlive it.
            "--FileContentsManager.delete_to_trash=False",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--ServerApp.allow_root=True")
        return cmd + self._extra_args

    def _environment(self, token: str, workdir: Path, marker: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)}
        env[_MARKER_ENV] = marker
        env["JUPYTER_TOKEN"] = token
        env["JUPYTER_RUNTIME_DIR"] = str(workdir / ".runtime")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        workdir = self._root / session.id
        workdir.mkdir(parents=True, exist_ok=True)
        yield ProgressEvent("launching", "Starting a Jupyter server", progress=10)
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = _free_port()
            token = new_token()
            server = await self._start(session.id, port, token, workdir)
            yield ProgressEvent(
                "launching",
                "Waiting for the Jupyter server to answer",
                progress=40,
                backend_state={"pid": str(server.proc.pid), "workdir": str(workdir)},
            )
            url = f"http://127.0.0.1:{port}/"
            if await self._until_answering(server, url, token):
                server.live = True
                yield ProgressEvent(
                    "ready",
                    "Jupyter server is ready",
                    progress=100,
                    upstream_url=url,
                    upstream_token=token,
                    backend_state={"pid": str(server.proc.pid), "workdir": str(workdir)},
                )
                return
            if server.proc.returncode is None:  # alive but deaf for too long
                await self._terminate(session.id)
                raise UpstreamFailed("The Jupyter server started but does not answer")
            tail = await asyncio.to_thread(server.tail)
            await self._terminate(session.id)
            if "already in use" in tail and attempt < _PORT_ATTEMPTS:
                log.info("port %d taken, retrying spawn of %s", port, session.id)
                continue
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            last = tail.strip().splitlines()[-1:] or ["no output"]
            raise UpstreamFailed(f"The Jupyter server exited during start-up: {last[0]}")

    async def _start(self, session_id: str, port: int, token: str, workdir: Path) -> _Server:
        # Output goes to a file, not a pipe: kernels and their children inherit
        # the server's stderr, and asyncio's Process.wait() only returns once
        # every pipe is closed, which an orphaned grandchild would prevent.
        log_path = self._root / f"{session_id}.log"
        marker = f"{session_id}-{new_token()[:8]}"
        log_file = await asyncio.to_thread(open, log_path, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(port, workdir),
                cwd=workdir,
                env=self._environment(token, workdir, marker),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        finally:
            log_file.close()  # the child has its own descriptor
        server = _Server(proc, workdir, log_path, marker)
        self._servers[session_id] = server
        server.watch = asyncio.create_task(self._watch(session_id, server))
        return server

    async def _watch(self, session_id: str, server: _Server) -> None:
        """Notice the server's exit; report it unless the broker asked for it."""
        code = await server.proc.wait()
        if server.stopping or not server.live or self._servers.get(session_id) is not server:
            return
        self._servers.pop(session_id, None)
        log.warning("jupyter server of session %s exited with code %s", session_id, code)
        # Its kernels, their children and its directory must not outlive it.
        await self._remove(server)
        if self.on_lost is not None:
            await self.on_lost(session_id, f"The Jupyter server exited (code {code})")

    async def _until_answering(self, server: _Server, url: str, token: str) -> bool:
        """Confirm the announced server takes requests.

        jupyter_server logs "is running at" a moment before its socket accepts
        connections, and offers no event for that; retry briefly with backoff
        while the process lives.
        """
        delay = 0.02
        deadline = asyncio.get_running_loop().time() + _ANSWER_LIMIT
        while asyncio.get_running_loop().time() < deadline:
            if server.proc.returncode is not None:
                return False
            if await self._answers(url, token):
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        return False

    async def _answers(self, url: str, token: str) -> bool:
        return await server_answers(self._http, url, token, limit=5)

    # -- lifecycle -------------------------------------------------------------------
    async def is_alive(self, session: Session) -> bool:
        server = self._servers.get(session.id)
        if server is None or server.proc.returncode is not None:
            return False
        return await self._answers(session.upstream_url, session.upstream_token)

    async def _terminate(self, session_id: str) -> None:
        server = self._servers.pop(session_id, None)
        if server is None:
            return
        server.stopping = True
        proc = server.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if server.watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await server.watch
        await self._remove(server)

    async def _remove(self, server: _Server) -> None:
        """Kill whatever of the session still runs (kernels, their children), remove its files."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        killed = await asyncio.to_thread(_kill_marked, server.marker)
        if killed:
            log.info("stopped %d leftover processes of a session's server", killed)
        await asyncio.to_thread(shutil.rmtree, server.workdir, True)
        with contextlib.suppress(OSError):
            server.log_path.unlink()

    async def stop(self, session: Session) -> None:
        await self._terminate(session.id)

    async def health(self) -> None:
        if not self._root.is_dir():
            raise RuntimeError(f"working directory root {self._root} is missing")

    def pids(self) -> dict[str, int]:
        """Process ids of running servers by session id (for tests and diagnostics)."""
        return {sid: s.proc.pid for sid, s in self._servers.items()}

    async def close(self) -> None:
        await asyncio.gather(*(self._terminate(sid) for sid in list(self._servers)))
        if self._own_root:
            await asyncio.to_thread(shutil.rmtree, self._root, True)
