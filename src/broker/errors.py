"""The broker's error taxonomy.

Every refusal the broker makes is a :class:`BrokerError`: it carries the HTTP
status, a machine-readable ``reason`` (stable, also usable as a metric label),
a message safe to show to a visitor, the WebSocket close code for the same
refusal, and optional headers (``Retry-After``). The HTTP middleware turns it
into ``{"error": reason, "reason": reason, "message": ...}``; nothing else
ever reaches a client, so no traceback or upstream secret can.
"""

from __future__ import annotations

from collections.abc import Mapping


class BrokerError(Exception):
    """A refusal or failure with everything a client needs to understand it."""

    status: int = 500
    reason: str = "internal"
    ws_close_code: int = 1011
    #: Policy refusals are expected traffic: logged at info without traceback.
    expected: bool = True

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.headers: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, round(retry_after)))

    def body(self) -> dict[str, str]:
        """The JSON body of this error as sent to clients."""
        return {"error": self.reason, "reason": self.reason, "message": self.message}

    def failed_event(self) -> dict[str, object]:
        """This error as the ``failed`` event of a ``/build`` stream.

        BinderHub's fields (``phase``, ``message`` as a log line, ``status_code``;
        docs/protocols.md#binderhub-launch-api), plus the broker's machine-readable
        ``reason`` and, for refusals that pass, ``retry_after`` in seconds: thebe
        ignores fields it does not know. An EventSource reads events only, never an
        HTTP status or body, so this is the one way a /build client learns why.
        """
        message = self.message if self.message.endswith("\n") else f"{self.message}\n"
        event: dict[str, object] = {"phase": "failed", "message": message,
                                    "status_code": self.status, "reason": self.reason}
        if "Retry-After" in self.headers:
            event["retry_after"] = int(self.headers["Retry-After"])
        return event


class BadRequest(BrokerError):
    status, reason, ws_close_code = 400, "bad_request", 1008


class Unauthorized(BrokerError):
    status, reason, ws_close_code = 401, "unauthorized", 1008


class Forbidden(BrokerError):
    status, reason, ws_close_code = 403, "forbidden", 1008


class NotFound(BrokerError):
    status, reason, ws_close_code = 404, "not_found", 1008


class Conflict(BrokerError):
    status, reason, ws_close_code = 409, "conflict", 1008


class PayloadTooLarge(BrokerError):
    status, reason, ws_close_code = 413, "too_large", 1009


class RateLimited(BrokerError):
    status, reason, ws_close_code = 429, "rate_limited", 1013


class UpstreamFailed(BrokerError):
    status, reason, ws_close_code = 502, "upstream_failed", 1011
    expected = False


class Unavailable(BrokerError):
    status, reason, ws_close_code = 503, "unavailable", 1013


class SpawnTimeout(BrokerError):
    status, reason, ws_close_code = 504, "spawn_timeout", 1011
    expected = False


class SpawnQueueTimeout(BrokerError):
    """A spawn waited BROKER_SPAWN_QUEUE_TIMEOUT for a launch slot and never got one."""

    status, reason, ws_close_code = 503, "spawn_queue_timeout", 1013
