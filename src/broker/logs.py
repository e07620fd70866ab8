"""Logging set-up and token scrubbing.

Tokens reach the broker in URLs (``?token=``, which thebe uses on kernel
WebSockets) and headers. Whatever is logged passes through :func:`scrub`
first: the access logger scrubs request lines itself, and a filter on the
root handler scrubs every other record, so no code path can log a token by
accident.
"""

from __future__ import annotations

import logging
import re
import time

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


class ScrubFilter(logging.Filter):
    """Scrubs the fully formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class AccessLogger(AbstractAccessLogger):
    """One line per request: peer, method, scrubbed path, status, size, duration."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %s %.1fms',
            request.remote,
            request.method,
            scrub(request.path_qs),
            response.status,
            response.body_length,
            time_ * 1000,
        )


def configure(level: str = "INFO") -> None:
    """Root logging for the CLI: one line per record, every handler scrubbed."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ScrubFilter())
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("broker").setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(level)
