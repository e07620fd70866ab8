"""Every broker setting can be set through the chart, and the chart's schema follows the model.

Adding a setting to ``broker.settings.Settings`` needs, in the chart, one line
in ``helm/session-broker/values.yaml`` (``config.<name>: <default>``, or
``secrets.<name>: ""`` for a ``SecretStr``) and a run of
``scripts/gen-chart-reference.py``; these tests name what is missing.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from typing import Any

import yaml
from pydantic import SecretStr

from broker.settings import Settings
from tests.deploy.conftest import CHART, ROOT

GENERATOR = ROOT / "scripts" / "gen-chart-reference.py"
REGENERATE = ".venv/bin/python scripts/gen-chart-reference.py"
# Where the chart's default deliberately differs from the broker's.
CHART_DEFAULTS: dict[str, Any] = {
    "host": "0.0.0.0",  # a pod must listen beyond loopback
    "metrics_port": 9090,  # metrics off the public port, which the ingress routes
}


def chart_managed() -> dict[str, str]:
    """Settings the chart derives from other values (the generator's list)."""
    managed: dict[str, str] = runpy.run_path(str(GENERATOR))["CHART_MANAGED"]
    return managed


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def is_secret(name: str) -> bool:
    return Settings.model_fields[name].annotation is SecretStr


def test_every_setting_has_a_chart_value() -> None:
    chart = set(values()["config"]) | set(values()["secrets"]) | set(chart_managed())
    missing = [name for name in Settings.model_fields if name not in chart]
    hints = [f"secrets.{n}: \"\"" if is_secret(n) else f"config.{n}: <default>" for n in missing]
    assert not missing, (
        f"settings without a chart value: {', '.join(missing)}. Add to "
        f"helm/session-broker/values.yaml: {'; '.join(hints)}; then run {REGENERATE}")


def test_every_chart_value_is_a_setting() -> None:
    chart = set(values()["config"]) | set(values()["secrets"]) | set(chart_managed())
    unknown = sorted(chart - set(Settings.model_fields))
    assert not unknown, f"chart values for settings that do not exist: {unknown}"


def test_secret_settings_live_in_secrets_only() -> None:
    secret = {name for name in Settings.model_fields if is_secret(name)}
    assert secret, "the model has SecretStr settings; this test must see them"
    assert set(values()["secrets"]) == secret - set(chart_managed())
    assert not secret & set(values()["config"])


def test_chart_defaults_match_the_broker_defaults() -> None:
    config = values()["config"]
    drift = {}
    for name, value in config.items():
        expected = CHART_DEFAULTS.get(name, Settings.model_fields[name].get_default(
            call_default_factory=True))
        if value != expected:
            drift[name] = (value, expected)
    assert not drift, f"values.yaml config defaults differ from the broker's: {drift}"
    assert all(v == "" for v in values()["secrets"].values())


def test_chart_schema_and_values_reference_are_current() -> None:
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr or f"stale: run {REGENERATE}"


def test_schema_has_one_property_per_setting() -> None:
    """The generated schema names exactly the settings the values do, with the model's bounds."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    assert set(schema["config"]["properties"]) == set(values()["config"])
    assert set(schema["secrets"]["properties"]) == set(values()["secrets"])
    port = schema["config"]["properties"]["port"]
    assert (port["type"], port["minimum"], port["maximum"]) == ("integer", 0, 65535)
    # Backends are registered by name (built-ins and installed packages), so the chart
    # checks the name's shape; the broker refuses an unknown one at start-up.
    backend = schema["config"]["properties"]["backend"]
    assert "enum" not in backend
    assert backend["pattern"] == Settings.model_json_schema()["properties"]["backend"]["pattern"]
    for name, prop in schema["secrets"]["properties"].items():
        assert prop["description"].startswith(f"BROKER_{name.upper()}: ")
