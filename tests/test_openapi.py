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
