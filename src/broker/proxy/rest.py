"""Forwarding Jupyter REST calls to a session's upstream server.

Request headers are forwarded from an allowlist: the client's broker token,
cookies, ``Origin`` and hop-by-hop headers never reach the upstream, and the
upstream token is added in their place. Response headers come back from an
allowlist too: upstream cookies (jupyter_server sets a login cookie), its
CORS headers and anything hop-by-hop are dropped, and ``Location`` is
rewritten into the broker's ``/s/{id}/`` space. Bodies pass through as bytes
(the upstream client never decompresses), except the creation bodies
of kernels and sessions, where thebe's default kernel name ``python`` is
mapped to the session's kernel (docs/protocols.md#thebe-and-myst-pages).

Upstream HTML is never forwarded as it came: jupyter_server's HTML pages
(its error pages included) embed the server's token for its own frontend
(docs/protocols.md#jupyter-server-rest-api).
For the REST API, which is JSON only, such a response becomes a broker JSON
error with the upstream's status. With the Jupyter UI proxied
(BROKER_JUPYTER_UI, ``ui_token`` given), the UI's paths are forwarded too and
their pages are rewritten (:func:`broker.proxy.ui.rewrite_page`). As a second
line of defence, a buffered body that contains the upstream token is withheld
(502) instead of forwarded.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from broker import appkeys
from broker.errors import UpstreamFailed
from broker.models import KERNEL_ALIASES, Session
from broker.paths import check_rest, check_ui
from broker.policy.kernels import KERNEL_STARTS
from broker.proxy.ui import KERNELSPECS, PAGES, UI_CSP, rewrite_kernelspecs, rewrite_page
from broker.upstream.http import UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

REQUEST_HEADERS = (
    "Accept",
    "Accept-Encoding",
    "Accept-Language",
    "Content-Type",
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "User-Agent",
    "X-Request-Id",
)
RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Encoding",
    "Content-Disposition",
    "Cache-Control",
    "ETag",
    "Last-Modified",
    "Location",
    "X-Request-Id",
)
#: Responses up to this size are read whole; larger ones are streamed.
_BUFFER_LIMIT = 1 << 20
#: A kernel restart asked for through the proxy (the execute API's kernel may be it).
_RESTART = re.compile(r"api/kernels/([^/]+)/restart")


def _kernel_body(raw: bytes, remainder: str, default_kernel: str, warm: str = "") -> bytes:
    """Apply the kernel name alias/default to a kernel or session creation body.

    ``warm``: a session creation binds to that running kernel instead of starting one.
    """
    try:
        data: Any = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return raw  # not ours to judge: the upstream answers with its own 400
    if not isinstance(data, dict):
        return raw
    if warm and remainder == "api/sessions":
        data["kernel"] = {"id": warm}
        return json.dumps(data).encode()
    holder: Any = data if remainder == "api/kernels" else data.get("kernel")
    if holder is None and remainder == "api/sessions" and default_kernel:
        holder = data["kernel"] = {}
    if not isinstance(holder, dict):
        return raw
    name = holder.get("name")
    if not name and default_kernel:
        holder["name"] = default_kernel
    elif isinstance(name, str) and name in KERNEL_ALIASES:
        holder["name"] = default_kernel or KERNEL_ALIASES[name]
    return json.dumps(data).encode()


def _location(value: str, upstream_base: URL, broker_prefix: str) -> str:
    """Map an upstream ``Location`` into the broker's URL space for the session."""
    target = URL(value, encoded=True)
    path = target.raw_path if target.is_absolute() or value.startswith("/") else value
    base_path = upstream_base.raw_path
    if path.startswith(base_path):
        path = path[len(base_path):]
    rewritten = broker_prefix + path.lstrip("/")
    return f"{rewritten}?{target.raw_query_string}" if target.raw_query_string else rewritten


def _withheld(status: int, message: str) -> web.Response:
    reason = "not_found" if status == 404 else "upstream_response"
    return web.json_response({"error": reason, "reason": reason, "message": message},
                             status=status if status >= 400 else 502)


async def forward(request: web.Request, session: Session, remainder: str,
                  ui_token: str | None = None) -> web.StreamResponse:
    """Proxy one REST request to the session's server; kernel starts pass the kernel gate.

    ``ui_token`` (the visitor's broker token) is given when BROKER_JUPYTER_UI
    is on: the UI's paths are forwarded too, and its pages carry that token.

    With BROKER_MAX_KERNELS_PER_SESSION on, a POST that may start a kernel is
    forwarded while the gate holds the session's check (see
    :mod:`broker.policy.kernels`), so concurrent starts cannot overshoot.
    """
    restart = _RESTART.fullmatch(remainder) if request.method == "POST" else None
    restarting = request.app.get(appkeys.KERNEL_RESTARTING)
    if restart is not None and restarting is not None:
        # Before forwarding, so before the client hears "restarted": the execute API's
        # next call on this kernel must wait for the new process (AgentKernels.restarting).
        restarting(session.id, restart.group(1))
    starts = request.method == "POST" and remainder in KERNEL_STARTS
    pool = request.app.get(appkeys.POOL)
    warm = pool.take_warm_kernel(session, remainder, await request.read()) \
        if starts and pool is not None else ""
    gate = request.app.get(appkeys.KERNEL_GATE)
    if gate is not None and starts and not warm:
        async with gate.starting(session, remainder, await request.read()):
            return await _forward(request, session, remainder, ui_token)
    return await _forward(request, session, remainder, ui_token, warm)


async def _forward(request: web.Request, session: Session, remainder: str,
                   ui_token: str | None, warm: str = "") -> web.StreamResponse:
    """Forward one REST request; ``warm``: a warm pool kernel this kernel start takes over."""
    method = request.method
    settings = request.app[appkeys.SETTINGS]
    if ui_token is None:
        check_rest(remainder, method)
    else:
        check_ui(remainder, method, settings.jupyter_ui_terminals)
    upstream = request.app[appkeys.UPSTREAM].for_session(session)
    target = remainder
    request_headers = request.headers
    headers = [(h, request_headers[h]) for h in REQUEST_HEADERS if h in request_headers
               # UI pages are rewritten, and every buffered body is searched for the
               # upstream token: both need the bytes as they are, not compressed.
               and not (ui_token is not None and h == "Accept-Encoding")]
    # body_exists, not can_read_body: the kernel gate may have read (and cached) it already.
    body: bytes | None = await request.read() if request.body_exists else None
    if method == "POST" and remainder in ("api/kernels", "api/sessions"):
        body = _kernel_body(body or b"", remainder, session.kernel_name, warm)
        headers = [(h, v) for h, v in headers if h != "Content-Type"]
        headers.append(("Content-Type", "application/json"))
        if warm and remainder == "api/kernels":
            # The warm kernel's model answers the start (201, as a started kernel's).
            method, body, target = "GET", None, f"api/kernels/{warm}"
    try:
        response = await upstream.request(method, target, headers, body,
                                          query=forward_query(request),
                                          read_timeout=settings.upstream_timeout)
        async with response:
            return await _respond(request, session, response, method, remainder, ui_token,
                                  created=bool(warm) and remainder == "api/kernels")
    except (UpstreamError, TimeoutError) as exc:
        log.warning("upstream of session %s failed on %s %s: %s", session.id, method,
                    remainder, exc if isinstance(exc, UpstreamError) else type(exc).__name__)
        request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "unreachable")
        raise UpstreamFailed("The session's Jupyter server did not answer",
                             reason="upstream_unreachable") from exc


async def _respond(request: web.Request, session: Session, upstream: UpstreamResponse,
                   method: str, remainder: str, ui_token: str | None,
                   created: bool = False) -> web.StreamResponse:
    """The client's response from the upstream's: filtered headers, bytes as they came
    (UI pages rewritten). ``created``: an existing kernel's model answers a kernel
    start (200 becomes 201)."""
    upstream_headers = upstream.headers
    status = 201 if created and upstream.status == 200 else upstream.status
    out = CIMultiDict(
        (h, upstream_headers[h]) for h in RESPONSE_HEADERS if h in upstream_headers
    )
    if "Location" in out:
        out["Location"] = _location(
            out["Location"], URL(session.upstream_url), f"/s/{session.id}/"
        )
    if upstream.content_type == "text/html" and ui_token is not None and method == "GET":
        return await _ui_page(request, session, upstream, remainder, ui_token, out)
    if upstream.content_type == "text/html":
        request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "bad_response")
        return _withheld(upstream.status, "The session's server answered with a page, "
                         "not an API response")
    length = upstream.content_length
    if method == "HEAD" or upstream.status in (204, 304):
        return web.Response(status=upstream.status, headers=out)
    if length is not None and length <= _BUFFER_LIMIT:
        body = await upstream.read()
        if session.upstream_token.encode() in body:
            log.error("withheld a response of session %s that carried its upstream "
                      "token (%s %s)", session.id, method, remainder)
            request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "bad_response")
            return _withheld(502, "The session's server sent a response that cannot "
                             "be forwarded")
        if ui_token is not None and KERNELSPECS.fullmatch(remainder) and upstream.status == 200:
            body = rewrite_kernelspecs(body, session.upstream_url, f"/s/{session.id}/")
        return web.Response(status=status, body=body, headers=out)
    response = web.StreamResponse(status=status, headers=out)
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    async for chunk in upstream.iter_chunks():
        await response.write(chunk)
    await response.write_eof()
    return response


async def _ui_page(request: web.Request, session: Session, upstream: UpstreamResponse,
                   remainder: str, ui_token: str, headers: CIMultiDict[str]) -> web.Response:
    """An upstream HTML response of the UI: read whole, rewritten, then token-checked.

    The UI's own pages get the UI's CSP; any other HTML (a file opened raw,
    an export) keeps the broker's sandboxing default.
    """
    length = upstream.content_length
    if length is None or length > _BUFFER_LIMIT:
        request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "bad_response")
        return _withheld(502, "The session's server sent a page too large to forward")
    # jupyter_server's pages are UTF-8 (its templates declare it).
    text = (await upstream.read()).decode("utf-8", errors="replace")
    text = rewrite_page(text, session.upstream_url, session.upstream_token,
                        f"/s/{session.id}/", ui_token)
    if session.upstream_token in text:
        log.error("withheld a page of session %s that still carried its upstream token (%s)",
                  session.id, remainder)
        request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "bad_response")
        return _withheld(502, "The session's server sent a page that cannot be forwarded")
    headers.pop("Content-Encoding", None)
    if PAGES.fullmatch(remainder):
        headers["Content-Security-Policy"] = UI_CSP
        headers["Cache-Control"] = "no-store"
    return web.Response(status=upstream.status, body=text.encode(), headers=headers)


def forward_query(request: web.BaseRequest) -> str:
    """The raw query string minus the broker token (``token=``), otherwise byte for byte."""
    raw = request.raw_path.partition("?")[2]
    if not raw or ("token" not in raw.lower() and "%" not in raw):
        return raw
    return "&".join(part for part in raw.split("&")
                    if part and unquote_plus(part.partition("=")[0]) != "token")
