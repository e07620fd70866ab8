"""A small async Python client for the broker's agent API.

For agent tools that want an isolated, stateful Python (or other Jupyter
kernel) without speaking the Jupyter protocol::

    from broker.client import AgentSession

    async with AgentSession("http://127.0.0.1:8765") as sandbox:
        await sandbox.execute("import math; r = 2")
        result = await sandbox.execute("math.pi * r ** 2")
        print(result.text)               # '12.566370614359172'
        await sandbox.upload("data.csv", b"a,b\\n1,2\\n")
        png = await sandbox.download("plot.png")

Agent platforms that were given an API key pass ``api_key=``: the session
then counts against that key's limits instead of the machine's address.
Refusals that may pass later (429 rate limits, 503 capacity or a store
outage) are retried, honouring the broker's ``Retry-After``, until
``retry_budget`` seconds have been spent waiting; then they are raised.
:class:`SyncAgentSession` offers the same calls for code that is not async.

Leaving the ``async with`` block deletes the session unless ``keep=True``;
keep it and save ``sandbox.token`` to get the same session (and kernel
state) back later with ``AgentSession(url, token=saved_token)``. Refusals
raise :class:`BrokerClientError` with the broker's status and reason; code
that fails or times out is not a refusal: it is an :class:`ExecutionResult`
with ``status`` ``"error"`` or ``"timeout"``.

Only ``aiohttp`` is needed. Every HTTP call is the plain JSON API documented
at ``/api/v1/openapi.json`` and in ``docs/agents.md``.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from broker.backoff import retry_after_seconds
from broker.sse import json_events

__all__ = [
    "AgentSession",
    "BrokerClientError",
    "ExecutionError",
    "ExecutionResult",
    "FileInfo",
    "OutputEvent",
    "SyncAgentSession",
]

_T = TypeVar("_T")
#: Statuses worth waiting out: the broker says when with ``Retry-After``.
_RETRIED = frozenset({429, 503})
#: Seconds to wait on a retryable refusal that named no ``Retry-After``.
_DEFAULT_RETRY_AFTER = 1.0
#: The Jupyter session path of the default kernel the execute API runs code on.
DEFAULT_KERNEL_PATH = "broker-execute"

_DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10)
#: Executions last as long as their own time limit; only the connect is bounded here.
_EXECUTE_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class BrokerClientError(Exception):
    """The broker refused a call (its JSON error: status, reason, message)."""

    def __init__(self, status: int, reason: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        #: Seconds the broker asked the client to wait (429/503), if it said.
        self.retry_after = retry_after


@dataclass(frozen=True)
class ExecutionError:
    """An exception raised by the executed code (or a timeout / kernel death)."""

    ename: str
    evalue: str
    traceback: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.traceback) or f"{self.ename}: {self.evalue}"


@dataclass(frozen=True)
class ExecutionResult:
    """What one execute call produced; ``status`` is ``ok``, ``error`` or ``timeout``."""

    status: str
    execution_count: int | None
    stdout: str
    stderr: str
    #: The MIME bundle of the last expression's value (``{"text/plain": ...}``), if any.
    result: dict[str, Any] | None
    #: MIME bundles shown with ``display()`` (HTML, images as base64, ...), in order.
    display: list[dict[str, Any]]
    error: ExecutionError | None
    duration_ms: int
    #: True when output beyond the broker's per-call cap was dropped.
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the code ran to the end without an exception."""
        return self.status == "ok"

    @property
    def text(self) -> str | None:
        """The plain-text form of the result value, if the code ended with an expression."""
        return None if self.result is None else self.result.get("text/plain")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecutionResult:
        """Build from the broker's JSON summary (also the final ``done`` event)."""
        error = data.get("error")
        return cls(
            status=data["status"],
            execution_count=data.get("execution_count"),
            stdout=data.get("stdout", ""),
            stderr=data.get("stderr", ""),
            result=data.get("result"),
            display=list(data.get("display") or []),
            error=ExecutionError(error["ename"], error["evalue"], list(error["traceback"]))
            if error else None,
            duration_ms=int(data.get("duration_ms", 0)),
            truncated=bool(data.get("truncated", False)),
        )


@dataclass(frozen=True)
class OutputEvent:
    """One output of a streamed execution, as it arrived.

    ``type`` is ``stream`` (``data["name"]``, ``data["text"]``), ``display`` or
    ``result`` (``data["data"]`` is the MIME bundle), ``update_display``,
    ``error`` (``ename``, ``evalue``, ``traceback``) or ``clear_output``.
    """

    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class FileInfo:
    """A file or directory in the session's working directory."""

    name: str
    path: str
    type: str  # "file" | "directory"
    size: int | None
    last_modified: str | None
    mimetype: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileInfo:
        """Build from one entry of the broker's files API."""
        return cls(data["name"], data["path"], data["type"], data.get("size"),
                   data.get("last_modified"), data.get("mimetype"))


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise BrokerClientError(resp.status, str(body.get("reason") or body.get("error") or "error"),
                            str(body.get("message") or resp.reason or ""),
                            retry_after_seconds(resp.headers.get("Retry-After")))


class AgentSession:
    """One broker session used as a code sandbox: create or reuse, run code, move files.

    ``token``: a token from an earlier session of the same owner and spec; the
    broker hands that session back while it is alive (``reused`` is then true)
    and creates a new one otherwise. ``keep``: leave the session running when
    the ``async with`` block ends (it still expires with the broker's max age
    and idle timeout). ``http``: an existing aiohttp session to use (not closed
    by this object). ``api_key``: the platform's key (``BROKER_API_KEYS`` on the
    broker); it is sent only when creating or reusing a session, the session
    token does the rest. ``retry_budget``: seconds this object may spend in
    total waiting out 429/503 refusals (0 raises the first one).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        token: str | None = None,
        spec: str = "",
        kernel_name: str = "",
        keep: bool = False,
        http: aiohttp.ClientSession | None = None,
        api_key: str | None = None,
        retry_budget: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.broker_url = broker_url.rstrip("/")
        self.api_key = api_key
        #: Seconds still available for waiting out 429/503 refusals.
        self.retry_budget = retry_budget
        self._sleep = sleep
        self.token = token
        self.spec = spec
        self.kernel_name = kernel_name
        self.keep = keep
        self.id = ""
        self.reused = False
        #: The broker's full description of the session (status, base_url, expires_at, ...).
        self.info: dict[str, Any] = {}
        self._http = http
        self._own_http = http is None

    # -- lifecycle -------------------------------------------------------------------
    @property
    def http(self) -> aiohttp.ClientSession:
        """The HTTP client (created on first use)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=_DEFAULT_TIMEOUT)
        return self._http

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def _url(self, *tail: str) -> URL:
        return URL(f"{self.broker_url}/api/v1/sessions/{self.id}/" + "/".join(tail),
                   encoded=True)

    @asynccontextmanager
    async def _call(self, method: str, url: str | URL,
                    **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP call; a 429/503 is waited out and retried while the budget lasts.

        Only calls the broker refused before doing anything are retried (a
        refusal is an answer, not a half-done call), so retrying never runs
        code twice.
        """
        while True:
            wait = _DEFAULT_RETRY_AFTER
            async with self.http.request(method, url, **kwargs) as resp:
                if resp.status not in _RETRIED:
                    yield resp
                    return
                try:
                    await _raise_for(resp)
                except BrokerClientError as refusal:
                    if refusal.retry_after is not None:
                        wait = refusal.retry_after
                    if wait > self.retry_budget:
                        raise
                    self.retry_budget -= wait
            await self._sleep(wait)

    async def start(self) -> AgentSession:
        """Create the session (or get the earlier one back) and wait until it is ready."""
        body = {k: v for k, v in (("spec", self.spec), ("kernel_name", self.kernel_name)) if v}
        params = {"wait": "true"}
        headers = self._headers()
        if self.api_key:
            # The key names the owner; an earlier session's token travels as ?token=.
            headers = {"Authorization": f"Bearer {self.api_key}"}
            if self.token:
                params["token"] = self.token
        async with self._call("POST", f"{self.broker_url}/api/v1/sessions", params=params,
                              json=body or None, headers=headers) as resp:
            await _raise_for(resp)
            self.info = await resp.json()
            self.reused = resp.status == 200
        self.id = self.info["id"]
        self.token = self.info["token"]
        if self.info.get("status") != "ready":
            raise BrokerClientError(503, self.info.get("status", "pending"),
                                    self.info.get("message", "The session is not ready"))
        return self

    async def close(self) -> None:
        """Delete the session (its kernel and files go away) and close the HTTP client."""
        try:
            if self.id:
                url = URL(f"{self.broker_url}/api/v1/sessions/{self.id}", encoded=True)
                async with self._call("DELETE", url, headers=self._headers()) as resp:
                    if resp.status != 404:  # already gone is fine
                        await _raise_for(resp)
        finally:
            await self.aclose_http()

    async def aclose_http(self) -> None:
        """Close the HTTP client if this object created it; the session lives on."""
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> AgentSession:
        try:
            return await self.start()
        except BaseException:
            await self.aclose_http()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.keep:
            await self.aclose_http()
        else:
            await self.close()

    # -- code -----------------------------------------------------------------------
    def _execute_body(self, code: str, timeout: float | None,
                      kernel_name: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"code": code}
        if timeout is not None:
            body["timeout"] = timeout
        if kernel_name:
            body["kernel_name"] = kernel_name
        return body

    # ``timeout`` is the broker-side execution limit (the API's field), not a client
    # wait: past it the broker interrupts the kernel and answers status "timeout".
    async def execute(self, code: str, *, timeout: float | None = None,  # noqa: ASYNC109
                      kernel_name: str | None = None) -> ExecutionResult:
        """Run code on the session's kernel (state persists between calls).

        ``timeout``: seconds before the broker interrupts the code (its default
        and cap are broker settings); the result then has status ``timeout``.
        """
        async with self._call("POST", self._url("execute"), headers=self._headers(),
                              json=self._execute_body(code, timeout, kernel_name),
                              timeout=_EXECUTE_TIMEOUT) as resp:
            await _raise_for(resp)
            return ExecutionResult.from_json(await resp.json())

    async def stream(self, code: str, *, timeout: float | None = None,  # noqa: ASYNC109
                     kernel_name: str | None = None,
                     ) -> AsyncIterator[OutputEvent | ExecutionResult]:
        """Run code and yield each output as it arrives, then the :class:`ExecutionResult`."""
        headers = {**self._headers(), "Accept": "text/event-stream"}
        async with self._call("POST", self._url("execute"), headers=headers,
                              json=self._execute_body(code, timeout, kernel_name),
                              timeout=_EXECUTE_TIMEOUT) as resp:
            await _raise_for(resp)
            async for event in json_events(resp.content):
                kind = event.pop("type")
                if kind == "done":
                    yield ExecutionResult.from_json(event)
                    return
                if kind == "failed":
                    raise BrokerClientError(int(event.get("status_code", 502)),
                                            str(event.get("reason", "failed")),
                                            str(event.get("message", "")))
                yield OutputEvent(kind, event)
        raise BrokerClientError(502, "stream_ended", "The stream ended without a result")

    async def restart_kernel(self) -> bool:
        """Restart the session's default kernel (its variables are lost, its files kept).

        Returns False when no code has run yet (there is no default kernel to
        restart). Goes through the session's Jupyter API (``base_url``), where
        the default kernel is the Jupyter session at path ``broker-execute``.
        """
        base = str(self.info.get("base_url", ""))
        async with self._call("GET", f"{base}api/sessions", headers=self._headers()) as resp:
            await _raise_for(resp)
            listed = await resp.json()
        kernel = next((s.get("kernel") or {} for s in listed
                       if s.get("path") == DEFAULT_KERNEL_PATH), None)
        if not kernel or not kernel.get("id"):
            return False
        async with self._call("POST", f"{base}api/kernels/{kernel['id']}/restart",
                              headers=self._headers()) as resp:
            await _raise_for(resp)
        return True

    # -- files ---------------------------------------------------------------------
    @staticmethod
    def _path(path: str) -> str:
        return urllib.parse.quote(path.lstrip("/"), safe="/")

    async def upload(self, path: str, data: bytes | str) -> FileInfo:
        """Write a file (parent directories are created); ``str`` is stored as UTF-8."""
        payload = data.encode() if isinstance(data, str) else data
        async with self._call("PUT", self._url("files", self._path(path)), data=payload,
                              headers={**self._headers(),
                                       "Content-Type": "application/octet-stream"}) as resp:
            await _raise_for(resp)
            return FileInfo.from_json(await resp.json())

    async def download(self, path: str) -> bytes:
        """A file's exact bytes."""
        async with self._call("GET", self._url("files", self._path(path)),
                              headers=self._headers()) as resp:
            await _raise_for(resp)
            return await resp.read()

    async def list_files(self, path: str = "") -> list[FileInfo]:
        """The entries of a directory ('' is the session's working directory)."""
        tail = self._path(path).rstrip("/")
        url = self._url("files", tail + "/") if tail else self._url("files")
        async with self._call("GET", url, headers=self._headers()) as resp:
            await _raise_for(resp)
            return [FileInfo.from_json(e) for e in (await resp.json())["entries"]]

    async def delete_file(self, path: str) -> None:
        """Remove a file or an empty directory."""
        async with self._call("DELETE", self._url("files", self._path(path)),
                              headers=self._headers()) as resp:
            await _raise_for(resp)


class SyncAgentSession:
    """:class:`AgentSession` for code that is not async (scripts, most agent frameworks).

    Every call runs on an event loop in a thread of this object's own, so it
    works the same from plain code and from inside a running loop (a notebook).
    Use it as a context manager, or call :meth:`close` (or :meth:`detach` to
    keep the session), which also stops the thread. Arguments are those of
    :class:`AgentSession`.
    """

    def __init__(self, broker_url: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="broker-client", daemon=True)
        self._thread.start()
        self._async = AgentSession(broker_url, **kwargs)

    def _run(self, call: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @property
    def id(self) -> str:
        """The session id."""
        return self._async.id

    @property
    def token(self) -> str | None:
        """The session token (save it to get the session back later)."""
        return self._async.token

    @property
    def reused(self) -> bool:
        """True when an earlier session was handed back."""
        return self._async.reused

    @property
    def info(self) -> dict[str, Any]:
        """The broker's description of the session."""
        return self._async.info

    def start(self) -> SyncAgentSession:
        """Create the session (or get the earlier one back) and wait until it is ready."""
        self._run(self._async.start())
        return self

    def execute(self, code: str, *, timeout: float | None = None,
                kernel_name: str | None = None) -> ExecutionResult:
        """Run code on the session's kernel; see :meth:`AgentSession.execute`."""
        return self._run(self._async.execute(code, timeout=timeout, kernel_name=kernel_name))

    def stream(self, code: str, *, timeout: float | None = None,
               kernel_name: str | None = None) -> Iterator[OutputEvent | ExecutionResult]:
        """Run code and yield each output as it arrives, then the result."""
        events = self._async.stream(code, timeout=timeout, kernel_name=kernel_name)

        async def following() -> OutputEvent | ExecutionResult | None:
            return await anext(events, None)

        async def stop() -> None:
            aclose = getattr(events, "aclose", None)  # an async generator's
            if aclose is not None:
                await aclose()

        try:
            while (event := self._run(following())) is not None:
                yield event
        finally:
            self._run(stop())

    def restart_kernel(self) -> bool:
        """Restart the default kernel; see :meth:`AgentSession.restart_kernel`."""
        return self._run(self._async.restart_kernel())

    def upload(self, path: str, data: bytes | str) -> FileInfo:
        """Write a file; see :meth:`AgentSession.upload`."""
        return self._run(self._async.upload(path, data))

    def download(self, path: str) -> bytes:
        """A file's exact bytes."""
        return self._run(self._async.download(path))

    def list_files(self, path: str = "") -> list[FileInfo]:
        """The entries of a directory ('' is the session's working directory)."""
        return self._run(self._async.list_files(path))

    def delete_file(self, path: str) -> None:
        """Remove a file or an empty directory."""
        self._run(self._async.delete_file(path))

    def close(self) -> None:
        """Delete the session and stop the client's thread."""
        try:
            self._run(self._async.close())
        finally:
            self._stop()

    def detach(self) -> None:
        """Leave the session running (keep :attr:`token`) and stop the client's thread."""
        try:
            self._run(self._async.aclose_http())
        finally:
            self._stop()

    def __enter__(self) -> SyncAgentSession:
        try:
            return self.start()
        except BaseException:
            self.detach()
            raise

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._async.keep:
            self.detach()
        else:
            self.close()
