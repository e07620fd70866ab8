"""The official Jupyter JS client (``@jupyterlab/services`` under node) against the broker.

Real pages (thebe, jupyter-kit's executor-jupyter, JupyterLab) talk to a
session's ``base_url`` through this library, so this is the client whose
quirks matter: REST calls carry ``Authorization: token ...`` plus a
cache-busting ``?<timestamp>`` query, the kernel WebSocket carries the token
only as ``?token=`` and offers ``v1.kernel.websocket.jupyter.org``.
``tests/js/kernel_e2e.mjs`` does the driving and reports one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerHarness
from tests.kernelproto import V1

JS_DIR = Path(__file__).parent / "js"
SCRIPT = JS_DIR / "kernel_e2e.mjs"
#: The script's own limit; the test waits a little longer before killing it.
SCRIPT_TIMEOUT = 90


@dataclass
class NodeRun:
    returncode: int
    stdout: str
    stderr: str


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the JS client tests need Node 20+ (run `make test`)")
    if not (JS_DIR / "node_modules" / "@jupyterlab" / "services").is_dir():
        pytest.fail(f"{JS_DIR / 'node_modules'} is missing @jupyterlab/services: run `make test`, "
                    "which runs `npm ci` in tests/js")
    return node


async def run_client(base_url: str, ws_url: str, token: str) -> NodeRun:
    proc = await asyncio.create_subprocess_exec(
        node_binary(), str(SCRIPT), base_url, ws_url, token, str(SCRIPT_TIMEOUT),
        cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SCRIPT_TIMEOUT + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"node {SCRIPT.name} did not exit within {SCRIPT_TIMEOUT + 30}s")
    assert proc.returncode is not None
    return NodeRun(proc.returncode, out.decode(), err.decode())


def collection(path: str) -> str:
    """``api/sessions/<id>`` -> ``api/sessions``; ``api/kernelspecs`` stays."""
    parts = path.split("/")
    return "/".join(parts[:2])


async def upstream_listing(broker: BrokerHarness, session: dict[str, Any],
                           what: str) -> list[dict[str, Any]]:
    """``GET api/<what>`` through the broker with the right token."""
    async with broker.http.get(f"{session['base_url']}api/{what}",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 200, await resp.text()
        listing: list[dict[str, Any]] = await resp.json()
        return listing


async def test_jupyterlab_services_runs_code_through_broker(broker: BrokerHarness) -> None:
    session = await broker.ready_session()
    run = await run_client(session["base_url"], session["ws_url"], session["token"])
    assert run.returncode == 0, f"stdout={run.stdout!r}\nstderr={run.stderr}"
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout
    report: dict[str, Any] = json.loads(lines[0])

    assert report["stdout"] == "42\n", report
    assert report["result"] == "42", report
    assert report["errors"] == [] and report["reply_status"] == ["ok", "ok"], report
    # The client asked for `python`; the upstream Jupyter server says what it started.
    assert report["session_kernel_name"] == "python3", report
    assert report["kernel_model_name"] == "python3", report
    assert report["kernel_name"] == "python3", report
    assert "python3" in report["kernelspecs"], report
    assert report["language"] == "python", report

    wire = report["wire"]
    # REST: the token travels in the Authorization header, and every call worked.
    assert wire["rest"], wire
    for call in wire["rest"]:
        assert call["token"] == ["header"], call
        # None: a background poll of the managers still in flight when node exited.
        assert call["status"] is None or call["status"] < 400, call
    done = {(c["method"], collection(c["path"])): c["status"]
            for c in wire["rest"] if c["status"] is not None}
    assert done.get(("GET", "api/kernelspecs")) == 200, wire
    assert done.get(("POST", "api/sessions")) == 201, wire
    assert done.get(("DELETE", "api/sessions")) == 204, wire
    # WebSocket: token only in the query string, v1 offered and passed through.
    opened = [ws for ws in wire["websockets"] if ws["opened"]]
    assert len(opened) >= 1, wire
    for ws in opened:
        assert ws["path"] == f"api/kernels/{report['kernel_id']}/channels", ws
        assert ws["token"] == ["query"], ws
        assert V1 in ws["offered"], ws
    assert report["subprotocol"] == V1, report

    # The client's shutdown reached the upstream: no session and no kernel left.
    assert report["sessions_after_shutdown"] == [], report
    assert await upstream_listing(broker, session, "sessions") == []
    assert await upstream_listing(broker, session, "kernels") == []


async def test_jupyterlab_services_wrong_token_is_an_auth_error(broker: BrokerHarness) -> None:
    session = await broker.ready_session()
    run = await run_client(session["base_url"], session["ws_url"], "wrong-" + session["token"])
    assert run.returncode == 1, f"stdout={run.stdout!r}\nstderr={run.stderr}"
    assert run.stdout == ""
    # The library's own error (not the script's wire log) names the refusal.
    errors = [line for line in run.stderr.splitlines() if line.startswith("kernel_e2e: error:")]
    assert len(errors) == 1, run.stderr
    assert "ResponseError" in errors[0], run.stderr
    assert "403" in errors[0] or "401" in errors[0], run.stderr
    # Nothing reached the upstream in the visitor's name.
    assert await upstream_listing(broker, session, "sessions") == []
    assert await upstream_listing(broker, session, "kernels") == []
