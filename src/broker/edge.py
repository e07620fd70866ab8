"""The HTTP edge: what every client connection goes through before the app sees it.

aiohttp's server has limits on line and header sizes and an idle keep-alive
timer, but no timeout for a request's headers or a stalled body and no cap on
open connections: a client sending its headers a byte at a time (slowloris),
or a body declared as 10 GB of which 10 bytes come, holds a connection and its
file descriptor for as long as it likes, and at the process's file limit the
broker stops answering everyone. This module adds, with public aiohttp API only:

* :class:`EdgeHandler`, a subclass of aiohttp's public ``web.RequestHandler``
  (the protocol of one client connection). It refuses a connection beyond the
  cap with a canned ``503 too_many_connections`` (Retry-After) before aiohttp
  allocates anything for it, remembers when the current request's bytes
  started and last arrived, and answers parser-level refusals (bad request
  line, over-long line, too many headers, bad URL characters) with the
  broker's JSON error shape instead of aiohttp's plain text.
* :class:`Edge`, which owns the listening socket (``loop.create_server`` with
  a factory of those handlers, since ``web.TCPSite`` always uses aiohttp's
  own) and one sweep timer per second for all connections: headers not
  complete within ``header_timeout`` get ``408 header_timeout`` and the
  connection closes; a body with no byte for ``body_timeout`` while the
  handler waits for it is dropped. One timer for all connections instead of
  one per connection: timeouts are whole seconds, so this costs one walk
  over the open set per second and nothing per request.
* :class:`AcceptErrorLog`, a loop exception handler: at the file limit
  asyncio reports ``socket.accept() out of system resource`` once per pending
  connection per retry, thousands of lines a second; it logs one summary line
  per interval instead.

The app's outermost middleware tells the handler when a request's headers
are complete (:meth:`EdgeHandler.handling`) and when its handler returned
(:meth:`EdgeHandler.handled`); without an :class:`Edge` (tests that use
``web.TCPSite``) those hooks are simply not there.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
from collections.abc import Callable
from typing import Any, cast

from aiohttp import http_exceptions, web
from aiohttp.streams import StreamReader

from broker.settings import Settings

log = logging.getLogger(__name__)

#: File descriptors kept out of the connection cap's reach: the store, the
#: backend's clients and servers, log files, and refused connections' last bytes.
FD_RESERVE = 100
#: Connections being refused (answer written, closing) beyond which a new one
#: is closed without an answer: even the refusal costs a descriptor for a moment.
MAX_REFUSING = 50
#: Seconds a refused connection may take to read its 503 before it is closed.
REFUSAL_LINGER = 1.0
#: Seconds between two sweeps of the open connections.
SWEEP_INTERVAL = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def fd_limit() -> int:
    """This process's soft limit on open files."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def effective_max_connections(configured: int, limit: int | None = None) -> int:
    """BROKER_MAX_CONNECTIONS, lowered to what the open-file limit can hold.

    Each proxied connection may also hold an upstream one, hence the halving.
    """
    limit = fd_limit() if limit is None else limit
    if limit == resource.RLIM_INFINITY or limit <= 0:
        affordable = 1 << 20
    else:
        affordable = max(1, (limit - FD_RESERVE) // 2)
    return min(configured, affordable) if configured else affordable


def _canned(status: int, phrase: str, reason: str, message: str,
            extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response written before (or instead of) aiohttp's parser.

    Used where no request object exists yet: the connection cap and the
    header timeout. Same body shape as every other refusal.
    """
    body = json.dumps({"error": reason, "reason": reason, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}"
            "X-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode() + body


_TOO_MANY = _canned(503, "Service Unavailable", "too_many_connections",
                    "The broker holds as many connections as it can; retry shortly",
                    "Retry-After: 1\r\n")
_HEADER_TIMEOUT = _canned(408, "Request Timeout", "header_timeout",
                          "The request headers did not arrive in time")

#: Parser refusals by exception class: (reason, message). The message is ours,
#: never the parser's, which may quote the request line (and a ?token= in it).
_PARSER_REASONS: list[tuple[type[Exception], str, str]] = [
    (http_exceptions.LineTooLong, "line_too_long",
     "A request line or header line is longer than the broker accepts"),
    (http_exceptions.InvalidURLError, "bad_url", "The request target is not a valid URL"),
    (http_exceptions.BadHttpMethod, "bad_method", "The request method is not valid"),
    (http_exceptions.BadStatusLine, "bad_request_line", "The request line is malformed"),
    (http_exceptions.InvalidHeader, "bad_header", "A request header is malformed"),
]


def parser_refusal(exc: BaseException | None) -> tuple[str, str]:
    """The (reason, message) of a request aiohttp's parser refused."""
    for kind, reason, message in _PARSER_REASONS:
        if isinstance(exc, kind):
            return reason, message
    if isinstance(exc, http_exceptions.BadHttpMessage) and "too many headers" in str(exc).lower():
        return "too_many_headers", "The request has more headers than the broker accepts"
    return "bad_request", "The request is not valid HTTP"


def add_security_headers(response: web.StreamResponse) -> None:
    """Nothing the broker answers may run as a page in its origin.

    Proxied responses include files a session's own code can write (kernelspec
    resources such as SVG logos); with ``nosniff`` and a sandboxing CSP a
    script inside one cannot run with the broker's origin (where thebe keeps
    saved tokens). The one HTML page the broker serves itself (the live page,
    :mod:`broker.api.page`) sets its own, stricter-than-nothing policy first.
    Here, below the middleware, because the edge's own refusals need it too.
    """
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Content-Security-Policy", "default-src 'none'; sandbox")
    headers.setdefault("Referrer-Policy", "no-referrer")


class EdgeHandler(web.RequestHandler):
    """aiohttp's connection protocol plus the edge's bookkeeping (see the module doc)."""

    __slots__ = ("_body", "_conn", "_edge", "_handler_since", "_in_handler", "_last_rx",
                 "_refused", "_served", "_since")

    def __init__(self, edge: Edge, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._conn: asyncio.Transport | None = None
        self._refused = False
        self._since: float | None = None  # when the current request's headers began
        self._last_rx = 0.0
        self._in_handler = False
        self._handler_since = 0.0
        self._body: StreamReader | None = None
        self._served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        edge = self._edge
        tcp = cast(asyncio.Transport, transport)
        if len(edge.open) >= edge.max_connections:
            self._refused = True
            edge.refuse(tcp)
            return
        self._conn = tcp
        self._since = self._last_rx = edge.loop.time()  # an idle new connection counts too
        edge.open.add(self)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the refusal is written; what the client still sends is dropped
        now = self._last_rx = self._edge.loop.time()
        if self._since is None and not self._in_handler and self._body_done():
            self._since = now  # the first byte of the next request's headers
        super().data_received(data)

    def _body_done(self) -> bool:
        """The last request's body is complete (bytes now are a new request, not the
        rest of a body aiohttp is still discarding)."""
        return self._body is None or self._body.is_eof()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            self._edge.refusing -= 1
            return
        self._edge.open.discard(self)
        super().connection_lost(exc)

    def handling(self, request: web.BaseRequest) -> None:
        """A request's headers are complete: its handler starts (called by middleware)."""
        self._in_handler = True
        self._since = None
        self._handler_since = self._edge.loop.time()
        self._body = request.content

    def handled(self) -> None:
        """The handler returned; bytes already here may belong to the next request."""
        self._in_handler = False
        self._served += 1
        early = self._last_rx > self._handler_since and self._body_done()
        self._since = self._last_rx if early else None

    def sweep(self, now: float) -> None:
        """Enforce the header and body timeouts on this connection (the edge's timer)."""
        conn, edge = self._conn, self._edge
        if conn is None:
            return
        if conn.get_protocol() is not self:  # taken over by set_protocol: ours until closed
            if conn.is_closing():
                edge.open.discard(self)
            return
        if conn.is_closing():
            return
        if self._in_handler:
            body = self._body
            if (body is not None and not body.is_eof() and conn.is_reading()
                    and now - max(self._last_rx, self._handler_since) > edge.body_timeout):
                log.info("dropped a connection whose request body stalled for %g s",
                         edge.body_timeout)
                edge.counted("body_timeout")
                conn.close()
        elif self._since is not None and now - self._since > edge.header_timeout:
            log.debug("closed a connection whose request headers took over %g s",
                      edge.header_timeout)
            edge.counted("header_timeout")
            if not self._served:  # later on a kept-alive connection, a response may be
                conn.write(_HEADER_TIMEOUT)  # still going out: then a plain close
            conn.close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Parser refusals and handler failures as the broker's JSON error.

        aiohttp calls this for requests its parser refused (status 400) and
        for exceptions that escaped the app (which the error middleware keeps
        from happening). Malformed requests are hostile or broken clients'
        traffic: logged at debug, no traceback (the access log has the line).
        """
        if request.writer.output_size > 0:  # as aiohttp does: too late for an answer
            raise ConnectionError("Response is sent already, cannot send an error")
        if status >= 500:
            log.error("request from %s failed (%d)", request.remote, status, exc_info=exc)
            reason, text = ("timeout", "The request timed out") if status == 504 else (
                "internal", "Internal error")
        else:
            reason, text = parser_refusal(exc)
            log.debug("refused a malformed request from %s: %s", request.remote, reason)
        response = web.json_response({"error": reason, "reason": reason, "message": text},
                                     status=status)
        add_security_headers(response)
        response.force_close()
        return response


class Edge:
    """The listening socket, the connection cap and the timeout sweep of one replica."""

    def __init__(self, runner: web.AppRunner, settings: Settings, *,
                 on_refusal: Callable[[str], None] | None = None,
                 **handler_args: Any) -> None:
        """``on_refusal(reason)`` counts each refusal and timeout (the limit metrics);
        ``handler_args`` go to every :class:`EdgeHandler` (aiohttp's handler options)."""
        server = runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before creating the edge")
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.max_connections = effective_max_connections(settings.max_connections)
        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.handler_args = {"keepalive_timeout": settings.keepalive_timeout, **handler_args}
        self.open: set[EdgeHandler] = set()
        self.refusing = 0
        self._on_refusal = on_refusal
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        if settings.max_connections > self.max_connections:
            log.warning("BROKER_MAX_CONNECTIONS=%d lowered to %d: the open-file limit is %d",
                        settings.max_connections, self.max_connections, fd_limit())

    def counted(self, reason: str) -> None:
        """Report one refusal or timeout (``too_many_connections``, ``header_timeout``, ...)."""
        if self._on_refusal is not None:
            self._on_refusal(reason)

    def __call__(self) -> EdgeHandler:
        """The protocol factory given to ``loop.create_server``."""
        return EdgeHandler(self, self.server, loop=self.loop, **self.handler_args)

    def refuse(self, transport: asyncio.Transport) -> None:
        """Answer a connection beyond the cap with 503, or close it if even that is too much."""
        self.counted("too_many_connections")
        if self.refusing >= MAX_REFUSING:
            transport.abort()
            self.refusing += 1  # connection_lost takes it back
            return
        self.refusing += 1
        transport.write(_TOO_MANY)
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer, then closes its side
        self.loop.call_later(REFUSAL_LINGER, transport.close)

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start accepting connections; returns the bound (host, port)."""
        self._listener = await self.loop.create_server(self, host, port, reuse_address=True,
                                                       backlog=128)
        self._sweeper = asyncio.create_task(self._sweep(), name="edge-sweep")
        bound = self._listener.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            for handler in list(self.open):
                handler.sweep(now)

    async def close(self) -> None:
        """Stop listening (open connections are aiohttp's to shut down) and the sweep."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)


class AcceptErrorLog:
    """A loop exception handler that reports running out of descriptors at a bounded rate.

    asyncio logs ``socket.accept() out of system resource`` with a traceback
    for every failed accept (and retries each second, once per earlier
    failure); at the file limit that is thousands of lines a second. This
    logs the first one and then one summary per ``interval``. Every other
    exception goes to the loop's default handler.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.failures = 0
        self._suppressed = 0
        self._next = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS
                and "accept" in str(context.get("message", ""))):
            loop.default_exception_handler(context)
            return
        self.failures += 1
        now = loop.time()
        if now < self._next:
            self._suppressed += 1
            return
        log.error("cannot accept connections: %s (%d more since the last report; new "
                  "connections wait in the listen backlog)", os.strerror(exc.errno or 0),
                  self._suppressed)
        self._suppressed = 0
        self._next = now + self.interval
