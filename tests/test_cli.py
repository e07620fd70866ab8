"""The command line: the configuration reference and the settings contract."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
from pydantic import ValidationError

from broker.cli import freeze_heap
from broker.settings import Settings

CONTRACT = ["BROKER_HOST", "BROKER_PORT", "BROKER_PUBLIC_URL", "BROKER_REDIS_URL",
            "BROKER_BACKEND", "BROKER_HUB_URL", "BROKER_HUB_API_TOKEN", "BROKER_BINDER_URL",
            "BROKER_SESSION_MAX_AGE", "BROKER_SESSION_IDLE_TIMEOUT", "BROKER_ADMIN_TOKEN",
            "BROKER_ALLOWED_ORIGINS", "BROKER_MAX_SESSIONS", "BROKER_MAX_SESSIONS_PER_OWNER",
            "BROKER_TRUSTED_PROXIES"]


def test_config_prints_every_setting_with_its_description() -> None:
    out = subprocess.run([sys.executable, "-m", "broker.cli", "config"], capture_output=True,
                         text=True, check=True).stdout
    for env in [f"BROKER_{name.upper()}" for name in Settings.model_fields]:
        assert env in out
    for env in CONTRACT:
        assert env in out
    assert "(default: 86400)" in out  # session max age, as thebe's saved sessions


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_ALLOWED_ORIGINS", "https://A.example/, https://b.example")
    monkeypatch.setenv("BROKER_TRUSTED_PROXIES", "10.0.0.0/8,fd00::/8")
    monkeypatch.setenv("BROKER_SESSION_MAX_AGE", "3600")
    settings = Settings()
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.trusted_proxies == ["10.0.0.0/8", "fd00::/8"]
    assert settings.session_max_age == 3600
    assert settings.port == 8765 and settings.host == "127.0.0.1"


@pytest.mark.parametrize("env", [
    {"BROKER_REDIS_URL": "redis://127.0.0.1:1/0"},  # Redis without a shared secret key
    {"BROKER_TRUSTED_PROXIES": "not-a-network"},
    {"BROKER_BACKEND": "jupyterhub"},  # without a hub URL
    {"BROKER_BACKEND": "nonsense"},
])
def test_invalid_configuration_is_refused_clearly(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--port", "0"],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_secret_settings_are_not_printed() -> None:
    settings = Settings(hub_api_token="s3cr3t-value", hub_url="http://hub")
    assert "s3cr3t-value" not in repr(settings)
    with pytest.raises(ValidationError):
        Settings(port=70000)


class _Node:
    """A container that can form a reference cycle (garbage only the collector frees)."""

    self_ref: object = None


def test_serve_freezes_the_start_up_heap_after_collecting_its_garbage() -> None:
    """``serve`` freezes what start-up left alive, but never a cycle that was garbage then:
    frozen, it could not be freed."""
    node = _Node()
    node.self_ref = node
    ref = weakref.ref(node)
    del node
    try:
        frozen = freeze_heap()
        assert ref() is None
        assert frozen == gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
