"""``session-broker mcp``: the broker's sandboxes as Model Context Protocol tools.

Agent frameworks plug tools in through MCP. This server speaks MCP (stdio by
default, streamable HTTP with ``--http PORT``) on one side and the broker's
public agent API on the other, through :class:`broker.agent.client.AgentSession`;
it holds no credentials but the optional API key and the session tokens it
was given, and it can run anywhere that reaches the broker.

The SDK's API as used here: docs/protocols.md#model-context-protocol.

Invariants:

* One broker session per MCP client session, created on the first tool call
  (a client that only lists tools costs nothing) and deleted when that MCP
  session ends: at exit on stdio; on HTTP when the client ends its MCP session
  (``DELETE`` with its ``mcp-session-id``), when it stayed unused for
  ``idle_timeout`` seconds (the SDK forgets the MCP session then too), and at
  shutdown. The broker's own idle timeout and max age bound it anyway.
* Stateless HTTP (the 2026-07-28 protocol era) has no MCP session at all, so
  nothing tells two clients apart: there, the first call answers with a
  sandbox handle (random, unguessable) that later calls pass as ``sandbox``.
  A call without one never lands in somebody else's sandbox.
* Tool results are text a model can read: refusals and failures come back as
  tool errors carrying the broker's message, never as a crashed server.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from broker.agent.client import AgentSession, BrokerClientError, ExecutionResult

log = logging.getLogger(__name__)

#: Characters of output handed back per call; the rest is cut with a note.
OUTPUT_LIMIT = 20_000
#: Seconds between sweeps for MCP sessions that went quiet (HTTP).
_SWEEP_EVERY = 30.0
#: The sandbox key of the one MCP session a stdio server has.
STDIO = "stdio"
#: The header that names a streamable-HTTP MCP session.
SESSION_HEADER = "mcp-session-id"

INSTRUCTIONS = (
    "A persistent, isolated Jupyter kernel (Python by default) for this conversation. "
    "Variables, imports and files survive between execute_code calls; print what you "
    "want to see, the value of the last line is returned too."
)


def render(result: ExecutionResult, limit: int = OUTPUT_LIMIT) -> str:
    """An execution as the text a model reads: output, result, errors, bounded."""
    parts: list[str] = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
    for bundle in result.display:
        kinds = ", ".join(sorted(bundle))
        parts.append(f"[display: {kinds}] {bundle.get('text/plain', '')}".rstrip())
    if result.text is not None:
        parts.append(f"[result] {result.text}")
    if result.status == "timeout":
        parts.append("[timed out: the code was interrupted; the kernel's state is kept]")
    elif result.error is not None:
        parts.append(f"[error] {result.error.ename}: {result.error.evalue}")
    if result.truncated:
        parts.append("[output beyond the broker's limit was dropped]")
    text = "\n".join(parts) or "[no output]"
    if len(text) > limit:
        text = text[:limit] + f"\n[... {len(text) - limit} more characters cut]"
    return text


@dataclass
class _Held:
    sandbox: AgentSession
    used: float


class Sandboxes:
    """The broker session of each MCP client session (see the module's invariants)."""

    def __init__(self, broker_url: str, *, api_key: str | None = None,
                 idle_timeout: float = 1800.0) -> None:
        self.broker_url = broker_url
        self.api_key = api_key
        self.idle_timeout = idle_timeout
        self._held: dict[str, _Held] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def get(self, key: str) -> AgentSession:
        """The sandbox of MCP session ``key`` (created on first use)."""
        lock = self._opening.setdefault(key, asyncio.Lock())
        async with lock:
            held = self._held.get(key)
            if held is None:
                sandbox = AgentSession(self.broker_url, api_key=self.api_key)
                await sandbox.start()
                held = self._held[key] = _Held(sandbox, time.monotonic())
                log.info("MCP session got broker session %s", sandbox.id)
            held.used = time.monotonic()
            return held.sandbox

    async def release(self, key: str) -> None:
        """Delete one MCP session's broker session (nothing if it never had one)."""
        self._opening.pop(key, None)
        held = self._held.pop(key, None)
        if held is not None:
            try:
                await held.sandbox.close()
                log.info("broker session %s deleted: its MCP session ended", held.sandbox.id)
            except (BrokerClientError, OSError) as exc:
                log.warning("could not delete broker session %s: %s", held.sandbox.id, exc)

    async def sweep(self) -> None:
        """Delete sandboxes whose MCP session has been quiet for ``idle_timeout``."""
        now = time.monotonic()
        quiet = [k for k, h in self._held.items() if now - h.used > self.idle_timeout]
        await asyncio.gather(*(self.release(k) for k in quiet))

    async def close_all(self) -> None:
        """Shutdown: delete every sandbox this server opened."""
        await asyncio.gather(*(self.release(k) for k in list(self._held)))

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held


def _session_key(ctx: Context, handle: str) -> tuple[str, bool]:
    """(sandbox key, whether the caller must be told a new handle) for one tool call."""
    if handle:
        return f"handle:{handle}", False
    request = ctx.request_context.request
    if request is None:
        return STDIO, False
    session_id = request.headers.get(SESSION_HEADER)
    if session_id:
        return f"session:{session_id}", False
    return f"handle:{secrets.token_urlsafe(18)}", True


def build_server(sandboxes: Sandboxes) -> MCPServer[Any]:
    """The MCP server with the five sandbox tools, bound to ``sandboxes``."""

    server: MCPServer[Any] = MCPServer("jupyter-session-broker", instructions=INSTRUCTIONS)

    async def sandbox_of(ctx: Context, handle: str) -> tuple[AgentSession, str]:
        """The caller's sandbox, and a note naming its handle when the caller needs one."""
        key, new = _session_key(ctx, handle)
        if handle and key not in sandboxes:
            raise ToolError("Unknown or expired sandbox handle: leave `sandbox` out to start "
                            "a new sandbox")
        try:
            sandbox = await sandboxes.get(key)
        except BrokerClientError as exc:
            raise ToolError(f"The broker refused a sandbox: {exc.message}") from None
        note = (f"[sandbox: {key.removeprefix('handle:')} - pass it as `sandbox` in later "
                "calls to keep this state]\n") if new else ""
        return sandbox, note

    async def call(coro: Any) -> Any:
        try:
            return await coro
        except BrokerClientError as exc:
            raise ToolError(f"{exc.reason}: {exc.message}") from None

    # ``timeout`` is the tool's argument (the broker-side execution limit), not a wait here.
    @server.tool()
    async def execute_code(code: str, ctx: Context, timeout: float | None = None,  # noqa: ASYNC109
                           sandbox: str = "") -> str:
        """Run code in this conversation's kernel; returns stdout, stderr, the result and errors.

        State persists between calls. ``timeout`` (seconds) interrupts the code,
        keeping the kernel's state; the broker caps it. ``sandbox``: only over
        stateless HTTP, the handle the first call returned.
        """
        box, note = await sandbox_of(ctx, sandbox)
        return note + render(await call(box.execute(code, timeout=timeout)))

    @server.tool()
    async def upload_file(path: str, content: str, ctx: Context, encoding: str = "utf-8",
                          sandbox: str = "") -> str:
        """Write a file in the kernel's working directory (``encoding``: utf-8 or base64)."""
        if encoding not in ("utf-8", "base64"):
            raise ToolError("encoding must be 'utf-8' or 'base64'")
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" \
                else content.encode()
        except ValueError:
            raise ToolError("content is not valid base64") from None
        box, note = await sandbox_of(ctx, sandbox)
        info = await call(box.upload(path, data))
        return f"{note}wrote {info.path} ({info.size} bytes)"

    @server.tool()
    async def download_file(path: str, ctx: Context, sandbox: str = "") -> str:
        """Read a file: its text, or ``base64:`` and its bytes in base64 when it is not text."""
        box, note = await sandbox_of(ctx, sandbox)
        data: bytes = await call(box.download(path))
        try:
            return note + data.decode()
        except UnicodeDecodeError:
            return note + "base64:" + base64.b64encode(data).decode()

    @server.tool()
    async def list_files(ctx: Context, path: str = "", sandbox: str = "") -> str:
        """List a directory of the kernel's working directory ('' is its top)."""
        box, note = await sandbox_of(ctx, sandbox)
        entries = await call(box.list_files(path))
        lines = [f"{e.path}/" if e.type == "directory" else f"{e.path} ({e.size} bytes)"
                 for e in entries]
        return note + ("\n".join(lines) or "[empty]")

    @server.tool()
    async def restart_kernel(ctx: Context, sandbox: str = "") -> str:
        """Restart the kernel: variables and imports are lost, files are kept."""
        box, note = await sandbox_of(ctx, sandbox)
        restarted = await call(box.restart_kernel())
        return note + ("kernel restarted" if restarted else "no kernel was running yet")

    return server


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def _releasing(app: ASGIApp, sandboxes: Sandboxes) -> ASGIApp:
    """Wrap the SDK's HTTP app: a client's ``DELETE`` of its MCP session frees its sandbox."""

    async def wrapped(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await app(scope, receive, send)
        if scope.get("type") == "http" and scope.get("method") == "DELETE":
            headers = dict(scope.get("headers") or [])
            session_id = headers.get(SESSION_HEADER.encode())
            if session_id:
                await sandboxes.release(f"session:{session_id.decode('latin-1')}")

    return wrapped


async def serve(broker_url: str, *, api_key: str | None = None, http_port: int | None = None,
                http_host: str = "127.0.0.1") -> None:
    """Serve MCP on stdio, or on streamable HTTP at ``http_host:http_port``/mcp, until ended."""
    sandboxes = Sandboxes(broker_url, api_key=api_key)
    server = build_server(sandboxes)
    try:
        if http_port is None:
            await server.run_stdio_async()
            return
        import uvicorn  # the SDK's own HTTP server dependency

        app = server.streamable_http_app(session_idle_timeout=sandboxes.idle_timeout)
        config = uvicorn.Config(_releasing(app, sandboxes), host=http_host, port=http_port,
                                log_level="info")

        async def sweeping() -> None:
            while True:
                await asyncio.sleep(_SWEEP_EVERY)
                await sandboxes.sweep()

        sweeper = asyncio.create_task(sweeping())
        try:
            await uvicorn.Server(config).serve()
        finally:
            sweeper.cancel()
    finally:
        await sandboxes.close_all()


def run(broker_url: str, *, api_key: str | None = None, http_port: int | None = None) -> None:
    """The console entry: :func:`serve` on a new event loop."""
    asyncio.run(serve(broker_url, api_key=api_key, http_port=http_port))
