"""OpenAPI paths and schemas of the agent API (execute and files).

Kept apart from :mod:`broker.api.openapi`, which merges :data:`PATHS` and
:data:`SCHEMAS` into the served document; ``tests/test_openapi.py`` checks
real execute and files answers against these schemas.
"""

from __future__ import annotations

from typing import Any

_BUNDLE = {
    "type": "object",
    "description": "A MIME bundle: MIME type -> data (text, or base64 for binary images; "
    "JSON types as JSON), e.g. {\"text/plain\": \"42\", \"text/html\": \"<b>42</b>\"}.",
    "additionalProperties": True,
}
_EXEC_ERROR = {
    "type": "object",
    "required": ["ename", "evalue", "traceback"],
    "additionalProperties": False,
    "properties": {
        "ename": {"type": "string", "description": "Exception class, or TimeoutError, "
                  "KernelRestarted, KernelDied, ExecutionAborted."},
        "evalue": {"type": "string"},
        "traceback": {"type": "array", "items": {"type": "string"},
                      "description": "Traceback lines, ANSI colour codes removed."},
    },
}
EXECUTE_RESULT = {
    "type": "object",
    "required": ["status", "execution_count", "stdout", "stderr", "result", "display", "error",
                 "duration_ms", "truncated"],
    "additionalProperties": False,
    "properties": {
        "status": {"type": "string", "enum": ["ok", "error", "timeout"],
                   "description": "timeout: the kernel was interrupted (not restarted) at the "
                   "time limit; the output that arrived before is included."},
        "execution_count": {"type": ["integer", "null"]},
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "result": {"oneOf": [{"$ref": "#/components/schemas/MimeBundle"}, {"type": "null"}],
                   "description": "The value of the last expression (execute_result)."},
        "display": {"type": "array", "items": {"$ref": "#/components/schemas/MimeBundle"},
                    "description": "display() outputs in order (HTML, images, ...)."},
        "error": {"oneOf": [{"$ref": "#/components/schemas/ExecutionError"},
                            {"type": "null"}]},
        "duration_ms": {"type": "integer", "description": "From sending the code to the end."},
        "truncated": {"type": "boolean", "description": "Output beyond "
                      "BROKER_EXECUTE_MAX_OUTPUT bytes was dropped."},
    },
}
FILE_ENTRY = {
    "type": "object",
    "required": ["name", "path", "type"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "path": {"type": "string", "description": "Relative to the session's working "
                 "directory."},
        "type": {"type": "string", "enum": ["file", "directory"]},
        "size": {"type": ["integer", "null"]},
        "last_modified": {"type": ["string", "null"], "format": "date-time"},
        "mimetype": {"type": ["string", "null"]},
    },
}
FILE_LISTING = {
    "type": "object",
    "required": ["path", "entries"],
    "additionalProperties": False,
    "properties": {
        "path": {"type": "string"},
        "entries": {"type": "array", "items": {"$ref": "#/components/schemas/FileEntry"}},
    },
}

SCHEMAS: dict[str, Any] = {
    "MimeBundle": _BUNDLE,
    "ExecutionError": _EXEC_ERROR,
    "ExecuteResult": EXECUTE_RESULT,
    "FileEntry": FILE_ENTRY,
    "FileListing": FILE_LISTING,
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {"description": "Refused", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for code in codes
    }


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_SID = {"name": "sid", "in": "path", "required": True, "schema": {"type": "string"}}
#: Profile and kernel names as the handlers check them (api.sessions.NAME), or empty.
NAME_PATTERN = "^([A-Za-z0-9][A-Za-z0-9._\\-]{0,99})?$"
_PATH = {
    "name": "path", "in": "path", "required": True, "schema": {"type": "string"},
    "description": "Relative to the session's working directory, '/'-separated, "
    "percent-decoded once. No leading '/', no '.', '..' or empty segments, no hidden "
    "('.'-prefixed) names, no backslashes or control characters (400 bad_path). A path "
    "that resolves through a symlink out of the directory is 403 path_escape (where the "
    "broker can see the directory: the local backend).",
}
_AUTH: list[dict[str, list[str]]] = [{"sessionToken": []}]

PATHS: dict[str, Any] = {
    "/api/v1/sessions/{sid}/execute": {
        "parameters": [_SID],
        "post": {
            "summary": "Run code on the session's default kernel",
            "description": "The kernel is started on first use and reused, so state "
            "persists across calls. Calls of one session run one at a time. At the time "
            "limit the kernel is interrupted, not restarted. With `Accept: "
            "text/event-stream` each output is sent as it arrives (`event: stream | display "
            "| update_display | result | error | clear_output`, data carries `type` and the "
            "output), `:keepalive` comments every 15 s, and finally `event: done` with the "
            "ExecuteResult, or `event: failed` with an Error body plus `status_code` when "
            "the call fails after the stream started.",
            "security": _AUTH,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["code"], "additionalProperties": False,
                "properties": {
                    "code": {"type": "string"},
                    "timeout": {"type": "number", "exclusiveMinimum": 0,
                                "description": "Seconds; default BROKER_EXECUTE_TIMEOUT_"
                                "DEFAULT, lowered to BROKER_EXECUTE_TIMEOUT_MAX. Counts from "
                                "when the code is sent to the kernel."},
                    "kernel_name": {"type": "string", "pattern": NAME_PATTERN,
                                    "description": "Kernel for the "
                                    "session's default kernel when it is first started "
                                    "(default: the session's kernel_name, else the server's "
                                    "default); a different name later is 409."},
                }}}}},
            "responses": {
                "200": {"description": "The execution ended (ok, error or timeout)",
                        "content": {
                            "application/json": {"schema": {
                                "$ref": "#/components/schemas/ExecuteResult"}},
                            "text/event-stream": {}}},
                **_errors(400, 401, 403, 404, 409, 413, 502, 503),
            },
        },
    },
    "/api/v1/sessions/{sid}/files": {
        "parameters": [_SID],
        "get": {"summary": "List the session's working directory", "security": _AUTH,
                "responses": {"200": _json("Directory entries", "FileListing"),
                              **_errors(401, 403, 404, 502, 503)}},
    },
    "/api/v1/sessions/{sid}/files/{path}": {
        "parameters": [_SID, _PATH],
        "get": {
            "summary": "Download a file's bytes (or list a directory: path ending in '/')",
            "description": "Raw bytes with the file's content type, as an attachment with "
            "`X-Content-Type-Options: nosniff` and a sandboxing Content-Security-Policy.",
            "security": _AUTH,
            "responses": {
                "200": {"description": "File bytes, or a FileListing for a directory path",
                        "content": {"application/octet-stream": {},
                                    "application/json": {"schema": {
                                        "$ref": "#/components/schemas/FileListing"}}}},
                **_errors(400, 401, 403, 404, 413, 502, 503),
            },
        },
        "put": {
            "summary": "Upload the raw request body as a file",
            "description": "Parent directories are created. Larger than "
            "BROKER_MAX_UPLOAD_SIZE: 413.",
            "security": _AUTH,
            "requestBody": {"required": False,
                            "description": "The file's bytes; an empty body makes an empty "
                            "file.",
                            "content": {"application/octet-stream": {}}},
            "responses": {"201": _json("Created", "FileEntry"),
                          "200": _json("Replaced", "FileEntry"),
                          **_errors(400, 401, 403, 404, 413, 502, 503)},
        },
        "delete": {"summary": "Delete a file or an empty directory", "security": _AUTH,
                   "responses": {"204": {"description": "Deleted"},
                                 **_errors(400, 401, 403, 404, 502, 503)}},
    },
}
