"""The package builds where no C compiler works, and then carries the relay as Python.

``setup.py`` compiles the relay's per-frame module with Cython where it can;
a machine without a working compiler must still get a wheel (the module then
runs as Python, see ``broker.proxy.wire``). ``CC=false`` stands for a
compiler that fails on everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_a_wheel_without_a_compiler_has_the_relay_as_python(tmp_path: Path) -> None:
    context = tmp_path / "src-copy"
    context.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, context / name)
    shutil.copytree(ROOT / "src", context / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "*.c"))
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps",
         "--wheel-dir", str(wheels), str(context)],
        env={**os.environ, "CC": "false"}, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = list(wheels.glob("jupyter_session_broker-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "broker/proxy/_wire_py.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
