"""docs/configuration.md is generated from the settings model and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker.settings import settings_reference
from tests.deploy.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gen-config-docs.py"
DOC = ROOT / "docs" / "configuration.md"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_configuration_md_is_current() -> None:
    proc = run("--check")
    assert proc.returncode == 0, proc.stderr


def test_configuration_md_lists_every_setting() -> None:
    text = DOC.read_text()
    missing = [env for env, _, _ in settings_reference() if f"| `{env}` |" not in text]
    assert not missing, (f"docs/configuration.md lacks {missing}: "
                         f"run .venv/bin/python scripts/{SCRIPT.name}")


def test_check_reports_a_stale_file_and_the_command(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("\n".join(DOC.read_text().splitlines()[:-1]) + "\n")  # a setting dropped
    proc = run("--check", "--output", str(stale))
    assert proc.returncode == 1
    assert "scripts/gen-config-docs.py" in proc.stderr
    # Regenerating fixes it.
    assert run("--output", str(stale)).returncode == 0
    assert run("--check", "--output", str(stale)).returncode == 0
