"""The served OpenAPI document matches what the API really returns."""

from __future__ import annotations

from typing import Any

from tests.conftest import BrokerHarness


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
