"""The OpenAPI 3.1 document of the native API, served at ``/api/v1/openapi.json``.

Written as data next to the handlers it describes; ``tests/test_openapi.py``
checks real responses against these schemas so the document cannot drift.
The Jupyter surface under ``/s/{id}/`` is Jupyter Server's own REST API and
is described by reference, not repeated.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker import __version__
from broker.api import openapi_agent
from broker.api.openapi_agent import NAME_PATTERN

routes = web.RouteTableDef()

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "Machine-readable reason code."},
        "reason": {"type": "string", "description": "Same as error."},
        "message": {"type": "string", "description": "Human-readable explanation."},
    },
}
_TS = {"type": "string", "format": "date-time"}
#: What parse_session_request accepts for ``spec``: no control characters.
SPEC_PATTERN = "^[^\\u0000-\\u001f]*$"
_SESSION = {
    "type": "object",
    "required": ["id", "status", "backend", "base_url", "ws_url", "created_at", "expires_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "token": {
            "type": "string",
            "description": "Broker session token. Returned only by POST (create or reuse); "
            "present it as `Authorization: token …` or `?token=`.",
        },
        "status": {"type": "string", "enum": ["pending", "ready", "failed", "stopped"]},
        "backend": {"type": "string", "enum": ["local", "jupyterhub", "binderhub"]},
        "spec": {"type": "string"},
        "profile": {"type": "string"},
        "kernel_name": {"type": "string"},
        "base_url": {"type": "string", "description": "Jupyter server base URL for clients."},
        "ws_url": {"type": "string", "description": "WebSocket base URL for kernel channels."},
        "created_at": _TS,
        "expires_at": _TS,
        "last_activity": _TS,
        "message": {"type": "string", "description": "Latest progress or failure message."},
        "ended_reason": {
            "type": "string",
            "description": "Why a failed/stopped session ended (deleted, max_age, idle, "
            "upstream_exited, upstream_gone, upstream_down, spawn_timeout, ...).",
        },
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {"description": "Refused", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for code in codes
    }


def _token_param() -> list[dict[str, Any]]:
    return [
        {"name": "sid", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "Alternative to the Authorization header (EventSource, WebSocket)."},
    ]


def _session_ref(description: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Session"}}}}


DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "jupyter-session-broker",
        "version": __version__,
        "description": "Per-visitor Jupyter sessions. After creation, talk Jupyter Server's "
        "REST API and kernel WebSocket protocol to `base_url` with the session token, or "
        "(AI agents) run code with `/execute` and move files with `/files` as plain JSON.",
    },
    "components": {
        "securitySchemes": {
            "sessionToken": {"type": "apiKey", "in": "header", "name": "Authorization",
                             "description": "`token <session token>` (or `Bearer`)."},
        },
        "schemas": {"Error": _ERROR, "Session": _SESSION, **openapi_agent.SCHEMAS},
    },
    "paths": {
        "/api/v1/sessions": {
            "post": {
                "summary": "Create a session, or reuse the caller's live one for the same spec",
                "description": "Send the token of an earlier session (Authorization header) "
                "to get that session back (200) while it is alive upstream; otherwise a new "
                "session is created (201).",
                "parameters": [{"name": "wait", "in": "query", "schema": {"type": "boolean"},
                                "description": "Return once the session is ready or failed "
                                "(never pending: 504 wait_timeout with the session id when "
                                "its outcome is not known in time)."}],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "spec": {"type": "string", "maxLength": 1024, "pattern": SPEC_PATTERN,
                                 "description": "What to launch, e.g. gh/owner/repo/ref. At "
                                 "most 1024 characters (after trimming spaces), no control "
                                 "characters (400 otherwise)."},
                        "profile": {"type": "string", "pattern": NAME_PATTERN},
                        "kernel_name": {"type": "string", "pattern": NAME_PATTERN,
                                        "description": "Default kernel for this session."},
                    }}}}},
                "responses": {
                    "201": _session_ref("Created"),
                    "200": _session_ref("Reused"),
                    **_errors(400, 403, 413, 429, 502, 503, 504),
                    "429": {"description": "Rate or quota refusal: reason creation_rate, "
                            "owner_sessions, spawn_concurrency (Retry-After; X-RateLimit-* "
                            "on creation_rate)", "content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/Error"}}}},
                    "503": {"description": "Capacity refusal: reason capacity or "
                            "spec_capacity; or the session store is unreachable: reason "
                            "store_unavailable (Retry-After)", "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Error"}}}},
                },
            },
        },
        "/api/v1/sessions/{sid}": {
            "parameters": _token_param(),
            "get": {"summary": "Describe a session", "security": [{"sessionToken": []}],
                    "responses": {"200": _session_ref("The session"),
                                  **_errors(401, 403, 404, 503)}},
            "delete": {"summary": "Stop a session now", "security": [{"sessionToken": []}],
                       "responses": {"204": {"description": "Stopped"},
                                     **_errors(401, 403, 404, 503)}},
        },
        "/api/v1/sessions/{sid}/events": {
            "parameters": _token_param(),
            "get": {
                "summary": "Spawn progress as server-sent events",
                "description": "`data: {\"phase\", \"message\", \"progress\"?}` lines, ending "
                "with phase ready, failed or stopped; `:keepalive` comments in between. While "
                "the spawn waits for a spawn slot: phase waiting with `queue_position` (1 = "
                "next) and `queue_wait` (estimated seconds, when known).",
                "security": [{"sessionToken": []}],
                "responses": {"200": {"description": "Event stream",
                                      "content": {"text/event-stream": {}}},
                              **_errors(401, 403, 404, 503)},
            },
        },
        **openapi_agent.PATHS,
        "/build/{provider}/{spec}": {
            "get": {
                "summary": "BinderHub-compatible launch stream (thebe / MyST books)",
                "description": "Always HTTP 200 `text/event-stream`, as BinderHub answers: "
                "unnamed `data: {\"phase\", \"message\"}` events (waiting, launching, ...; a "
                "queued launch's waiting events add `queue_position` and `queue_wait`), "
                "`:keepalive` comments, and a final `ready` event whose `url` is the broker's "
                "`/s/{id}/` and whose `token` is a broker session token, or a `failed` event "
                "with `status_code` (400 malformed spec, 403 denied, 429 rate limits, 503 "
                "capacity, 502/504 upstream). Each launch is a new session unless it proves "
                "whose it is: a broker token of the session (`Authorization: token` or "
                "`?token=`) brings that live session back with the same token. Providers: gh, "
                "gl, git, gist, zenodo, figshare, dataverse, hydroshare, ckan.",
                "parameters": [
                    {"name": "provider", "in": "path", "required": True,
                     "schema": {"type": "string"}},
                    {"name": "spec", "in": "path", "required": True,
                     "schema": {"type": "string"},
                     "description": "Provider-specific; may contain slashes (a gh ref)."},
                    {"name": "token", "in": "query", "required": False,
                     "schema": {"type": "string"},
                     "description": "A broker token of a live session for this spec: that "
                     "session comes back (a header `Authorization: token ...` works too)."},
                ],
                "responses": {"200": {"description": "Event stream",
                                      "content": {"text/event-stream": {}}},
                              "404": {"description": "No launch route: the path lacks a "
                                      "provider or a spec (the router's JSON 404)",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/Error"}}}},
                              "405": {"description": "Not GET (HEAD too: a link checker must "
                                      "not launch sessions); Allow: GET",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/Error"}}}}},
            },
        },
        "/s/{sid}/api/…": {
            "summary": "Jupyter Server REST API and kernel WebSocket of the session",
            "description": "api/status, api/kernelspecs, api/kernels[/{id}[/interrupt|"
            "restart|channels]], api/sessions[/{id}] — exactly as Jupyter Server documents "
            "them; other paths answer 404 not_proxied.",
        },
        "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "OK"}}}},
        "/ready": {"get": {"summary": "Readiness (store and backend)",
                           "responses": {"200": {"description": "Ready"},
                                         "503": {"description": "Not ready"}}}},
    },
}


@routes.get("/api/v1/openapi.json", name="openapi")
async def openapi(request: web.Request) -> web.Response:
    """The document above, as JSON."""
    return web.json_response(DOCUMENT)
