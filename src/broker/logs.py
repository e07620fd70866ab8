"""Logging set-up and token scrubbing.

Tokens reach the broker in URLs (``?token=``, which thebe uses on kernel
WebSockets) and headers. Whatever is logged passes through :func:`scrub`
first: the access logger scrubs request lines itself, and a filter on the
root handler scrubs every other record, so no code path can log a token by
accident.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_PATTERNS = [
    (re.compile(r"([?&](?:token|build_token|_xsrf)=)[^&\s\"']+", re.I), r"\1[secret]"),
    (re.compile(r"((?:authorization|x-api-key)[\"']?\s*[:=]\s*[\"']?\s*(?:token|bearer)?\s*)"
                r"[^\s\"',}]+", re.I), r"\1[secret]"),
    (re.compile(r"(\b(?:token|bearer)\s+)[A-Za-z0-9_\-.~+/=]{16,}", re.I), r"\1[secret]"),
]


def scrub(text: str) -> str:
    """Replace every token-looking secret in ``text`` with ``[secret]``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


#: The id of the request being handled, for every log line it causes.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


def new_request_id(offered: str | None) -> str:
    """Keep a sane incoming X-Request-Id (tracing across proxies), else make one."""
    if offered and _REQUEST_ID.match(offered):
        return offered
    return uuid.uuid4().hex


class ScrubFilter(logging.Filter):
    """Scrubs the fully formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


#: LogRecord attributes that are not structured fields of our own.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class PlainFormatter(logging.Formatter):
    """Human-readable lines; tracebacks scrubbed too (aiohttp's parser errors quote
    the request line, ``?token=`` included)."""

    def formatException(self, ei: Any) -> str:
        return scrub(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
    """One line per request: peer, method, scrubbed path, status, size, duration."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        path = scrub(request.path_qs)
        self.logger.info(
            '%s "%s %s" %d %s %.1fms',
            request.remote,
            request.method,
            path,
            response.status,
            response.body_length,
            time_ * 1000,
            extra={"event": "request", "method": request.method, "path": path,
                   "status": response.status, "bytes": response.body_length,
                   "duration_ms": round(time_ * 1000, 2), "remote": request.remote,
                   "request_id": response.headers.get("X-Request-Id", "")},
        )


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Root logging for the CLI: one line per record, every handler scrubbed."""
    handler = logging.StreamHandler()
    if fmt == "auto":
        fmt = "plain" if sys.stderr.isatty() else "json"
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ScrubFilter())
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("broker").setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(level)
