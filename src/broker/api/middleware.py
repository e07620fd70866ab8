"""Cross-cutting HTTP behaviour: JSON errors and CORS.

* Every error leaves as ``{"error", "reason", "message"}`` with the status of
  its :class:`~broker.errors.BrokerError` (aiohttp's own 404/405/413 too, 405
  with its ``Allow`` header); unexpected exceptions become a bare 500 and a
  server-side traceback. A client that went away mid-request is not an
  error: logged at debug, and the access log says 499 (nginx's "client
  closed request"), not 500.
* A body declared larger than its route accepts is refused with 413 before
  the handler waits for it.
* CORS headers are added in ``on_response_prepare``, so they are on every
  response a browser may read — errors, event streams and WebSocket
  handshakes included. A request whose ``Origin`` is not allowed is refused
  outright (403, naming BROKER_ALLOWED_ORIGINS), not just left unreadable: a
  simple POST from a foreign page would otherwise still create sessions in
  the visitor's name. On ``/build`` the refusal is BinderHub's readable form
  (see :func:`build_refusal`).
"""

from __future__ import annotations

import ipaddress
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from broker import appkeys, sse
from broker.edge import EdgeHandler, add_security_headers
from broker.errors import BrokerError, Forbidden, PayloadTooLarge
from broker.logs import REQUEST_STARTED, new_request_id, request_id_var
from broker.policy.identity import forwarded_proto_host

log = logging.getLogger(__name__)

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = "authorization, content-type, x-requested-with, x-xsrftoken, x-request-id"
EXPOSE_HEADERS = (
    "Retry-After, Location, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset"
)
_ALLOWED = web.RequestKey("origin_allowed", bool)
REQUEST_ID = web.RequestKey("request_id", str)


def error_response(error: BrokerError) -> web.Response:
    """The one JSON shape of every refusal."""
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def origin_allowed(request: web.Request, origin: str) -> bool:
    """Origins in BROKER_ALLOWED_ORIGINS ('*' = any), and the broker's own.

    The broker's own origin is BROKER_PUBLIC_URL's when set. Unset, it is the
    request's own scheme and host (the live page at ``/`` calls the API from
    there), but only where DNS rebinding cannot forge it: a host that is an
    IP address or ``localhost`` (an attacker's page can only bring its own
    domain name), or a host a trusted proxy vouches for (X-Forwarded-Host /
    the Host it passed on: an ingress routes by host name).
    """
    settings = request.app[appkeys.SETTINGS]
    wanted = origin.rstrip("/").lower()
    allowed = settings.allowed_origins
    if "*" in allowed or wanted in allowed:
        return True
    if settings.public_url:
        return wanted == str(URL(settings.public_url).origin()).lower()
    scheme, host = forwarded_proto_host(request, request.app[appkeys.TRUSTED])
    if wanted != f"{scheme}://{host}".lower():
        return False
    return _unforgeable_host(URL(wanted).host or "") or _from_trusted_proxy(request)


def _unforgeable_host(host: str) -> bool:
    """An IP literal or localhost: names no attacker can point at the broker (rebinding)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _from_trusted_proxy(request: web.Request) -> bool:
    trusted = request.app[appkeys.TRUSTED]
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(peer in net for net in trusted)


def origin_refusal(origin: str) -> Forbidden:
    """The refusal of a foreign origin, naming the setting that would allow it."""
    return Forbidden(
        f"Origin {origin} is not allowed: add it to BROKER_ALLOWED_ORIGINS (comma-separated, "
        f"e.g. BROKER_ALLOWED_ORIGINS={origin.rstrip('/').lower()}) to let its pages use this "
        "broker", reason="origin")


def build_refusal(request: web.Request, error: BrokerError) -> web.Response:
    """A /build refusal as BinderHub's form: HTTP 200, one ``failed`` event.

    An EventSource cannot read an HTTP error status or body, only events, and
    only with CORS headers: so they are set here even for an origin that is
    refused, which is allowed to read this one message and nothing else.
    """
    response = sse.response(sse.encode_json(error.failed_event()))
    origin = request.headers.get("Origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    return response


def _http_error(exc: web.HTTPException) -> BrokerError:
    reasons = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    error = BrokerError(exc.reason or "error", reason=reasons.get(exc.status, "bad_request"))
    error.status = exc.status
    if exc.status == 413:
        error.message = "The request body is too large"
    if "Allow" in exc.headers:
        error.headers["Allow"] = exc.headers["Allow"]
    return error


#: Status recorded for a request whose client left before the answer (nginx's
#: convention); it never reaches the client, only the access log and metrics.
CLIENT_GONE = 499


def _body_limit(request: web.Request) -> int | None:
    """The largest body the matched route reads; None for uploads to the files API,
    which refuses a declared oversized file at once itself (413 file_too_large, against
    BROKER_MAX_UPLOAD_SIZE)."""
    if request.method == "PUT" and request.match_info.route.name == "files":
        return None
    return request.client_max_size


@web.middleware
async def errors_and_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse foreign origins, answer preflights, turn exceptions into JSON errors."""
    origin = request.headers.get("Origin")
    allowed = bool(origin) and origin_allowed(request, origin or "")
    request[_ALLOWED] = allowed
    if origin and not allowed:
        refusal = origin_refusal(origin)
        if request.match_info.route.name == "build" and request.method == "GET":
            return build_refusal(request, refusal)
        return error_response(refusal)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204)
    length, limit = request.content_length, _body_limit(request)
    if length is not None and limit is not None and length > limit:
        # At once: waiting for (and discarding) a declared 10 GB body would hold
        # the connection for as long as the client cares to dribble it.
        response = error_response(PayloadTooLarge(
            f"The request body ({length} bytes) is larger than this endpoint accepts "
            f"({limit} bytes)"))
        response.force_close()  # the unread body makes the connection unusable
        return response
    try:
        return await handler(request)
    except ConnectionResetError:
        log.debug("%s %s: the client went away", request.method, request.path)
        return web.Response(status=CLIENT_GONE)
    except BrokerError as error:
        if error.expected:
            log.info("%s %s refused: %s (%s)", request.method, request.path, error.reason,
                     error.message)
        else:
            log.error("%s %s failed: %s (%s)", request.method, request.path, error.reason,
                      error.message)
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_http_error(exc))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(BrokerError("Internal error"))


def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CORS headers for allowed cross-origin callers."""
    origin = request.headers.get("Origin")
    if not origin or not request.get(_ALLOWED, False):
        return
    headers = response.headers
    headers["Access-Control-Allow-Origin"] = origin
    headers.add("Vary", "Origin")
    headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if request.method == "OPTIONS":
        headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        headers["Access-Control-Max-Age"] = "7200"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: request id (propagated from X-Request-Id when sane) and request timing."""
    request_id = new_request_id(request.headers.get("X-Request-Id"))
    request[REQUEST_ID] = request_id
    context = request_id_var.set(request_id)
    started = time.perf_counter()
    request[REQUEST_STARTED] = started
    response: web.StreamResponse | None = None
    protocol = request.protocol
    edge = protocol if isinstance(protocol, EdgeHandler) else None
    if edge is not None:
        edge.handling(request)  # headers complete: the header timeout is over
    try:
        response = await handler(request)
        return response
    finally:
        if edge is not None:
            edge.handled()
        request_id_var.reset(context)
        # WebSocket handlers return when the socket closes, or once the relay took it
        # over (101); the bridge times its handshake itself.
        upgraded = response is not None and response.status == 101
        if not isinstance(response, web.WebSocketResponse) and not upgraded:
            status = response.status if response is not None else 500
            name = request.match_info.route.name or "other"
            request.app[appkeys.METRICS].observe_http(
                "admin" if name.startswith("admin_") else name, status,
                time.perf_counter() - started)


def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Echo the request id so clients can quote it."""
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


async def prepare_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare, the one callback: CORS, security headers, request id.

    One awaited signal callback per response instead of three (this runs on
    every proxied REST call); the parts are plain functions.
    """
    add_cors_headers(request, response)
    add_security_headers(response)
    add_request_id(request, response)
