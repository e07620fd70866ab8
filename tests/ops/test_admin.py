"""The admin API: off unless configured, token-checked, and able to stop sessions."""

from __future__ import annotations

from broker import appkeys
from tests.conftest import MakeBroker, pid_alive

ADMIN = {"Authorization": "token admin-secret-token"}


async def test_admin_api_is_absent_without_a_token(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    async with broker.http.get(f"{broker.url}/api/v1/admin/sessions", headers=ADMIN) as resp:
        assert resp.status == 404


async def test_admin_lists_inspects_and_stops(make_broker: MakeBroker) -> None:
    broker = await make_broker(admin_token="admin-secret-token", max_sessions=10)
    base = f"{broker.url}/api/v1/admin"
    async with broker.http.get(f"{base}/sessions") as resp:
        assert resp.status == 401
    async with broker.http.get(f"{base}/sessions", headers={"Authorization": "token no"}) as resp:
        assert resp.status == 403
    first = await broker.ready_session()
    second = await broker.ready_session()
    async with broker.http.get(f"{base}/sessions", headers=ADMIN) as resp:
        listing = await resp.json()
    assert listing["count"] == 2
    row = next(s for s in listing["sessions"] if s["id"] == first["id"])
    assert row["owner"] == "127.0.0.1" and row["status"] == "ready"
    assert row["age_seconds"] >= 0 and row["idle_seconds"] >= 0
    assert "token" not in row and "upstream_url" not in str(row)
    async with broker.http.get(f"{base}/usage", headers=ADMIN) as resp:
        usage = await resp.json()
    assert usage["sessions_live"] == 2 and usage["limits"]["max_sessions"] == 10
    assert usage["capacity_used"] == 0.2
    assert usage["top_owners"] == [{"owner": "127.0.0.1", "sessions": 2}]
    settings = broker.app[appkeys.SETTINGS]
    assert usage["limits"]["max_kernels_per_session"] == settings.max_kernels_per_session
    assert usage["top_specs"] == []  # both sessions were created without a spec

    stored = await broker.store.get(first["id"])
    pid = int(stored.backend_state["pid"])
    async with broker.http.delete(f"{base}/sessions/{first['id']}", headers=ADMIN) as resp:
        assert resp.status == 204
    assert not pid_alive(pid)
    async with broker.http.get(f"{base}/sessions/{first['id']}", headers=ADMIN) as resp:
        ended = await resp.json()
    assert ended["status"] == "stopped" and ended["ended_reason"] == "admin"
    # The visitor learns why.
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{first['id']}",
                               headers={"Authorization": f"token {first['token']}"}) as resp:
        assert (await resp.json())["ended_reason"] == "admin"
    async with broker.http.delete(f"{base}/sessions", params={"owner": "127.0.0.1"},
                                  headers=ADMIN) as resp:
        assert (await resp.json()) == {"owner": "127.0.0.1", "stopped": 1}
    async with broker.http.get(f"{base}/sessions/{second['id']}", headers=ADMIN) as resp:
        assert (await resp.json())["status"] == "stopped"
