"""The served OpenAPI document matches what the API really returns."""

from __future__ import annotations

from typing import Any

from yarl import URL

from tests.conftest import BrokerHarness, MakeBroker


def _check(schema: dict[str, Any], value: dict[str, Any]) -> None:
    """A small structural check: required keys, no undocumented keys, enum values."""
    assert set(schema["required"]) <= set(value), set(schema["required"]) - set(value)
    undocumented = set(value) - set(schema["properties"])
    assert not undocumented, f"undocumented fields: {undocumented}"
    for key, item in value.items():
        prop = schema["properties"][key]
        if "enum" in prop:
            assert item in prop["enum"], (key, item)


async def test_openapi_documents_real_responses(broker: BrokerHarness) -> None:
    async with broker.http.get(f"{broker.url}/api/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/sessions", "/api/v1/sessions/{sid}", "/api/v1/sessions/{sid}/events"):
        assert path in doc["paths"]
    session_schema = doc["components"]["schemas"]["Session"]
    error_schema = doc["components"]["schemas"]["Error"]

    status, created = await broker.create()
    assert status == 201
    _check(session_schema, created)
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{created['id']}",
                               headers={"Authorization": f"token {created['token']}"}) as resp:
        described = await resp.json()
    _check(session_schema, described)
    assert "token" not in described
    async with broker.http.post(f"{broker.url}/api/v1/sessions", data=b"{nope") as resp:
        assert resp.status == 400
        error = await resp.json()
    assert set(error_schema["required"]) <= set(error)
    assert "400" in doc["paths"]["/api/v1/sessions"]["post"]["responses"]


async def test_openapi_documents_agent_responses(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    async with broker.http.get(f"{broker.url}/api/v1/openapi.json") as resp:
        doc = await resp.json()
    schemas = doc["components"]["schemas"]
    execute_doc = doc["paths"]["/api/v1/sessions/{sid}/execute"]["post"]
    files_doc = doc["paths"]["/api/v1/sessions/{sid}/files/{path}"]
    session = await broker.ready_session()
    base = f"{broker.url}/api/v1/sessions/{session['id']}"
    auth = {"Authorization": f"token {session['token']}"}

    code = "from IPython.display import HTML, display\nprint('x')\ndisplay(HTML('<b>'))\n1"
    for source, status in ((code, "ok"), ("1/0", "error"), ("while True: pass", "timeout")):
        async with broker.http.post(f"{base}/execute", headers=auth,
                                    json={"code": source, "timeout": 1}) as resp:
            assert str(resp.status) in execute_doc["responses"]
            result = await resp.json()
        _check(schemas["ExecuteResult"], result)
        assert result["status"] == status
        if result["error"] is not None:
            _check(schemas["ExecutionError"], result["error"])
    async with broker.http.post(f"{base}/execute", headers=auth, json={"nope": 1}) as resp:
        assert str(resp.status) in execute_doc["responses"]
        assert set(schemas["Error"]["required"]) <= set(await resp.json())

    async with broker.http.put(f"{base}/files/dir/a.txt", headers=auth, data=b"a") as resp:
        assert str(resp.status) in files_doc["put"]["responses"]
        _check(schemas["FileEntry"], await resp.json())
    async with broker.http.get(f"{base}/files/dir/", headers=auth) as resp:
        listing = await resp.json()
    _check(schemas["FileListing"], listing)
    for entry in listing["entries"]:
        _check(schemas["FileEntry"], entry)
    async with broker.http.get(URL(f"{base}/files/%2e%2e/x", encoded=True),
                               headers=auth) as resp:
        assert resp.status == 400 and "400" in files_doc["get"]["responses"]
    async with broker.http.delete(f"{base}/files/dir/a.txt", headers=auth) as resp:
        assert str(resp.status) in files_doc["delete"]["responses"]


async def test_openapi_agrees_with_what_the_handlers_accept(make_broker: MakeBroker) -> None:
    """Where the document and a handler could disagree, both say the same."""
    import jsonschema

    broker = await make_broker()
    async with broker.http.get(f"{broker.url}/api/v1/openapi.json") as resp:
        doc = await resp.json()
    create = doc["paths"]["/api/v1/sessions"]["post"]
    body_schema = create["requestBody"]["content"]["application/json"]["schema"]

    def documented(body: dict[str, Any]) -> bool:
        try:
            jsonschema.validate(body, body_schema)
        except jsonschema.ValidationError:
            return False
        return True

    # Refused bodies: the document refuses them too (no session is started for them).
    for body in ({"spec": "gh/a/b\x07"}, {"spec": "x" * 1025}, {"profile": "-bad"},
                 {"kernel_name": "no spaces"}, {"spec": "a", "extra": 1}):
        async with broker.http.post(f"{broker.url}/api/v1/sessions", json=body) as resp:
            assert resp.status == 400, body
        assert not documented(body), body
    assert "413" in create["responses"]

    # An empty upload is an empty file: the body is optional in the document.
    put = doc["paths"]["/api/v1/sessions/{sid}/files/{path}"]["put"]
    assert put["requestBody"]["required"] is False
    session = await broker.ready_session()
    async with broker.http.put(f"{broker.url}/api/v1/sessions/{session['id']}/files/empty.txt",
                               headers={"Authorization": f"token {session['token']}"},
                               data=b"") as resp:
        assert str(resp.status) in put["responses"] and resp.status == 201
        assert (await resp.json())["size"] == 0

    # /build: what is not a launch is the router's JSON 404 / 405, as documented.
    build = doc["paths"]["/build/{provider}/{spec}"]["get"]["responses"]
    async with broker.http.get(f"{broker.url}/build/gh") as resp:
        assert resp.status == 404 and "404" in build
        assert (await resp.json())["reason"] == "not_found"
    async with broker.http.head(f"{broker.url}/build/gh/owner/repo/HEAD") as resp:
        assert resp.status == 405 and "405" in build
        assert resp.headers["Allow"] == "GET"
