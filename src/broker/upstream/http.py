"""A keep-alive HTTP/1.1 client for the REST proxy's hot path.

Why not aiohttp's ``ClientSession`` here: a profile of the broker forwarding
``GET api/kernels`` put about a third of its CPU per request in that client's
general machinery (URL objects, request_info, cookie and redirect handling,
per-read timer rescheduling, StreamReader), for a job that is fixed on this
path: send one request whose headers the broker already chose, read a
status, headers and a body, pass them on. This client writes the request head
in one ``write``, parses the answer with httptools (llhttp, in C) from the
protocol's ``data_received``, and keeps idle connections per upstream origin
for the next request.

What it keeps from a general client: TLS for ``https`` upstreams; connect and
read timeouts (the read timeout is per read, as aiohttp's ``sock_read``, and
checked by one timer per request rather than one reschedule per chunk);
chunked and close-delimited bodies; flow control for streamed bodies (reading
from the upstream pauses while the client is slow); and one retry on a fresh
connection when a *reused* connection turns out to have been closed by the
upstream before it sent a byte, for idempotent methods only (the classic
keep-alive race; a POST is never sent twice).

It never follows redirects, stores cookies or decompresses: the proxy passes
bytes and filters headers itself (see :mod:`broker.proxy.rest`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterable

import httptools
from multidict import CIMultiDict
from yarl import URL

from broker.backoff import Backoff, retry

#: Methods that may be retried once on a fresh connection (RFC 9110 idempotent).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: A streamed body pauses the upstream above this many unread bytes, resumes below LOW.
HIGH_WATER, LOW_WATER = 256 * 1024, 64 * 1024
_Key = tuple[str, str, int]


class UpstreamError(ConnectionError):
    """The upstream could not be reached, or did not answer with valid HTTP."""


class _Stale(UpstreamError):
    """A reused connection was closed by the upstream before any answer."""


def _stale(exc: BaseException) -> bool:
    return isinstance(exc, _Stale)


#: The stale-connection retry: no pause (a fresh connection is all it needs).
_AT_ONCE = Backoff(start=0.0, cap=0.0)


class UpstreamResponse:
    """One response: status and headers once :meth:`UpstreamPool.request` returns;
    the body by :meth:`read` (whole) or :meth:`iter_chunks` (streamed).

    Always :meth:`close` it (``async with`` does): an unfinished response
    closes its connection, a finished one has already gone back to the pool.
    """

    __slots__ = ("_chunks", "_conn", "_error", "_head", "_last_read", "_paused", "_raw_headers",
                 "_read_timeout", "_size", "_timer", "_waiter", "complete", "headers", "loop",
                 "method", "status", "until_eof")

    def __init__(self, conn: _Conn, method: str, read_timeout: float) -> None:
        self.loop = conn.loop
        self._conn: _Conn | None = conn
        self.method = method
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.complete = False
        self.until_eof = False  # a body without length or chunking ends at the close
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] = self.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._read_timeout = read_timeout
        self._last_read = self.loop.time()
        self._timer: asyncio.TimerHandle | None = (
            self.loop.call_later(read_timeout, self._check_timeout) if read_timeout else None)

    # -- the body, for the caller ------------------------------------------------
    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower-cased (``""`` when absent)."""
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body (for bodies the caller knows to be small)."""
        while not self.complete:
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; reading from the upstream pauses while it is not consumed."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._size -= len(chunk)
                if self._paused and self._size < LOW_WATER and self._conn is not None:
                    self._paused = False
                    self._last_read = self.loop.time()  # the pause was ours, not the upstream's
                    self._conn.resume()
                yield chunk
            if self.complete:
                return
            await self._wait()

    def close(self) -> None:
        """Release the response: a connection still mid-body is closed, never reused."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self._conn = self._conn, None
        if conn is not None and not self.complete:
            conn.abandon()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- events, from the connection ----------------------------------------------
    def got_head(self, status: int, *, no_body: bool) -> None:
        self.status = status
        self.headers = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            for name, value in self._raw_headers)
        self._raw_headers = []
        self.until_eof = (not no_body and "Content-Length" not in self.headers
                          and "Transfer-Encoding" not in self.headers)
        if not self._head.done():
            self._head.set_result(None)

    def got_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()
        self._wake()

    def got_end(self) -> None:
        self.complete = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn = None  # the connection now belongs to the pool (or is closed)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.complete or self._error is not None:
            return
        self._error = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved: the caller may already have gone
        self._wake()

    def _check_timeout(self) -> None:
        """One timer per response, re-armed from the time of the last read."""
        self._timer = None
        if self.complete or self._error is not None:
            return
        quiet = self.loop.time() - self._last_read
        if self._paused or quiet < self._read_timeout:
            delay = self._read_timeout if self._paused else self._read_timeout - quiet
            self._timer = self.loop.call_later(delay, self._check_timeout)
            return
        conn = self._conn
        self.fail(TimeoutError("the upstream did not answer in time"))
        if conn is not None:
            conn.abandon()


class _Conn(asyncio.Protocol):
    """One upstream connection; httptools calls the ``on_*`` methods from ``feed_data``."""

    __slots__ = ("answered", "closed", "head_method", "idle_since", "key", "loop", "parser",
                 "pool", "response", "reused", "transport")

    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.head_method = False
        self.answered = False  # a byte of the current response has arrived
        self.closed = False
        self.reused = False
        self.idle_since = 0.0

    # -- asyncio protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(OSError, AttributeError):
            transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection is not reusable
            self.abandon()
            return
        response._last_read = self.loop.time()
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response.fail(UpstreamError(f"invalid HTTP from the upstream: {exc}"))
            self.abandon()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is None or response.complete:
            return
        if response.until_eof and response._head.done():
            response.got_end()  # a close-delimited body ends here
        elif self.reused and not self.answered:
            response.fail(_Stale("the upstream closed an idle connection"))
        else:
            response.fail(UpstreamError("the upstream closed the connection mid-response"))

    # -- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.response is None:  # a second answer to one request: never reuse this
            self.abandon()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 1xx interim answers carry no body; the real one follows
            response._raw_headers = []
            return
        response.got_head(status, no_body=self.head_method or status in (204, 304))
        if self.head_method:  # llhttp cannot know a HEAD answer has no body: end it here
            self.response = None
            response.got_end()
            self.abandon()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.got_body(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or not response._head.done():
            return  # (the end of a 1xx interim answer: the real one follows)
        self.response = None
        reusable = self.parser.should_keep_alive() and not response.until_eof
        response.got_end()
        if reusable:
            self.pool.put(self)
        else:
            self.abandon()

    # -- helpers ---------------------------------------------------------------------
    def send(self, head: bytes, body: bytes | None, response: UpstreamResponse,
             head_method: bool) -> None:
        assert self.transport is not None
        self.response = response
        self.head_method = head_method
        self.answered = False
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abandon(self) -> None:
        """Close; never handed out again."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections per upstream origin (scheme, host, port).

    At most ``max_idle`` idle connections are kept per origin, each for at
    most ``idle_expiry`` seconds, newest first. The default stays under the
    shortest keep-alive timeout a Jupyter upstream is likely to have: Node's
    5 s, in configurable-http-proxy in front of JupyterHub and BinderHub
    servers. A connection the server closes while a request is on its way
    (the stale-connection race) then stays rare; GETs retry it anyway.
    """

    def __init__(self, *, connect_timeout: float = 10.0, max_idle: int = 64,
                 idle_expiry: float = 4.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self._ssl = ssl_context
        self._idle: dict[_Key, list[_Conn]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, method: str, url: URL, headers: Iterable[tuple[str, str]],
                      body: bytes | None = None, *, query: str | None = None,
                      read_timeout: float = 300.0) -> UpstreamResponse:
        """Send one request; returns once the status and headers are in.

        ``url`` must be absolute and already encoded: its raw path is sent as
        it is, with ``query`` (raw, without ``?``) when given, else the URL's
        own query. Raises :class:`UpstreamError` or :class:`TimeoutError`.
        """
        secure = url.scheme == "https"
        host = url.raw_host or ""
        port = url.port or (443 if secure else 80)
        key = (url.scheme, host, port)
        target = url.raw_path_qs if query is None else (
            f"{url.raw_path}?{query}" if query else url.raw_path)
        head = _request_head(method, target or "/", host, port, secure, headers, body)

        async def attempt() -> UpstreamResponse:
            conn = self._take(key) or await self._connect(key)
            response = UpstreamResponse(conn, method, read_timeout)
            conn.send(head, body, response, method == "HEAD")
            try:
                await response._head
            except BaseException:
                response.close()
                raise
            return response

        # A kept-alive connection the server closed as the request went out (the
        # stale-connection race): an idempotent request goes once more, at once.
        return await retry(attempt, _AT_ONCE, retry_on=_stale,
                           attempts=2 if method in IDEMPOTENT else 1)

    async def close(self) -> None:
        """Close every idle connection (responses in flight close their own)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn.abandon()
        self._idle.clear()

    def idle_count(self) -> int:
        """Idle connections held now (for tests and metrics)."""
        return sum(len(conns) for conns in self._idle.values())

    # -- internals -------------------------------------------------------------------
    def _take(self, key: _Key) -> _Conn | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        oldest = asyncio.get_running_loop().time() - self.idle_expiry
        while conns:
            conn = conns.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if conn.idle_since < oldest:
                conn.abandon()
                continue
            conn.reused = True
            return conn
        return None

    def put(self, conn: _Conn) -> None:
        """A finished connection back to the pool (or closed, if the pool is full)."""
        if self._closed or conn.closed:
            conn.abandon()
            return
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle:
            conn.abandon()
            return
        conn.idle_since = conn.loop.time()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.idle_expiry, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle past their expiry (so sockets do not linger)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self.idle_expiry
        for key in list(self._idle):
            keep = []
            for conn in self._idle[key]:
                if conn.closed or conn.idle_since < oldest:
                    conn.abandon()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle and not self._closed:
            self._sweeper = loop.call_later(self.idle_expiry, self._sweep)

    async def _connect(self, key: _Key) -> _Conn:
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, key), host, port, ssl=context,
                    server_hostname=host if context is not None else None)
        except TimeoutError as exc:
            raise UpstreamError(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") \
                from exc
        return conn


def _request_head(method: str, target: str, host: str, port: int, secure: bool,
                  headers: Iterable[tuple[str, str]], body: bytes | None) -> bytes:
    """The request line and headers, as bytes; refuses CR/LF in any field."""
    default_port = port == (443 if secure else 80)
    lines = [f"{method} {target} HTTP/1.1\r\nHost: "
             f"{host if default_port else f'{host}:{port}'}\r\n"]
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    breaks = len(lines) + 1
    if text.count("\n") != breaks or text.count("\r") != breaks:  # a field smuggled one
        raise UpstreamError("refusing a request header with a line break")
    return text.encode("utf-8", "surrogateescape")
