"""Which Jupyter paths the proxy forwards, and how it joins them safely.

Only the Jupyter Server REST subset a kernel client needs is forwarded, each
path with its methods. The remainder of the request path after ``/s/{id}/``
is checked in its raw, still-encoded form: no percent-escapes at all (Jupyter
ids and kernelspec names never need one, and ``%2F``/``%2e`` are how path
escapes are smuggled), no empty, ``.`` or ``..`` segments. After joining, the
upstream URL is re-checked to start with the session's own upstream base, so
nothing can be proxied outside the session's server.
"""

from __future__ import annotations

import re

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


def join(base: str, remainder: str) -> URL:
    """The upstream URL for a checked remainder, guaranteed inside ``base``."""
    url = URL(base + remainder, encoded=True)
    base_url = URL(base, encoded=True)
    if url.origin() != base_url.origin() or not url.raw_path.startswith(base_url.raw_path):
        raise BadRequest("The path leaves the session's server", reason="bad_path")
    return url
