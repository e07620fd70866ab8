"""The cell a notebook page feels: ``@jupyterlab/services`` under node, per target and protocol.

Scenario d2 times ``execute_request`` with the benchmark's own aiohttp client.
A page does not run that client: JupyterLab, Notebook 7, thebe and friends use
``@jupyterlab/services`` in a browser, and what its user waits for is
``kernel.requestExecute({code}).done``, which resolves once the shell
``execute_reply`` *and* the iopub ``status: idle`` of the request are both in.
Both frames travel separately and the last one can wait on the receiver's
delayed ACK, so this is the number to watch, not d2's.

``tests/js/cell_bench.mjs`` (the tests' node project, so the same pinned
``@jupyterlab/services`` and ``ws`` the end-to-end tests run) starts its own
kernel on the target's REST API, connects ``KernelConnection``, warms up and
times ``count`` cells; one node process per (target, protocol). ``v1`` is the
client's default (binary frames of ``v1.kernel.websocket.jupyter.org``);
``json`` is the legacy JSON text protocol, selected through the client's
public ``serverSettings.WebSocket`` hook by offering no subprotocol.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_clients import Target, rotated

JS_DIR = Path(__file__).resolve().parent.parent / "tests" / "js"
SCRIPT = JS_DIR / "cell_bench.mjs"
PROTOCOLS = ("v1", "json")
#: Seconds node may take beyond the measured time (start a kernel, warm up, shut down).
NODE_SLACK = 90.0


@dataclass
class CellResult:
    """``count`` cells of ``requestExecute({code: '1'}).done`` on one target, one protocol."""

    target: str
    protocol: str
    samples_ms: list[float]
    #: The p50 of each interleaved round (node process), in run order.
    round_p50_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """Nearest-rank quantile in milliseconds, as :meth:`Result.percentile` computes it."""
        if not self.samples_ms:
            return float("nan")
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    @property
    def minimum(self) -> float:
        return min(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def maximum(self) -> float:
        return max(self.samples_ms) if self.samples_ms else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "protocol": self.protocol, "cells": len(self.samples_ms),
                "p50_ms": self.percentile(0.50), "p95_ms": self.percentile(0.95),
                "min_ms": self.minimum, "max_ms": self.maximum, "samples_ms": self.samples_ms,
                "round_p50_ms": self.round_p50_ms}


def client_version() -> str:
    """The ``@jupyterlab/services`` version node loads (the tests' pinned one)."""
    manifest = JS_DIR / "node_modules" / "@jupyterlab" / "services" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "absent"


def check_client() -> str:
    """The node binary, or why the measurement cannot run."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: the cell measurement needs Node >= 20 "
                           "(make setup-test installs the tests' node clients)")
    if client_version() == "absent":
        raise RuntimeError(f"{JS_DIR}/node_modules is missing: run `make setup-test`")
    return node


async def run_cell(node: str, target: Target, protocol: str, count: int,
                   max_seconds: float) -> CellResult:
    """One node process: its own kernel on ``target``, ``count`` timed cells."""
    timeout = max_seconds + NODE_SLACK
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), target.base_url, protocol, str(count), str(max_seconds),
        str(timeout), cwd=JS_DIR, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # In the environment, not argv: a process listing shows no token.
        env={**os.environ, "JUPYTER_TOKEN": target.token})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout + 10)
    except BaseException:
        if proc.returncode is None:
            proc.kill()  # by its own PID; the server stops the kernel it started
            await proc.wait()
        raise
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").splitlines()[-5:])
        raise RuntimeError(f"cell benchmark ({target.name}, {protocol}) exited "
                           f"{proc.returncode}:\n{tail}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    samples = [float(v) for v in report["samples_ms"]]
    if not samples or not all(math.isfinite(v) and v > 0 for v in samples):
        raise RuntimeError(f"cell benchmark ({target.name}, {protocol}) timed nothing: {report}")
    return CellResult(target.name, protocol, samples)


async def cells(targets: Sequence[Target], protocols: Sequence[str], count: int,
                max_seconds: float, rounds: int = 1) -> list[CellResult]:
    """Every target with every protocol (never two at once), in ``rounds`` interleaved
    rounds: each a node process per (target, protocol) with a share of the cells and of
    the time cap, their order rotated from round to round; a pair's rounds are joined."""
    node = check_client()
    rounds = max(1, rounds)
    pairs = [(target, protocol) for target in targets for protocol in protocols]
    runs: dict[tuple[str, str], list[CellResult]] = {(t.name, p): [] for t, p in pairs}
    for n in range(rounds):
        for target, protocol in rotated(pairs, n):
            runs[target.name, protocol].append(await run_cell(
                node, target, protocol, max(1, math.ceil(count / rounds)),
                max_seconds / rounds))
    return [CellResult(t.name, p, [ms for r in runs[t.name, p] for ms in r.samples_ms],
                       [r.percentile(0.5) for r in runs[t.name, p]]) for t, p in pairs]
