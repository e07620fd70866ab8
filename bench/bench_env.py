"""The report's header: the machine (quiet or loaded), versions, and which relay the broker runs.

Numbers from a shared 2-core machine mean little without knowing how busy it
was and what code ran, so the header says both: the load average before the
run started (the run's own processes are not in it yet) with a plain
``quiet``/``loaded`` verdict, the broker's commit, and whether the broker's
kernel relay runs compiled or as pure Python.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from bench_cell import client_version
from bench_chp import chp_version
from bench_procs import clean_env, python

ROOT = Path(__file__).resolve().parent.parent
#: 1-minute load per CPU at or above which the machine counts as loaded: a
#: quarter of a core busy on average means the scheduler already shares cores.
LOADED_PER_CPU = 0.25

#: Run by the broker's interpreter in the broker's environment (no BROKER_* of
#: the caller's, as the run starts it): which compiled modules the broker's
#: relay loads once its routes are imported.
_PROBE = """
import importlib.machinery, sys
import broker.app  # noqa: F401  (imports the proxy routes and the relay)
suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
print(" ".join(sorted(name for name, mod in list(sys.modules.items())
                      if name.startswith("broker.")
                      and str(getattr(mod, "__file__", "") or "").endswith(suffixes))))
"""


def load_average() -> tuple[float, float, float]:
    with open("/proc/loadavg") as fh:
        one, five, fifteen = (float(v) for v in fh.read().split()[:3])
    return one, five, fifteen


def machine_state() -> str:
    """``quiet`` or ``loaded``, from the 1-minute load average per CPU right now."""
    cpus = os.cpu_count() or 1
    one, five, fifteen = load_average()
    state = "loaded" if one / cpus >= LOADED_PER_CPU else "quiet"
    return (f"machine {state} (load average {one:.2f} {five:.2f} {fifteen:.2f} before the run "
            f"on {cpus} CPUs; loaded from {LOADED_PER_CPU * cpus:.2f})")


def relay_path(broker_env: Mapping[str, str]) -> str:
    """``compiled (<modules>)`` or ``pure Python``: what the broker's relay imports.

    Loaded is not necessarily used (a setting may select the Python build of
    a module whose compiled build is imported): the run also prints what the
    running broker's ``/versions`` says about its relay.
    """
    try:
        done = subprocess.run([python(), "-c", _PROBE], cwd=ROOT, env=clean_env(**broker_env),
                              text=True,
                              capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    if done.returncode != 0:
        return f"unknown (the probe failed: {done.stderr.strip().splitlines()[-1:]})"
    modules = done.stdout.split()
    return f"compiled ({', '.join(modules)})" if modules else "pure Python"


def broker_revision() -> str:
    """The commit the broker runs from, and whether src/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    if not head:
        return "unknown revision"
    return f"{head} + uncommitted changes in src/" if dirty else head


def environment(broker_env: Mapping[str, str]) -> str:
    """One header line: machine state, versions, the broker's commit and relay path."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    return (f"{machine_state()}; Python {platform.python_version()}, "
            f"aiohttp {version('aiohttp')}, uvloop {version('uvloop')}, "
            f"jupyter_server {version('jupyter_server')}, ipykernel {version('ipykernel')}, "
            f"configurable-http-proxy {chp_version()}, @jupyterlab/services "
            f"{client_version()}; broker {broker_revision()}, relay modules loaded: "
            f"{relay_path(broker_env)}")
