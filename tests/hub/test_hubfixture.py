"""The hub fixture keeps its promises: a clear error without the proxy, nothing left running."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import hubfixture
from tests.conftest import pid_alive


def test_missing_proxy_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hubfixture, "CHP_BINARY", tmp_path / "configurable-http-proxy")
    with pytest.raises(hubfixture.HubSetupError) as error:
        hubfixture.start_hub(tmp_path / "hub")
    assert "scripts/setup.d/chp.sh" in str(error.value)
    assert not (tmp_path / "hub").exists()  # refused before anything was started


async def test_stop_ends_hub_proxy_and_servers_by_pid(tmp_path: Path) -> None:
    hub = hubfixture.start_hub(tmp_path / "hub", name="throwaway")
    try:
        status, _ = await hub.api("POST", "users/fixture-check")
        assert status == 201
        status, _ = await hub.api("POST", "users/fixture-check/server", {})
        assert status in (201, 202)
        assert (await hub.follow_progress("fixture-check")).get("ready") is True
        [server_pid] = hub.spawned_pids()
        proxy_pid = int((hub.workdir / "proxy.pid").read_text())
        assert pid_alive(hub.proc.pid) and pid_alive(proxy_pid) and pid_alive(server_pid)
    finally:
        hub.stop()
    assert not any(pid_alive(pid) for pid in (hub.proc.pid, proxy_pid, server_pid))
