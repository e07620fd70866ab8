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

Every process of a session carries three environment variables, which is how
any broker on this host finds it again (``/proc/<pid>/environ``), whoever
started it: ``JSB_SESSION_MARK`` (session id and a nonce), ``JSB_STORE_SCOPE``
(which store the session lives in: a hash of BROKER_REDIS_URL and
BROKER_REDIS_PREFIX, or of the root directory with the memory store) and
``JSB_STARTED_BY`` (the starting broker's pid, process start time and an
instance nonce). :meth:`LocalBackend.sweep` (start-up and every reaper
interval) reconciles them with the store:

* a server whose session is live in the store is left running (a replica
  that died leaves it adopted: any replica proxies to it, stops it, probes it);
* with Redis (the store is shared and authoritative) a server of this scope
  whose session is not live is stopped, whoever started it, and so is the
  working directory of such a session under this broker's root;
* with the memory store the record of a server this process did not start
  is unknowable. If the broker that started it is gone, its sessions went
  with it: the server is stopped, with a warning. If that broker is still
  running (a second replica on the same root directory, which the memory
  store does not support), the server is left alone and a warning says so,
  once per server: killing another replica's sessions silently is worse.

Only processes of this host are visible, so replicas on other hosts are never
touched; each host's replicas sweep their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker.backends.base import (
    BackendContext,
    Liveness,
    LostCallback,
    probe_server,
    server_answers,
)
from broker.backoff import Backoff, poll
from broker.errors import UpstreamFailed
from broker.models import ProgressEvent, Session, new_token

if TYPE_CHECKING:
    from broker.upstream.session import UpstreamAccess

log = logging.getLogger(__name__)

#: Environment variables never passed to a session's server: the broker's
#: own configuration (secrets included) and other services' credentials.
_PRIVATE_ENV_PREFIXES = ("BROKER_", "JUPYTERHUB_", "REDIS_")
#: Environment variable that marks every process of one session.
_MARKER_ENV = "JSB_SESSION_MARK"
#: ... which store its session lives in (see the module docstring).
_SCOPE_ENV = "JSB_STORE_SCOPE"
#: ... which broker process started it: "pid:start time:instance nonce".
_BROKER_ENV = "JSB_STARTED_BY"
#: What a session id looks like (models.new_session_id): guards directory removal.
_SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
#: Longest wait for a started server to answer api/status.
_ANSWER_LIMIT = 90.0
#: Pauses between those checks: the socket usually accepts within milliseconds.
_ANSWER_BACKOFF = Backoff(start=0.02, cap=0.25)
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


@dataclass(frozen=True)
class _Marked:
    """A process of this host that belongs to some broker's session."""

    pid: int
    marker: str
    scope: str
    broker: str
    #: Its working directory ("" if unreadable): a session server's is its workdir.
    cwd: str

    @property
    def session_id(self) -> str:
        return self.marker.partition("-")[0]  # ids are hex; the nonce may hold "-"


def _scan_marked() -> list[_Marked]:
    """Every process carrying a session marker (blocking: reads /proc).

    Raises OSError when /proc itself cannot be listed (e.g. EMFILE): a sweep
    or stop that cannot see must not conclude anything.
    """
    found = []
    prefixes = (f"{_MARKER_ENV}=".encode(), f"{_SCOPE_ENV}=".encode(),
                f"{_BROKER_ENV}=".encode())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                raw = fh.read()
        except OSError as exc:  # gone meanwhile, or not ours to read
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise
            continue
        if prefixes[0] not in raw:
            continue
        values = ["", "", ""]
        for item in raw.split(b"\0"):
            for i, prefix in enumerate(prefixes):
                if item.startswith(prefix):
                    values[i] = item[len(prefix):].decode(errors="replace")
        if not values[0]:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        found.append(_Marked(int(entry), values[0], values[1], values[2], cwd))
    return found


def _kill(pids: list[int]) -> int:
    """SIGKILL these processes; how many were still there."""
    killed = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _kill_marked(marker: str) -> int:
    """SIGKILL every process whose environment carries ``marker`` (blocking: /proc scan)."""
    return _kill([m.pid for m in _scan_marked() if m.marker == marker])


def _rmtree(path: Path) -> None:
    """Remove a directory tree; raise (OSError, e.g. EMFILE) unless it is gone afterwards,
    so the caller can retry instead of leaving it behind silently."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` (/proc/<pid>/stat field 22), "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _broker_alive(broker: str) -> bool:
    """Whether the broker process named by a JSB_STARTED_BY value still runs."""
    pid, _, rest = broker.partition(":")
    start = rest.partition(":")[0]
    return pid.isdigit() and bool(start) and _process_start(int(pid)) == start


#: What the local backend runs in each session's subprocess: the ``[local]`` extra.
LOCAL_PACKAGES = ("jupyter_server", "ipykernel")


def missing_packages() -> list[str]:
    """The ``[local]`` extra's packages this Python cannot import (empty: all there).

    Hub and binder installs (and the lean image) leave them out, so the local
    backend checks at start-up instead of failing at the first spawn.
    """
    return [name for name in LOCAL_PACKAGES if importlib.util.find_spec(name) is None]


def missing_packages_message(missing: list[str]) -> str:
    """The start-up refusal naming the fix."""
    return (f"BROKER_BACKEND=local needs {' and '.join(missing)}, which this Python cannot "
            "import: install the local extra (pip install 'jupyter-session-broker[local]', "
            "or use the image's -local variant), or choose BROKER_BACKEND=jupyterhub/binderhub")


#: A session's IPython directory (IPYTHONDIR), inside its working directory.
IPYTHON_DIR = ".ipython"
#: The kernels' configuration in it: no SQLite input history.
KERNEL_CONFIG = (
    "# Written by session-broker for this session's kernels.\n"
    "# No SQLite input history: the session's directory goes when it ends, and writing\n"
    "# the history cost each executed cell about a millisecond of kernel CPU. In, Out\n"
    "# and %history of the running kernel still work (they are kept in memory).\n"
    "c.HistoryManager.enabled = False\n"
)


def _kernel_profile(workdir: Path) -> None:
    """Give a session's kernels an IPython profile of their own, without stored history.

    Why: IPython keeps every executed cell in ``$IPYTHONDIR/profile_default/
    history.sqlite``; with the broker user's directory, all sessions' kernels
    would share that file (one visitor's ``%history -g`` lists another's code).
    """
    profile = workdir / IPYTHON_DIR / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_kernel_config.py").write_text(KERNEL_CONFIG)


#: Server extensions that serve only the Jupyter UI (JupyterLab, the notebook, their
#: language servers and terminals), turned off while the broker does not proxy the UI:
#: nothing can reach them then. Loaded, they cost each session's server memory and
#: CPU at start for nothing (jupyter_lsp even runs ``npm prefix -g``).
UI_EXTENSIONS = ("jupyterlab", "notebook", "notebook_shim", "nbclassic", "jupyter_lsp",
                 "jupyter_server_terminals")


class LocalBackend:
    """A :class:`~broker.backends.base.Backend` running servers as subprocesses."""

    name = "local"

    def __init__(
        self,
        upstream: UpstreamAccess,
        *,
        root_dir: str = "",
        extra_args: list[str] | None = None,
        on_lost: LostCallback | None = None,
        shared_store: str = "",
        terminals: bool = False,
        ui: bool = False,
    ) -> None:
        """``upstream``: the app's client to session servers (liveness probes).
        ``shared_store`` names the shared (Redis) store the sessions live in
        (URL and key prefix); empty for the memory store. See :meth:`sweep`.
        ``terminals``: start servers with terminals enabled (BROKER_JUPYTER_UI_TERMINALS).
        ``ui``: the session's Jupyter UI is proxied (BROKER_JUPYTER_UI); without it the
        servers start without the UI's extensions (:data:`UI_EXTENSIONS`).

        Raises RuntimeError when the ``[local]`` extra is not installed."""
        missing = missing_packages()
        if missing:
            raise RuntimeError(missing_packages_message(missing))
        self._upstream = upstream
        self._terminals = terminals
        self._ui = ui
        self._own_root = not root_dir
        self._root = Path(root_dir or tempfile.mkdtemp(prefix="session-broker-"))
        self._root.mkdir(parents=True, exist_ok=True)
        self._extra_args = list(extra_args or [])
        self.on_lost = on_lost
        self._servers: dict[str, _Server] = {}
        self._shared = bool(shared_store)
        basis = f"redis\0{shared_store}" if shared_store else f"memory\0{self._root.resolve()}"
        self._scope = hashlib.sha256(basis.encode()).hexdigest()[:16]
        self._id = f"{os.getpid()}:{_process_start(os.getpid())}:{new_token()[:8]}"
        #: Markers of other live brokers' servers already warned about (memory store).
        self._warned: set[str] = set()

    # -- spawning -----------------------------------------------------------------
    def _command(self, port: int, workdir: Path) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            # jupyter_server itself, with its start-up heap frozen before the first request:
            # no 60-300 ms full garbage collection in a visitor's first seconds (localserver.py).
            "broker.localserver",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={workdir}",
            f"--ServerApp.terminals_enabled={self._terminals}",
            # Files deleted through the API must go with the session, not into
            # the broker user's trash where they would outlive it.
            "--FileContentsManager.delete_to_trash=False",
        ]
        if not self._ui:  # (an extension that is not installed is simply not loaded)
            cmd += [f"--ServerApp.jpserver_extensions={name}=False" for name in UI_EXTENSIONS]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--ServerApp.allow_root=True")
        return cmd + self._extra_args

    def _environment(self, token: str, workdir: Path, marker: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)}
        env[_MARKER_ENV] = marker
        env[_SCOPE_ENV] = self._scope
        env[_BROKER_ENV] = self._id
        env["JUPYTER_TOKEN"] = token
        # JupyterLab's user settings and workspaces (when the UI is proxied) stay with the
        # session instead of the broker user's home, where every session would share them.
        env["JUPYTERLAB_SETTINGS_DIR"] = str(workdir / ".lab" / "settings")
        env["JUPYTERLAB_WORKSPACES_DIR"] = str(workdir / ".lab" / "workspaces")
        env["JUPYTER_RUNTIME_DIR"] = str(workdir / ".runtime")
        # IPython's own files too (input history, %store): in the broker user's home
        # every visitor's kernel would write its code where any other one can read it
        # (%history -g). See _kernel_profile for what the profile holds.
        env["IPYTHONDIR"] = str(workdir / IPYTHON_DIR)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        workdir = self._root / session.id
        workdir.mkdir(parents=True, exist_ok=True)
        _kernel_profile(workdir)
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
        try:
            await self._remove(server)
        except OSError as exc:  # e.g. EMFILE: the sweep removes what is left
            log.warning("could not clean up after session %s yet: %s", session_id, exc)
        if self.on_lost is not None:
            await self.on_lost(session_id, f"The Jupyter server exited (code {code})")

    async def _until_answering(self, server: _Server, url: str, token: str) -> bool:
        """Confirm the announced server takes requests.

        jupyter_server logs "is running at" a moment before its socket accepts
        connections, and offers no event for that; retry briefly with backoff
        while the process lives.
        """

        async def answered() -> bool | None:
            if server.proc.returncode is not None:
                return False
            return True if await self._answers(url, token) else None

        return bool(await poll(answered, _ANSWER_BACKOFF, limit=_ANSWER_LIMIT))

    async def _answers(self, url: str, token: str) -> bool:
        return await server_answers(self._upstream, url, token, limit=5)

    # -- lifecycle -------------------------------------------------------------------
    async def is_alive(self, session: Session) -> bool:
        return await self.probe(session) is Liveness.ALIVE

    async def probe(self, session: Session) -> Liveness:
        """One liveness probe. A server this process did not start (another
        replica's, or one adopted from a replica that died) is asked all the same."""
        server = self._servers.get(session.id)
        if server is not None and server.proc.returncode is not None:
            return Liveness.DEAD
        return await probe_server(self._upstream, session.upstream_url, session.upstream_token, 5)

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
        await asyncio.to_thread(_rmtree, server.workdir)
        with contextlib.suppress(OSError):
            server.log_path.unlink()

    async def stop(self, session: Session) -> None:
        """Stop the session's server, whoever on this host started it.

        One this process started is ended gracefully; otherwise (another
        replica's, a dead replica's, or a cleanup retried after an earlier
        attempt failed half-way, e.g. on EMFILE) its processes are found by
        their marker and killed, and its working directory is removed.
        Raises OSError when it could not look (the caller retries later).
        """
        if session.id in self._servers:
            await self._terminate(session.id)
            return
        await self._remove_found(session.id, session.backend_state.get("workdir", ""))

    async def _remove_found(self, session_id: str, workdir: str,
                            found: list[_Marked] | None = None) -> int:
        """Kill this scope's processes of one session; remove its directory and log."""
        if found is None:
            found = await asyncio.to_thread(_scan_marked)
        procs = [m for m in found if m.session_id == session_id and m.scope == self._scope]
        killed = await asyncio.to_thread(_kill, [m.pid for m in procs])
        dirs = {Path(d) for d in [workdir, *(m.cwd for m in procs)] if d}
        for path in dirs:
            if path.name == session_id and _SESSION_ID.match(session_id):
                await asyncio.to_thread(_rmtree, path)
                with contextlib.suppress(OSError):
                    (path.parent / f"{session_id}.log").unlink()
        return killed

    async def sweep(self, live_sessions: Callable[[], Awaitable[list[Session]]]) -> int:
        """Stop this scope's servers whose session is not live; returns how many.

        This host's processes and this root's directories are listed *before*
        the store is read: a spawn saves its session before it starts a
        process or makes a directory, so nothing seen here can belong to a
        session the store does not know yet. See the module docstring for
        who may stop what.
        """
        found = [m for m in await asyncio.to_thread(_scan_marked) if m.scope == self._scope]
        # Directories without a process are judged only against a shared store: with
        # the memory store one may belong to another broker's spawn just starting.
        dirs = await asyncio.to_thread(self._session_dirs) if self._shared else []
        if not found and not dirs:
            return 0
        live = {s.id for s in await live_sessions()}
        stopped = 0
        by_marker: dict[str, list[_Marked]] = {}
        for marked in found:
            by_marker.setdefault(marked.marker, []).append(marked)
        for marker, procs in by_marker.items():
            sid = procs[0].session_id
            if sid in live:
                continue  # its session lives: any replica can serve it (adopted)
            broker = procs[0].broker
            own = self._servers.get(sid)
            if own is not None and own.marker == marker:
                log.warning("stopping the server of session %s: its session is no longer "
                            "live in the store", sid)
                await self._terminate(sid)
            elif broker != self._id and not self._shared and _broker_alive(broker):
                if marker not in self._warned:
                    self._warned.add(marker)
                    log.warning(
                        "found the server of session %s (pid %d) started by another running "
                        "broker (pid %s) on the same root directory; with the memory store "
                        "its session is unknown here, so it is left alone. Run one replica "
                        "per root directory, or share a Redis store (BROKER_REDIS_URL)",
                        sid, procs[0].pid, broker.partition(":")[0])
                continue
            else:
                log.warning("stopping %d leftover processes of session %s (pid %d): no live "
                            "session owns them (left by broker %s)", len(procs), sid,
                            procs[0].pid, broker.partition(":")[0])
                await self._remove_found(sid, "", found)
            stopped += 1
        running = {m.session_id for m in found}
        for path in dirs:
            if path.name not in live and path.name not in running \
                    and path.name not in self._servers:
                await self._remove_found(path.name, str(path), [])
        return stopped

    def _session_dirs(self) -> list[Path]:
        """Working directories of sessions under this broker's root (blocking)."""
        try:
            return [p for p in self._root.iterdir() if p.is_dir() and _SESSION_ID.match(p.name)]
        except FileNotFoundError:
            return []

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


def create(context: BackendContext) -> LocalBackend:
    """BROKER_BACKEND=local, from the BROKER_LOCAL_* settings (the registry's factory)."""
    settings = context.settings
    return LocalBackend(
        context.upstream, root_dir=settings.local_root_dir,
        extra_args=settings.local_server_args,
        # Replicas sharing this store may stop each other's leftovers (LocalBackend.sweep).
        shared_store=f"{settings.redis_url}\0{settings.redis_prefix}" if settings.redis_url
        else "",
        terminals=settings.jupyter_ui_terminals,
        ui=settings.jupyter_ui,
    )
