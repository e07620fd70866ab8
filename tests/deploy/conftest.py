"""Fixtures for the deployment checks (Helm chart, docs, image install).

``helm`` (session)
    A :class:`Helm` around the helm binary in ``.tools/helm/``, installed by
    ``scripts/setup.d/helm.sh`` when missing, with its cache/config/data
    directories kept inside the project. ``helm.template(...)`` renders the
    chart (memoised per argument list) and returns the parsed manifests.

Constants name the chart, its CI value sets (``helm/session-broker/ci/``)
and the Kubernetes versions rendered manifests are validated against.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "session-broker"
HELM_DIR = ROOT / ".tools" / "helm"
VALUE_SETS = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*.yaml"))}
# The chart's kubeVersion floor and a current release.
KUBE_VERSIONS = ("1.28.0", "1.35.0")
BIN = Path(sys.executable).parent

Manifest = dict[str, Any]


@dataclass
class Helm:
    """The helm binary with project-local state."""

    binary: Path
    env: dict[str, str]
    _renders: dict[tuple[str, ...], str] = field(default_factory=dict)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=120)

    @staticmethod
    def _value_args(values: tuple[str | Path, ...], sets: dict[str, Any] | None) -> list[str]:
        args: list[str] = []
        for item in values:
            args += ["--values", str(VALUE_SETS.get(str(item), item))]
        for key, value in (sets or {}).items():
            args += ["--set-string" if isinstance(value, str) else "--set", f"{key}={value}"]
        return args

    def lint(self, *values: str | Path,
             sets: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("lint", "--strict", str(CHART), *self._value_args(values, sets))

    def template_text(self, *values: str | Path, sets: dict[str, Any] | None = None,
                      fresh: bool = False) -> str:
        """``helm template`` output (release "t", namespace "jupyter"); memoised unless fresh."""
        args = ("template", "t", str(CHART), "--namespace", "jupyter",
                "--kube-version", KUBE_VERSIONS[-1], *self._value_args(values, sets))
        if fresh or args not in self._renders:
            proc = self.run(*args)
            assert proc.returncode == 0, proc.stderr
            self._renders[args] = proc.stdout
        return self._renders[args]

    def template(self, *values: str | Path, sets: dict[str, Any] | None = None) -> list[Manifest]:
        text = self.template_text(*values, sets=sets)
        return [doc for doc in yaml.safe_load_all(text) if doc]


def tool_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    for name in ("cache", "config", "data"):
        env[f"HELM_{name.upper()}_HOME"] = str(HELM_DIR / name)
    return env


@pytest.fixture(scope="session")
def helm() -> Helm:
    binary = HELM_DIR / "helm"
    if not binary.exists():  # `make test` installs it first; this keeps `pytest tests/deploy` whole
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.d" / "helm.sh")], check=True,
                       cwd=ROOT, timeout=600)
    assert binary.exists(), "scripts/setup.d/helm.sh did not install .tools/helm/helm"
    return Helm(binary, tool_env())


def find(manifests: list[Manifest], kind: str, component: str | None = None) -> list[Manifest]:
    """Manifests of one kind (and app.kubernetes.io/component, when given)."""
    return [m for m in manifests if m["kind"] == kind and (
        component is None
        or m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def one(manifests: list[Manifest], kind: str, component: str | None = "broker") -> Manifest:
    found = find(manifests, kind, component)
    assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
    return found[0]


def broker_env(manifests: list[Manifest]) -> dict[str, str]:
    """The BROKER_* environment a broker pod gets from the chart's ConfigMap and Secret."""
    env = dict(one(manifests, "ConfigMap")["data"])
    secret = one(manifests, "Secret")
    env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    return env
