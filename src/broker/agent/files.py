"""The files API for AI agents: ``/api/v1/sessions/{id}/files[/{path}]``.

``PUT`` uploads the raw request body, ``GET`` downloads raw bytes (a path
ending in ``/``, or none, lists a directory), ``DELETE`` removes. Every call
goes through the session's upstream Jupyter server and its contents API
(base64 in JSON), so it works for every backend; the kernel started by the
execute API works in the same directory, so ``open("data.csv")`` in code
reads what ``PUT .../files/data.csv`` wrote.

Paths are confined to the session's working directory. The rules, applied
to the raw request path after ``/files/``:

* it is percent-decoded exactly once (UTF-8), so ``my%20file.csv`` is
  ``my file.csv`` and ``a%2Fb`` is ``a/b``; the decoded path is what is
  checked and, re-encoded segment by segment, what the upstream receives
  (which decodes once too), so no double-decoding can sneak past the check;
* it must be relative (no leading ``/``), without backslashes or control
  characters, without empty, ``.`` or ``..`` segments, and without hidden
  (``.``-prefixed) segments, which Jupyter Server refuses as well; at most
  1024 characters and 32 levels;
* symbolic links: Jupyter Server follows them, even out of its root. Where
  the broker can see the session's directory (the local backend), it
  resolves the path itself and refuses one that leaves the directory (403
  ``path_escape``). Elsewhere the session's own container is the boundary:
  a link there reaches only files that code in the same session can read
  anyway.

Downloads are served as attachments with ``nosniff`` and a sandboxing
Content-Security-Policy: a file an agent's code wrote is never a page that
runs in the broker's origin.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import mimetypes
import os
import re
import urllib.parse
from typing import Any

from aiohttp import web

from broker import appkeys
from broker.agent.access import agent_session
from broker.errors import (
    BadRequest,
    BrokerError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    UpstreamFailed,
)
from broker.models import Session
from broker.upstream.http import UpstreamError

routes = web.RouteTableDef()

#: One resource for ``.../files`` and ``.../files/{path}`` (one route name for metrics);
#: the handlers read the raw path themselves.
FILES_ROUTE = "/api/v1/sessions/{sid}/files{tail:(?:/.*)?}"
MAX_PATH = 1024
MAX_DEPTH = 32
_CHUNK = 64 * 1024
_DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "Cache-Control": "no-store",
}


def parse_path(raw: str) -> list[str]:
    """The checked segments of a raw (still percent-encoded) path; [] is the root."""
    try:
        path = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest("The path is not valid UTF-8", reason="bad_path") from exc
    if len(path) > MAX_PATH:
        raise BadRequest(f"The path is longer than {MAX_PATH} characters", reason="bad_path")
    if path.startswith("/"):
        raise BadRequest("Absolute paths are not allowed; paths are relative to the "
                         "session's working directory", reason="bad_path")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise BadRequest("The path contains a backslash or a control character",
                         reason="bad_path")
    if path in ("", "/"):
        return []
    segments = path.removesuffix("/").split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise BadRequest("The path may not contain empty, '.' or '..' segments",
                         reason="bad_path")
    if any(seg.startswith(".") for seg in segments):
        raise BadRequest("Hidden files and directories ('.'-prefixed) are not served",
                         reason="bad_path")
    if len(segments) > MAX_DEPTH:
        raise BadRequest(f"The path is deeper than {MAX_DEPTH} levels", reason="bad_path")
    return segments


def _raw_tail(request: web.Request, sid: str) -> str:
    """The raw path after ``/files``, as the client sent it (the router's is decoded)."""
    raw = request.raw_path.split("?", 1)[0]
    prefix = f"/api/v1/sessions/{sid}/files"
    if not raw.startswith(prefix):
        raise BadRequest("The request target is not under the session's files",
                         reason="bad_path")
    return raw[len(prefix):].removeprefix("/")


def _api_path(segments: list[str]) -> str:
    return "/".join(urllib.parse.quote(seg, safe="") for seg in segments)


async def _confined(session: Session, segments: list[str]) -> None:
    """Refuse a path that resolves (through symlinks) outside a local session's directory."""
    workdir = session.backend_state.get("workdir") if session.backend == "local" else None
    if not workdir or not segments:
        return

    def escapes() -> bool:
        root = os.path.realpath(workdir)
        target = os.path.realpath(os.path.join(root, *segments))
        return target != root and not target.startswith(root + os.sep)

    if await asyncio.to_thread(escapes):
        raise Forbidden("The path leads out of the session's working directory",
                        reason="path_escape")


#: An absolute filesystem path of two or more segments in an upstream message (Jupyter
#: Server quotes OSError texts, which name the server's own directories).
_SERVER_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"]+/)+[^\s/'\"]*")


def _refusal(status: int, body: bytes) -> BrokerError:
    """A broker error for an upstream contents API refusal.

    The upstream's message is passed on for 400, 403 and 409 (it says what was
    wrong), without the server's absolute paths: a client names files relative
    to its session's directory and has no use for where that lives.
    """
    try:
        message = str(json.loads(body).get("message") or "")[:300]
    except (ValueError, AttributeError):
        message = ""
    message = _SERVER_PATH.sub("[server path]", message)
    if status == 404:
        return NotFound("No such file or directory", reason="no_such_file")
    if status == 400:
        return BadRequest(message or "The session's server refused the request",
                          reason="bad_request")
    if status == 403:
        return Forbidden(message or "The session's server refused access", reason="forbidden")
    if status == 409:
        return Conflict(message or "Conflict", reason="conflict")
    if status == 413:
        return PayloadTooLarge("The session's server refused the file as too large")
    return UpstreamFailed(f"The session's server failed ({status})", reason="upstream_failed")


async def _contents(
    request: web.Request,
    session: Session,
    method: str,
    segments: list[str],
    *,
    params: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
    limit: int = 1 << 20,
) -> tuple[int, bytes]:
    """One contents API call upstream: (status, body), the body read up to ``limit``."""
    settings = request.app[appkeys.SETTINGS]
    upstream = request.app[appkeys.UPSTREAM].for_session(session)
    headers = [("Accept", "application/json")]
    raw_body = None
    if body is not None:
        headers.append(("Content-Type", "application/json"))
        raw_body = json.dumps(body).encode()
    try:
        async with await upstream.request(
            method, "api/contents/" + _api_path(segments), headers, raw_body,
            query=urllib.parse.urlencode(params, quote_via=urllib.parse.quote) if params
            else None,
        ) as resp:
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.iter_chunks():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"The file is larger than {settings.max_download_size} bytes "
                        "(BROKER_MAX_DOWNLOAD_SIZE)", reason="file_too_large")
                chunks.append(chunk)
            data = b"".join(chunks)
    except (UpstreamError, TimeoutError) as exc:
        request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "unreachable")
        raise UpstreamFailed("The session's Jupyter server did not answer",
                             reason="upstream_unreachable") from exc
    if resp.status >= 500:
        request.app[appkeys.MANAGER].metrics.upstream_error(session.backend, "bad_response")
    if resp.status >= 400:
        raise _refusal(resp.status, data)
    return resp.status, data


async def _inside_a_file(request: web.Request, session: Session,
                         segments: list[str]) -> str | None:
    """The first ancestor of ``segments`` that is a file, if one is (else None).

    Asked only after the upstream refused a nested path: Jupyter Server answers
    a path under a file with a 500 (read, delete) or a 400 naming its own
    directory (create), where the client deserves "that is a file".
    """
    for depth in range(1, len(segments)):
        try:
            _, raw = await _contents(request, session, "GET", segments[:depth],
                                     params={"content": "0"})
        except NotFound:
            return None
        if json.loads(raw).get("type") != "directory":
            return "/".join(segments[:depth])
    return None


async def _nested(request: web.Request, session: Session, method: str, segments: list[str],
                  **kwargs: Any) -> tuple[int, bytes]:
    """:func:`_contents`, with a clear error when the path runs through a file
    (see :func:`_through_a_file`)."""
    try:
        return await _contents(request, session, method, segments, **kwargs)
    except (BadRequest, UpstreamFailed) as exc:
        await _through_a_file(request, session, method, segments, exc)
        raise


async def _through_a_file(request: web.Request, session: Session, method: str,
                          segments: list[str], exc: BrokerError) -> None:
    """After the upstream refused ``segments`` with ``exc``: if the path runs through a
    file, raise 404 ``no_such_file`` (to read or delete) or 409 ``not_a_directory``
    (to create) naming that file; else return (the caller re-raises ``exc``)."""
    if len(segments) < 2 or exc.reason == "upstream_unreachable":
        return
    blocker = await _inside_a_file(request, session, segments)
    if blocker is None:
        return
    if method == "PUT":
        raise Conflict(f"'{blocker}' is a file: nothing can be created inside it",
                       reason="not_a_directory") from exc
    raise NotFound(f"'{blocker}' is a file, so '{'/'.join(segments)}' does not exist",
                   reason="no_such_file") from exc


def _entry(model: dict[str, Any]) -> dict[str, Any]:
    """The client view of a contents model."""
    kind = model.get("type")
    return {
        "name": model.get("name", ""),
        "path": model.get("path", ""),
        "type": "directory" if kind == "directory" else "file",
        "size": model.get("size"),
        "last_modified": model.get("last_modified"),
        "mimetype": model.get("mimetype"),
    }


async def _listing(request: web.Request, session: Session,
                   segments: list[str]) -> web.Response:
    await _confined(session, segments)
    _, raw = await _nested(request, session, "GET", segments,
                           params={"type": "directory", "content": "1"}, limit=16 << 20)
    model = json.loads(raw)
    entries = sorted((_entry(m) for m in model.get("content") or []), key=lambda e: e["name"])
    return web.json_response({"path": "/".join(segments), "entries": entries})


@routes.get(FILES_ROUTE, name="files")
async def get_file(request: web.Request) -> web.StreamResponse:
    """Download a file's bytes, or list a directory (no path, or one ending in ``/``)."""
    session = await agent_session(request)
    tail = _raw_tail(request, session.id)
    segments = parse_path(tail)
    request.app[appkeys.MANAGER].note_activity(session.id)
    if not segments or tail.endswith("/"):
        return await _listing(request, session, segments)
    await _confined(session, segments)
    cap = request.app[appkeys.SETTINGS].max_download_size
    _, raw = await _nested(request, session, "GET", segments,
                           params={"type": "file", "format": "base64", "content": "1"},
                           limit=cap * 37 // 27 + _CHUNK)  # base64 with newlines, JSON
    model = json.loads(raw)
    try:
        data = base64.b64decode(model.get("content") or "")
    except (binascii.Error, ValueError) as exc:
        raise UpstreamFailed("The session's server sent an undecodable file") from exc
    if len(data) > cap:
        raise PayloadTooLarge(f"The file is larger than {cap} bytes (BROKER_MAX_DOWNLOAD_SIZE)",
                              reason="file_too_large")
    name = segments[-1]
    content_type = (model.get("mimetype") or mimetypes.guess_type(name)[0]
                    or "application/octet-stream")
    disposition = f"attachment; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"
    return web.Response(body=data, headers={**_DOWNLOAD_HEADERS, "Content-Type": content_type,
                                            "Content-Disposition": disposition})


async def _read_upload(request: web.Request, cap: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``cap``."""
    too_large = PayloadTooLarge(f"The file is larger than {cap} bytes (BROKER_MAX_UPLOAD_SIZE)",
                                reason="file_too_large")
    if request.content_length is not None and request.content_length > cap:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > cap:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@routes.put(FILES_ROUTE, name="files")
async def put_file(request: web.Request) -> web.Response:
    """Upload the raw body as a file (parent directories are created); 201 new, 200 replaced."""
    session = await agent_session(request)
    tail = _raw_tail(request, session.id)
    segments = parse_path(tail)
    if not segments or tail.endswith("/"):
        raise BadRequest("Name a file to upload, not a directory", reason="bad_path")
    await _confined(session, segments)
    data = await _read_upload(request, request.app[appkeys.SETTINGS].max_upload_size)
    request.app[appkeys.MANAGER].note_activity(session.id)
    try:
        for depth in range(1, len(segments)):
            await _contents(request, session, "PUT", segments[:depth],
                            body={"type": "directory"})
        status, raw = await _contents(
            request, session, "PUT", segments,
            body={"type": "file", "format": "base64",
                  "content": base64.b64encode(data).decode()},
        )
    except (BadRequest, UpstreamFailed) as exc:
        await _through_a_file(request, session, "PUT", segments, exc)
        raise
    return web.json_response(_entry(json.loads(raw)), status=201 if status == 201 else 200)


@routes.delete(FILES_ROUTE, name="files")
async def delete_file(request: web.Request) -> web.Response:
    """Delete a file or an empty directory."""
    session = await agent_session(request)
    segments = parse_path(_raw_tail(request, session.id))
    if not segments:
        raise BadRequest("The working directory itself cannot be deleted", reason="bad_path")
    await _confined(session, segments)
    request.app[appkeys.MANAGER].note_activity(session.id)
    await _nested(request, session, "DELETE", segments)
    return web.Response(status=204)
