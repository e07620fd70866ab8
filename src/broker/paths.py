"""Which Jupyter paths the proxy forwards, and how it joins them safely.

Only the Jupyter Server REST subset a kernel client needs is forwarded, each
path with its methods (docs/protocols.md#jupyter-server-rest-api). The
remainder of the request path after ``/s/{id}/`` is checked in its raw,
still-encoded form: no percent-escapes at all (Jupyter ids and kernelspec
names never need one, and ``%2F``/``%2e`` are how path escapes are
smuggled), no empty, ``.`` or ``..`` segments. After joining, the upstream
URL is re-checked to start with the session's own upstream base, so nothing
can be proxied outside the session's server.

With BROKER_JUPYTER_UI on, the session's own JupyterLab is forwarded too
(:data:`_UI`, a superset of the REST subset). Its paths carry file names,
so the raw remainder may hold RFC 3986 path characters and percent-escapes
(:func:`check_ui_remainder`): the segments are checked once decoded, and
an escape that decodes to a separator (``%2F``, ``%5C``) or a control
character is refused, so no spelling of ``..`` or ``/`` slips through.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from yarl import URL

from broker.errors import BadRequest, NotFound

_SAFE = re.compile(r"^[A-Za-z0-9._~\-/]*$")
_ID = r"[A-Za-z0-9._~\-]+"

GET, POST, PATCH, DELETE = "GET", "POST", "PATCH", "DELETE"
_REST: list[tuple[re.Pattern[str], frozenset[str]]] = [
    (re.compile(p), frozenset(methods))
    for p, methods in [
        (r"api/?", {GET}),
        (r"api/status", {GET}),
        (r"api/kernelspecs", {GET}),
        (rf"api/kernelspecs/{_ID}", {GET}),
        (rf"kernelspecs/{_ID}/{_ID}", {GET}),
        (r"api/kernels", {GET, POST}),
        (rf"api/kernels/{_ID}", {GET, DELETE}),
        (rf"api/kernels/{_ID}/(?:interrupt|restart)", {POST}),
        (r"api/sessions", {GET, POST}),
        (rf"api/sessions/{_ID}", {GET, PATCH, DELETE}),
    ]
]
CHANNELS = re.compile(rf"api/kernels/({_ID})/channels")

PUT = "PUT"
_ANY = r"(?:/.*)?"
#: The Jupyter UI's paths beyond the REST subset (BROKER_JUPYTER_UI). Never
#: ``api/shutdown`` (one visitor's click would stop the server for good), nor
#: the extension manager's or build API's writes (``lab/...`` is read-only
#: except user settings and workspaces).
_UI: list[tuple[re.Pattern[str], frozenset[str]]] = [
    (re.compile(p), frozenset(methods))
    for p, methods in [
        (rf"lab/api/(?:settings|workspaces){_ANY}", {GET, PUT, DELETE}),
        (rf"lab{_ANY}", {GET}),
        (rf"tree{_ANY}", {GET}),
        (r"static/.+", {GET}),
        (rf"api/contents{_ANY}", {GET, POST, PUT, PATCH, DELETE}),
        (rf"api/kernels/{_ID}", {PATCH}),
        (r"api/me", {GET}),
        (rf"api/config/{_ID}", {GET}),
        (rf"api/nbconvert{_ANY}", {GET}),
        (r"(?:files|nbconvert)/.+", {GET}),
        (r"lsp/status", {GET}),
    ]
]
_TERMINALS = [
    (re.compile(p), frozenset(methods))
    for p, methods in [
        (r"api/terminals", {GET, POST}),
        (rf"api/terminals/{_ID}", {GET, DELETE}),
    ]
]
#: WebSockets of the UI besides the kernel channels (BROKER_JUPYTER_UI).
UI_SOCKETS = re.compile(r"api/events/subscribe")
TERMINAL_SOCKETS = re.compile(rf"terminals/websocket/{_ID}")


def check_remainder(raw: str) -> str:
    """Validate the raw path after ``/s/{id}/``; returns it unchanged if safe."""
    if not _SAFE.match(raw):
        raise BadRequest("The path contains characters the proxy does not forward",
                         reason="bad_path")
    segments = raw.split("/")
    if any(seg in (".", "..") for seg in segments) or "" in segments[:-1]:
        raise BadRequest("The path may not contain empty, '.' or '..' segments",
                         reason="bad_path")
    return raw


_UI_SAFE = re.compile(r"^[A-Za-z0-9._~\-/!$&'()*+,;=:@%]*$")
_BAD_ESCAPE = re.compile(r"%(?:2[fF]|5[cC]|[01][0-9a-fA-F]|7[fF])")


def check_ui_remainder(raw: str) -> str:
    """:func:`check_remainder` for the UI: file names may be percent-encoded.

    Returns the raw remainder unchanged (it is forwarded as the browser sent
    it) once its decoded segments are known to stay inside the session.
    """
    if not _UI_SAFE.match(raw) or _BAD_ESCAPE.search(raw):
        raise BadRequest("The path contains characters the proxy does not forward",
                         reason="bad_path")
    try:
        segments = unquote(raw, errors="strict").split("/")
    except UnicodeDecodeError:
        raise BadRequest("The path is not valid UTF-8 once decoded", reason="bad_path") from None
    if any(seg in (".", "..") for seg in segments) or "" in segments[:-1]:
        raise BadRequest("The path may not contain empty, '.' or '..' segments",
                         reason="bad_path")
    return raw


def check_ui(remainder: str, method: str, terminals: bool) -> None:
    """Raise unless ``method remainder`` is part of the proxied Jupyter UI."""
    tables = (_REST, _UI, _TERMINALS) if terminals else (_REST, _UI)
    matched = [methods for table in tables for pattern, methods in table
               if pattern.fullmatch(remainder)]
    if not matched:
        raise NotFound("This path is not part of the proxied Jupyter UI", reason="not_proxied")
    if method != "HEAD" and not any(method in methods for methods in matched):
        raise NotFound(f"{method} is not forwarded for this path", reason="not_proxied")


#: remainder -> its methods (None: not forwarded); bounded, since ids vary.
_REST_CACHE: dict[str, frozenset[str] | None] = {}
_REST_CACHE_MAX = 4096


def check_rest(remainder: str, method: str) -> None:
    """Raise unless ``method remainder`` is part of the forwarded Jupyter API."""
    try:
        methods = _REST_CACHE[remainder]
    except KeyError:
        methods = next((m for pattern, m in _REST if pattern.fullmatch(remainder)), None)
        if len(_REST_CACHE) >= _REST_CACHE_MAX:
            _REST_CACHE.clear()
        _REST_CACHE[remainder] = methods
    if methods is None:
        raise NotFound("This path is not part of the proxied Jupyter API", reason="not_proxied")
    if method not in methods and method != "HEAD":
        raise NotFound(f"{method} is not forwarded for this path", reason="not_proxied")


#: Remainders :func:`join` found inside already (the verdict depends on the remainder
#: alone): a set lookup instead of the checks, on the REST proxy's path. Bounded.
_INSIDE: set[str] = set()
_INSIDE_MAX = 4096
#: What a remainder may never hold, in any caller's hands: whitespace and controls,
#: a backslash, a query or fragment, an encoded dot, slash or backslash.
_OUTSIDE = re.compile(r"[\x00-\x20\x7f\\?#]|%(?:2[eEfF]|5[cC])")


def join(base: str, remainder: str) -> URL:
    """The upstream URL for ``remainder``, guaranteed inside ``base``.

    The one rule every access to a session's server goes through
    (:class:`broker.upstream.session.SessionUpstream`), whether its
    remainder came from a client (checked above already) or from an
    upstream's own answer (a kernel id): no ``.`` or ``..`` segment, no
    empty segment but a trailing one (so no leading ``/`` and no ``//``),
    no escape that decodes to a dot or separator, no query or fragment
    (those are passed apart), and the joined URL keeps ``base``'s origin and
    path prefix.
    """
    if remainder not in _INSIDE:
        if (_OUTSIDE.search(remainder) or remainder.startswith("/") or "//" in remainder
                or any(seg in (".", "..") for seg in remainder.split("/"))):
            raise BadRequest("The path leaves the session's server", reason="bad_path")
        if len(_INSIDE) >= _INSIDE_MAX:
            _INSIDE.clear()
        _INSIDE.add(remainder)
    url = URL(base + remainder, encoded=True)
    base_url = URL(base, encoded=True)
    if url.origin() != base_url.origin() or not url.raw_path.startswith(base_url.raw_path):
        raise BadRequest("The path leaves the session's server", reason="bad_path")
    return url
