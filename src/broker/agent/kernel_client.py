"""The broker's own kernel client: run code on a session's default kernel.

The execute API (``agent/execute.py``) does what a notebook frontend does --
send an ``execute_request``, collect outputs until the kernel is idle -- so an
AI agent does not have to speak the wire protocol. It talks to the session's
upstream Jupyter server over the same REST and WebSocket routes every
Jupyter client uses, so it works for every backend, and reaches it as the
proxy does: through the session's :class:`~broker.upstream.session.SessionUpstream`
(token, path rule, one HTTP client and one WebSocket handshake), reading
the socket with :class:`~broker.agent.kernel_socket.KernelSocket`.
The protocol facts it relies on (the sessions API's answer for a known path,
restart notices, what ends a call, ``kernel_info_request``) are in
docs/protocols.md#jupyter-server-rest-api, docs/protocols.md#kernel-websocket-protocols
and docs/protocols.md#kernel-messages.

Invariants:

* One default kernel per session, found or started through the upstream's
  sessions API under the fixed path :data:`~broker.models.DEFAULT_KERNEL_PATH` (Jupyter
  Server hands back the existing session for a known path). The upstream is
  the source of truth: any replica finds the same kernel, nothing is stored in
  the broker, and a kernel that died is replaced on the next call. Two
  replicas racing on a session's very first call may each start one; the
  loser's kernel is simply never used again.
* On one replica the calls of one session run one at a time (a lock per
  session). A call's outputs are the messages whose parent is its own
  ``execute_request``, so even calls arriving through two replicas never mix.
* A call ends at ``execute_reply`` plus ``status: idle`` for its request. On
  timeout the kernel is interrupted (never restarted: its state survives) and
  the call waits :data:`INTERRUPT_GRACE` seconds more for the kernel to settle.
  If the kernel restarts or dies meanwhile, the call ends with an error.
* After a restart the connection is reused, but no code is sent until the
  restarted kernel has answered a ``kernel_info_request`` on shell *and* one of
  its iopub messages has reached the socket (:meth:`KernelConnection.settle`):
  Jupyter Server announces the restart before the new process even runs and
  re-attaches its ZMQ sockets silently, and iopub messages published before its
  subscription reaches the new kernel are dropped -- outputs and the final
  ``idle`` of a call sent too early would be lost. A restart asked for through
  the broker's proxy marks the connection unsettled before it is forwarded
  (:meth:`AgentKernels.restarting`): the server's notice may arrive after the
  REST call returned, and a call sent at once would beat it.
* Output is capped per call (``execute_max_output``); beyond the cap it is
  dropped, not buffered, and the result says ``truncated``.
* One upstream WebSocket per session's default kernel stays open on this
  replica, shared by its calls. It ends when the session's server goes away
  (stopped by any replica: the upstream closes it) or the app stops; it is
  not a client connection, so it is not among the manager's closers and
  does not hold up a shutdown drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from broker.agent.kernel_socket import KernelSocket, Message
from broker.errors import BadRequest, Conflict, UpstreamFailed
from broker.metrics import Metrics
from broker.models import DEFAULT_KERNEL_PATH, KERNEL_ALIASES, Session
from broker.policy.kernels import KernelGate
from broker.proxy._wire_py import OP_BINARY, OP_TEXT
from broker.proxy.relay import quickack_for as _quickack_for
from broker.sessions import SessionManager
from broker.settings import Settings
from broker.upstream.http import UpstreamError
from broker.upstream.session import SessionUpstream, UpstreamAccess
from broker.upstream.websocket import HandshakeRefused

log = logging.getLogger(__name__)

#: Seconds to wait, after interrupting a timed-out call, for the kernel to go idle.
INTERRUPT_GRACE = 5.0
#: While a restarted kernel settles: seconds between kernel_info_requests (the
#: iopub messages of earlier ones may have been dropped; as Jupyter Server's nudge).
SETTLE_RESEND = 0.5
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

#: Receives each output of a running call as a JSON-ready event (streaming mode).
Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass
class ExecutionResult:
    """The answer of one execute call; :meth:`body` is its JSON form."""

    status: str = "ok"  # ok | error | timeout
    execution_count: int | None = None
    stdout: str = ""
    stderr: str = ""
    result: dict[str, Any] | None = None
    display: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    error: dict[str, Any] | None = None
    duration_ms: int = 0
    truncated: bool = False

    def body(self) -> dict[str, Any]:
        """The JSON-ready mapping sent to clients."""
        return dataclasses.asdict(self)


def _error(ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
    # Tracebacks are for agents and logs, not terminals: drop ANSI colours.
    return {"ename": ename, "evalue": evalue,
            "traceback": [_ANSI.sub("", line) for line in traceback or []]}


class _Collector:
    """Folds one call's iopub/shell messages into an :class:`ExecutionResult`."""

    def __init__(self, limit: int, emit: Emit | None) -> None:
        self.out = ExecutionResult()
        self._limit = limit
        self._used = 0
        self._emit = emit
        self._display_ids: dict[str, int] = {}
        self.replied = False
        self.idle = False
        #: Whether the kernel answered at all (a deaf connection sends nothing).
        self.heard = False

    def _take(self, size: int) -> bool:
        """Account ``size`` bytes of output; False (and truncated) once over the cap."""
        if self.out.truncated or self._used + size > self._limit:
            self.out.truncated = True
            return False
        self._used += size
        return True

    async def send(self, event: dict[str, Any]) -> None:
        """Emit one event to a streaming caller (no-op otherwise)."""
        if self._emit is not None:
            await self._emit(event)

    async def handle(self, msg: dict[str, Any]) -> None:
        """Fold one message of this call into the result (and emit it when streaming)."""
        self.heard = True
        kind = msg.get("header", {}).get("msg_type", "")
        content: dict[str, Any] = msg.get("content") or {}
        out = self.out
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            text = str(content.get("text", ""))
            room = max(0, self._limit - self._used)
            if len(text.encode()) > room and not out.truncated:
                text = text.encode()[:room].decode(errors="ignore")
                self._take(len(text.encode()))
                out.truncated = True
            elif not self._take(len(text.encode())):
                return
            if text:
                setattr(out, name, getattr(out, name) + text)
                await self.send({"type": "stream", "name": name, "text": text})
        elif kind in ("display_data", "execute_result", "update_display_data"):
            data = content.get("data") or {}
            if not self._take(len(json.dumps(data))):
                return
            await self._bundle(kind, content, data)
        elif kind == "execute_input":
            out.execution_count = content.get("execution_count", out.execution_count)
        elif kind == "error":
            # Errors and clears are output too: a kernel flooding them must hit the cap.
            if not self._take(len(json.dumps(content.get("traceback"))) +
                              len(str(content.get("evalue", "")))):
                return
            out.error = _error(str(content.get("ename", "")), str(content.get("evalue", "")),
                               content.get("traceback"))
            await self.send({"type": "error", **out.error})
        elif kind == "clear_output":
            if not self._take(_CLEAR_COST):
                return
            # As in a notebook: what the cell showed so far is gone.
            out.stdout = out.stderr = ""
            out.display = []
            self._display_ids.clear()
            await self.send({"type": "clear_output"})
        elif kind == "execute_reply":
            self.replied = True
            out.execution_count = content.get("execution_count", out.execution_count)
            status = content.get("status", "ok")
            if status == "aborted":
                out.error = out.error or _error("ExecutionAborted", "The kernel aborted this "
                                                "request because an earlier one failed")
            elif status == "error" and out.error is None:
                out.error = _error(str(content.get("ename", "")),
                                   str(content.get("evalue", "")), content.get("traceback"))
            if status != "ok":
                out.status = "error"
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True

    async def _bundle(self, kind: str, content: dict[str, Any], data: dict[str, Any]) -> None:
        out = self.out
        display_id = (content.get("transient") or {}).get("display_id")
        if kind == "execute_result":
            out.result = data
            out.execution_count = content.get("execution_count", out.execution_count)
            await self.send({"type": "result", "data": data,
                              "execution_count": out.execution_count})
        elif kind == "display_data":
            if display_id:
                self._display_ids[display_id] = len(out.display)
            out.display.append(data)
            await self.send({"type": "display", "data": data})
        elif display_id in self._display_ids:  # update_display_data for one of ours
            index = self._display_ids[display_id]
            out.display[index] = data
            await self.send({"type": "update_display", "index": index, "data": data})


def _is_restart_notice(msg: dict[str, Any]) -> bool:
    """Jupyter Server's own status message (no parent) for a kernel restarting or dead."""
    return msg.get("header", {}).get("msg_type") == "status" and (
        (msg.get("content") or {}).get("execution_state") in ("restarting", "dead"))


def _decode(message: Message) -> dict[str, Any] | None:
    """A kernel message from a JSON text frame or a legacy binary frame (JSON part only)."""
    opcode, data = message
    if opcode == OP_TEXT:
        raw = data
    elif opcode == OP_BINARY and len(data) >= 8:
        # Legacy protocol with buffers: u32 count, u32 offsets, then JSON, buffers.
        count = int.from_bytes(data[:4], "big")
        if count < 1 or len(data) < 4 * (count + 1):
            return None
        start = int.from_bytes(data[4:8], "big")
        end = int.from_bytes(data[8:12], "big") if count > 1 else len(data)
        raw = data[start:end]
    else:
        return None
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


class KernelConnection:
    """One upstream kernel WebSocket, routing messages to the call that caused them."""

    def __init__(self, ws: KernelSocket, kernel_id: str,
                 kernel_name: str, on_closed: Callable[[], None] | None = None) -> None:
        self.ws = ws
        self.kernel_id = kernel_id
        self.kernel_name = kernel_name
        self.session = uuid.uuid4().hex
        self._listeners: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        self._on_closed = on_closed
        #: False from a restart notice until :meth:`settle` proved the new kernel
        #: reachable. A new connection starts settled: Jupyter Server nudges it.
        self.settled = True
        #: Whether an iopub message arrived since the last restart notice.
        self._iopub_seen = True
        #: Set by :meth:`expect_restart`: only iopub replies to settle's own requests count.
        self._own_iopub_needed = False
        #: The queue of a running :meth:`settle`, woken by that first iopub message.
        self._settling: asyncio.Queue[dict[str, Any] | None] | None = None
        # Acknowledge the kernel's frames at once while a call awaits its messages:
        # jupyter_server leaves Nagle on, so each frame of a reply after the first
        # would otherwise wait for our delayed ACK (~40 ms per call; see relay.py).
        assert ws.transport is not None
        self._quickack = _quickack_for(ws.transport)
        self._reader = asyncio.create_task(self._read(), name=f"kernel-{kernel_id}")

    @property
    def closed(self) -> bool:
        """True once the socket or its reader ended; the next call reconnects."""
        return self.ws.closed or self._reader.done()

    async def _read(self) -> None:
        try:
            while (frame := await self.ws.receive()) is not None:
                if self._listeners and self._quickack is not None:
                    self._quickack()
                msg = _decode(frame)
                if msg is None:
                    continue
                parent = (msg.get("parent_header") or {}).get("msg_id")
                queue = self._listeners.get(parent) if parent else None
                if queue is not None:
                    queue.put_nowait(msg)
                elif _is_restart_notice(msg):
                    # Jupyter Server's own notice (no parent): every running call is over,
                    # and the next one must wait for the restarted kernel (settle).
                    self.settled = self._iopub_seen = False
                    for waiting in self._listeners.values():
                        waiting.put_nowait(msg)
                    continue
                if msg.get("channel") == "iopub" and not self._iopub_seen:
                    # Server messages are flushed before the notice: this one is the new
                    # kernel's, so the server's subscription has reached it.
                    self._iopub_seen = True
                    if self._settling is not None and self._settling is not queue:
                        self._settling.put_nowait(msg)
        finally:
            if self._quickack is not None:
                # Let go of the descriptor without closing it: the transport owns it.
                self._quickack.sock.detach()  # type: ignore[attr-defined]
                self._quickack = None
            for waiting in self._listeners.values():
                waiting.put_nowait(None)
            if self._on_closed is not None:
                self._on_closed()

    async def request(self, code: str) -> tuple[str, asyncio.Queue[dict[str, Any] | None]]:
        """Send an execute_request; returns its msg_id and the queue of its messages."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        # stop_on_error off: a failure must not abort calls queued from elsewhere.
        msg_id = await self._send("execute_request", queue, {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False})
        return msg_id, queue

    async def _send(self, msg_type: str, queue: asyncio.Queue[dict[str, Any] | None],
                    content: dict[str, Any]) -> str:
        """Send a shell request whose messages go to ``queue``; returns its msg_id."""
        msg_id = uuid.uuid4().hex
        self._listeners[msg_id] = queue
        message = {
            "header": {"msg_id": msg_id, "msg_type": msg_type, "username": "broker",
                       "session": self.session, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": content,
        }
        try:
            self.ws.send_text(json.dumps(message))
        except ConnectionError as exc:
            self._listeners.pop(msg_id, None)
            raise UpstreamFailed("The kernel connection was lost",
                                 reason="kernel_lost") from exc
        return msg_id

    async def settle(self, within: float) -> bool:
        """Wait until a restarted kernel answers on shell and reaches this socket on iopub.

        Sends ``kernel_info_request`` (again every :data:`SETTLE_RESEND` seconds:
        the iopub messages of one sent before the subscription was in place are
        gone) until one is answered and an iopub message of the new kernel
        arrived -- Jupyter Server's nudge, which it does not redo after a
        restart. False if that takes over ``within`` seconds or the socket ends.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        resend = loop.time()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        sent: list[str] = []
        answered = False
        #: An iopub message in reply to one of our own kernel_info_requests: proof that
        #: the server's subscription reaches the kernel now running (any other iopub
        #: message may still be the old kernel's, e.g. its shutdown's status).
        ours_on_iopub = False
        self._settling = queue
        try:
            while not (answered and (ours_on_iopub
                                     or (self._iopub_seen and not self._own_iopub_needed))):
                now = loop.time()
                if now >= deadline or self.closed:
                    return False
                if now >= resend:
                    sent.append(await self._send("kernel_info_request", queue, {}))
                    resend = now + SETTLE_RESEND
                try:
                    msg = await asyncio.wait_for(queue.get(), min(resend, deadline) - now)
                except TimeoutError:
                    continue
                if msg is None:
                    return False
                if _is_restart_notice(msg):
                    answered = False  # it restarted again: the answer was the old one's
                elif msg.get("header", {}).get("msg_type") == "kernel_info_reply":
                    answered = True
                elif msg.get("channel") == "iopub" \
                        and (msg.get("parent_header") or {}).get("msg_id") in sent:
                    ours_on_iopub = True
            self.settled = True
            self._own_iopub_needed = False
            return True
        finally:
            self._settling = None
            for msg_id in sent:
                self._listeners.pop(msg_id, None)

    def expect_restart(self) -> None:
        """A restart went through the broker: the next call settles first.

        Jupyter Server's notice of a restart asked for over REST may reach this
        socket after the REST call returned, so a call sent right after it could
        beat the notice and lose its outputs; the broker saw the request pass.
        Only an iopub reply to the settle's own kernel_info_request counts then:
        the old kernel's last iopub messages may still be arriving.
        """
        self.settled = self._iopub_seen = False
        self._own_iopub_needed = True

    def done(self, msg_id: str) -> None:
        """Stop routing messages of a finished call."""
        self._listeners.pop(msg_id, None)

    async def close(self) -> None:
        """Close the socket and wait for the reader to end."""
        self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


@dataclasses.dataclass
class _Slot:
    """Per-session state on this replica: the call lock and the open connection."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    connection: KernelConnection | None = None


#: Output bytes a clear_output counts for (so an endless stream of them is capped).
_CLEAR_COST = 64


class AgentKernels:
    """Per-app registry of sessions' default kernels (created in ``cleanup_ctx``)."""

    def __init__(self, upstreams: UpstreamAccess, settings: Settings,
                 manager: SessionManager,
                 gate: Callable[[], KernelGate | None] | None = None) -> None:
        self._upstreams = upstreams
        self._settings = settings
        self._manager = manager
        #: The kernels-per-session gate (BROKER_MAX_KERNELS_PER_SESSION), looked up
        #: when needed: the default kernel counts like any other kernel.
        self._gate = gate
        self._slots: dict[str, _Slot] = {}

    # -- the default kernel ---------------------------------------------------------
    async def _kernel(self, session: Session, kernel_name: str) -> tuple[str, str]:
        """(id, name) of the session's default kernel, started if there is none."""
        body = _default_kernel_body(kernel_name)
        upstream = self._upstreams.for_session(session)
        gate = self._gate() if self._gate is not None else None
        if gate is None:
            return await _start_default_kernel(upstream, body, self._on_error(session))
        async with gate.starting(session, "api/sessions", json.dumps(body).encode()):
            return await _start_default_kernel(upstream, body, self._on_error(session))

    def _on_error(self, session: Session) -> Callable[[str], None]:
        """Counts an upstream error of ``session`` by kind (the metric's label)."""
        return lambda kind: self._manager.metrics.upstream_error(session.backend, kind)

    async def _connect(self, session: Session, slot: _Slot,
                       kernel_name: str) -> KernelConnection:
        """An open connection to the session's current default kernel.

        The upstream is asked on every call (one cheap REST request): a kernel
        shut down through the Jupyter surface leaves its WebSocket open but
        deaf, and only the server knows it is gone; then a new one is started.
        """
        kernel_id, actual = await self._kernel(session, kernel_name)
        if kernel_name and actual and kernel_name != actual:
            raise Conflict(f"This session's kernel runs {actual!r}, not {kernel_name!r}; "
                           "start another session for another kernel",
                           reason="kernel_name_mismatch")
        conn = slot.connection
        if conn is not None and (conn.closed or conn.kernel_id != kernel_id):
            await conn.close()
            conn = slot.connection = None
        if conn is None:
            ws = await _open_channels(self._upstreams.for_session(session), kernel_id,
                                      self._settings, self._on_error(session))
            conn = slot.connection = KernelConnection(
                ws, kernel_id, actual, on_closed=lambda: self._drop_idle(session.id, slot))
        if not conn.settled and not await conn.settle(self._settings.upstream_timeout):
            await conn.close()
            slot.connection = None
            self._manager.metrics.upstream_error(session.backend, "unreachable")
            raise UpstreamFailed("The session's kernel did not come back after a restart",
                                 reason="kernel_unreachable")
        return conn

    def restarting(self, session_id: str, kernel_id: str) -> None:
        """A client asked the session's server to restart ``kernel_id`` (through the proxy)."""
        slot = self._slots.get(session_id)
        conn = slot.connection if slot is not None else None
        if conn is not None and conn.kernel_id == kernel_id:
            conn.expect_restart()

    async def _interrupt(self, session: Session, kernel_id: str) -> None:
        try:
            async with await self._upstreams.for_session(session).request(
                    "POST", f"api/kernels/{kernel_id}/interrupt") as resp:
                if resp.status >= 300:
                    log.warning("interrupting the kernel of session %s answered %s",
                                session.id, resp.status)
        except (UpstreamError, TimeoutError) as exc:
            log.warning("could not interrupt the kernel of session %s: %s", session.id,
                        type(exc).__name__)

    # -- running code -------------------------------------------------------------
    async def execute(self, session: Session, code: str, *, time_limit: float,
                      kernel_name: str = "", emit: Emit | None = None) -> ExecutionResult:
        """Run ``code`` on the session's default kernel; one call at a time per session.

        ``time_limit`` counts from when the code is sent, not while the call waits
        for an earlier one of the same session.
        """
        kernel_name = KERNEL_ALIASES.get(kernel_name, kernel_name)
        while True:
            slot = self._slots.setdefault(session.id, _Slot())
            async with slot.lock:
                if self._slots.get(session.id) is not slot:
                    continue  # dropped while this call waited: take the current one
                self._manager.note_activity(session.id)
                conn = await self._connect(session, slot, kernel_name)
                try:
                    return await self._run(session, conn, code, time_limit, emit)
                finally:
                    self._manager.note_activity(session.id)

    async def _run(self, session: Session, conn: KernelConnection, code: str,
                   time_limit: float, emit: Emit | None) -> ExecutionResult:
        loop = asyncio.get_running_loop()
        collector = _Collector(self._settings.execute_max_output, emit)
        started = time.monotonic()
        msg_id, queue = await conn.request(code)
        metrics = self._manager.metrics  # the same series as kernel WebSocket traffic
        metrics.executions.inc()
        deadline = loop.time()
        sent = time.perf_counter()  # the duration's clock (loop.time(): whole ms on uvloop)
        deadline += time_limit
        timed_out = measured = False
        try:
            while not (collector.idle and collector.replied):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if timed_out:
                        log.warning("kernel of session %s did not settle after an interrupt",
                                    session.id)
                        break
                    timed_out = True
                    await self._interrupt(session, conn.kernel_id)
                    deadline = loop.time() + INTERRUPT_GRACE
                    continue
                try:
                    msg = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    continue
                if msg is None:
                    raise UpstreamFailed("The kernel connection was lost during execution",
                                         reason="kernel_lost")
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    state = (msg.get("content") or {}).get("execution_state")
                    collector.out.status = "error"
                    collector.out.error = _error(
                        "KernelRestarted" if state == "restarting" else "KernelDied",
                        "The kernel died during execution; its state is lost"
                        + (" (it was restarted)" if state == "restarting" else ""))
                    await collector.send({"type": "error", **collector.out.error})
                    break
                await collector.handle(msg)
                if collector.replied and not measured:
                    measured = True
                    metrics.execution_duration.observe(time.perf_counter() - sent)
                    self._manager.first_reply(session)
        except asyncio.CancelledError:
            # The caller went away mid-run: do not leave the kernel busy for the next one.
            await asyncio.shield(self._interrupt(session, conn.kernel_id))
            raise
        finally:
            conn.done(msg_id)
        if timed_out and not collector.heard:
            await conn.close()  # nothing came back at all: reconnect next time
        out = collector.out
        if timed_out:
            out.status = "timeout"
            if out.error is None or out.error.get("ename") == "KeyboardInterrupt":
                out.error = _error("TimeoutError", f"Execution exceeded {time_limit:g} s and "
                                   "was interrupted; the kernel and its state are kept",
                                   (out.error or {}).get("traceback"))
        out.duration_ms = round((time.monotonic() - started) * 1000)
        return out

    # -- lifecycle ----------------------------------------------------------------------
    def _drop_idle(self, session_id: str, slot: _Slot) -> None:
        """A connection closed by the upstream (server gone, maybe stopped by another
        replica): forget the slot unless a call is using it, so slots do not pile up."""
        if self._slots.get(session_id) is slot and not slot.lock.locked():
            del self._slots[session_id]

    async def forget(self, session_id: str) -> None:
        """Drop a session's connection and close it."""
        slot = self._slots.pop(session_id, None)
        if slot is not None and slot.connection is not None:
            await slot.connection.close()

    async def close(self) -> None:
        """Close every connection (app shutdown)."""
        await asyncio.gather(*(self.forget(sid) for sid in list(self._slots)),
                             return_exceptions=True)


def _default_kernel_body(kernel_name: str) -> dict[str, Any]:
    """The sessions API body that finds or starts the default kernel (its fixed path)."""
    body: dict[str, Any] = {"path": DEFAULT_KERNEL_PATH, "name": DEFAULT_KERNEL_PATH,
                            "type": "console"}
    if kernel_name:
        body["kernel"] = {"name": kernel_name}
    return body


async def _start_default_kernel(upstream: SessionUpstream, body: dict[str, Any],
                                on_error: Callable[[str], None]) -> tuple[str, str]:
    """(id, name) of the kernel the sessions API answers ``body`` with (found or started)."""
    try:
        status, model = await upstream.json("POST", "api/sessions", body)
    except (UpstreamError, TimeoutError) as exc:
        on_error("unreachable")
        raise UpstreamFailed("The session's Jupyter server did not answer",
                             reason="upstream_unreachable") from exc
    kernel_name = (body.get("kernel") or {}).get("name", "")
    if status in (404, 501) and kernel_name:
        raise BadRequest(f"The session has no kernel named {kernel_name!r}",
                         reason="unknown_kernel_name")
    if status != 201 or not isinstance(model, dict):
        on_error("bad_response")
        raise UpstreamFailed(f"The session's server could not start a kernel ({status})",
                             reason="kernel_start_failed")
    kernel = model.get("kernel") or {}
    return str(kernel.get("id", "")), str(kernel.get("name", ""))


async def _open_channels(upstream: SessionUpstream, kernel_id: str, settings: Settings,
                         on_error: Callable[[str], None]) -> KernelSocket:
    """The kernel's channels WebSocket, read as messages (a new ``session_id`` each time)."""
    try:
        opened = await upstream.websocket(
            f"api/kernels/{kernel_id}/channels", query=f"session_id={uuid.uuid4().hex}",
            leg=lambda: KernelSocket(max_message=settings.ws_max_message_size,
                                     heartbeat=settings.ws_heartbeat),
            limit=settings.upstream_timeout)
    except (HandshakeRefused, OSError, TimeoutError) as exc:
        on_error("refused")
        raise UpstreamFailed("Could not connect to the session's kernel",
                             reason="kernel_unreachable") from exc
    opened.leg.start(opened.leftover)
    return opened.leg


async def warm_kernel(upstreams: UpstreamAccess, settings: Settings, metrics: Metrics,
                      entry: Session) -> tuple[str, str]:
    """Start a warm pool entry's default kernel and have it answer once; its (name, id).

    The kernel is the execute API's (the sessions API's fixed path), so the
    claimed session's first execute finds it instead of starting one. A
    ``kernel_info_request`` over its channels is what a first client would
    send: once the kernel answered it, the first execute does not wait for
    the kernel's start-up (imports, ZMQ connections). The caller bounds the
    time (:data:`broker.pool.WARM_KERNEL_LIMIT`).
    """
    upstream = upstreams.for_session(entry)

    def on_error(kind: str) -> None:
        metrics.upstream_error(entry.backend, kind)

    kernel_id, name = await _start_default_kernel(upstream, _default_kernel_body(""), on_error)
    conn = KernelConnection(await _open_channels(upstream, kernel_id, settings, on_error),
                            kernel_id, name)
    try:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        await conn._send("kernel_info_request", queue, {})
        while (msg := await queue.get()) is not None:
            if msg.get("header", {}).get("msg_type") == "kernel_info_reply":
                return name, kernel_id
    finally:
        await conn.close()
    raise UpstreamFailed("The pool entry's kernel closed its channels",
                         reason="kernel_start_failed")
