"""Logging set-up and token scrubbing.

Tokens reach the broker in URLs (``?token=``, which thebe uses on kernel
WebSockets) and headers. Whatever is logged passes through :func:`scrub`
first: the access logger scrubs request lines itself, and a filter on the
root handler scrubs every other record, so no code path can log a token by
accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_PATTERNS = [
    (re.compile(r"([?&](?:token|build_token|_xsrf)=)[^&\s\"']+", re.I), r"\1[secret]"),
    (re.compile(r"((?:authorization|x-api-key)[\"']?\s*[:=]\s*[\"']?\s*(?:token|bearer)?\s*)"
                r"[^\s\"',}]+", re.I), r"\1[secret]"),
    (re.compile(r"(\b(?:token|bearer)\s+)[A-Za-z0-9_\-.~+/=]{16,}", re.I), r"\1[secret]"),
]


#: Every pattern above needs one of these words: one search rules most lines out.
_SUSPECT = re.compile(r"token|bearer|authorization|x-api-key|_xsrf", re.I)


def scrub(text: str) -> str:
    """Replace every token-looking secret in ``text`` with ``[secret]``."""
    if not _SUSPECT.search(text):
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


#: When the broker began handling a request, on :func:`time.perf_counter` (set by the
#: outermost middleware). Durations are taken on that clock, not the event loop's:
#: uvloop's ``loop.time()`` counts whole milliseconds (libuv's clock, read once per
#: loop turn), so a proxied REST call, well under a millisecond, measured 0 or 1 ms.
REQUEST_STARTED = web.RequestKey("request_started", float)

#: The id of the request being handled, for every log line it causes.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


#: Generated ids: a random per-process prefix and a counter. Unique across
#: replicas with overwhelming probability, and ~10x cheaper than a uuid4 each.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_request_id(offered: str | None) -> str:
    """Keep a sane incoming X-Request-Id (tracing across proxies), else make one."""
    if offered and _REQUEST_ID.match(offered):
        return offered
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class ScrubFilter(logging.Filter):
    """Scrubs the fully formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Formatted once here; the formatter's own getMessage() is then free.
        record.msg, record.args = scrub(record.getMessage()), None
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


_escape = json.encoder.encode_basestring_ascii  # C, what json.dumps uses
#: LogRecord attributes that are not structured fields of our own.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class PlainFormatter(logging.Formatter):
    """Human-readable lines; tracebacks scrubbed too (aiohttp's parser errors quote
    the request line, ``?token=`` included)."""

    def formatException(self, ei: Any) -> str:
        return scrub(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    _second = -1
    _stamp = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once per second, not once per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def access_line(self, logger: str, message: str, method: str, path: str, status: int,
                    size: int, duration_ms: float, remote: str | None, request_id: str) -> str:
        """The access log's line, exactly as :meth:`format` would write its record.

        Written out by hand with the C string escaper: ``json.dumps`` of the
        dict was most of the access log's cost.
        """
        esc = _escape
        return (f'{{"time": "{self._time(time.time())}", "level": "info", '
                f'"logger": {esc(logger)}, "message": {esc(message)}, '
                f'"event": "request", "method": {esc(method)}, "path": {esc(path)}, '
                f'"status": {status}, "bytes": {size}, "duration_ms": {duration_ms!r}, '
                f'"remote": {esc(remote) if remote is not None else "null"}, '
                f'"request_id": {esc(request_id)}}}')

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            data["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(data, default=str)


class AccessLogger(AbstractAccessLogger):
    """One line per request: peer, method, scrubbed path, status, size, duration.

    When the line would only reach :func:`configure`'s own JSON handler (the
    CLI's set-up), it is formatted and queued directly, skipping the
    LogRecord, filter and formatter machinery: that was a sixth of the
    broker's CPU per proxied REST call. The line is the same either way,
    and the path is scrubbed here, so the handler's scrub filter has nothing
    left to do. Any other logging set-up (tests, embedding) gets a normal record.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        started = request.get(REQUEST_STARTED)  # (aiohttp's time_ is the loop's, see there)
        if started is not None:
            time_ = time.perf_counter() - started
        path = scrub(request.path_qs)
        method, remote, status = request.method, request.remote, response.status
        size = response.body_length
        duration = round(time_ * 1000, 2)
        request_id = response.headers.get("X-Request-Id", "")
        message = f'{remote} "{method} {path}" {status} {size} {time_ * 1000:.1f}ms'
        handler = _direct_handler(logger)
        if handler is not None:
            formatter: JsonFormatter = handler.formatter  # type: ignore[assignment]
            handler.emit_line(formatter.access_line(logger.name, message, method, path, status,
                                                    size, duration, remote, request_id),
                              logging.INFO)
        else:
            logger.info("%s", message, extra={
                "event": "request", "method": method, "path": path, "status": status,
                "bytes": size, "duration_ms": duration, "remote": remote,
                "request_id": request_id})


def _direct_handler(logger: logging.Logger) -> LoopBatchingHandler | None:
    """The one handler a record of ``logger`` reaches, if it is configure()'s JSON one."""
    if logger.filters:
        return None
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    handlers = logging.root.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if (type(handler) is LoopBatchingHandler and type(handler.formatter) is JsonFormatter
            and handler.level <= logging.INFO
            and all(type(f) is ScrubFilter for f in handler.filters)):
        return handler
    return None


class LoopBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one event-loop turn in one write.

    A line per proxied request is the access log's job, but a ``write`` and a
    flush per line was a tenth of the broker's CPU per proxied GET. Lines
    logged from the event loop's thread are queued and written by a callback
    at the end of the current loop turn (sub-millisecond later, in order);
    lines logged anywhere else, or at ERROR and above, are written at once,
    after whatever is queued. ``flush()`` (also at shutdown) writes the rest.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._queue(line, record.levelno)

    def emit_line(self, line: str, level: int) -> None:
        """Queue a line formatted (and scrubbed) by the caller, as ``emit`` would."""
        with self.lock or contextlib.nullcontext():
            self._queue(line, level)

    def _queue(self, line: str, level: int) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._pending.append(line + self.terminator)
        if loop is None or level >= logging.ERROR:
            self._write_pending()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._scheduled = False
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log write failed"}))

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._write_pending()
            super().flush()


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Root logging for the CLI: one line per record, every handler scrubbed."""
    handler = LoopBatchingHandler()
    if fmt == "auto":
        fmt = "plain" if sys.stderr.isatty() else "json"
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ScrubFilter())
    # No formatter here shows the caller's file, thread or process: skip
    # collecting them for every record (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("broker").setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(level)
