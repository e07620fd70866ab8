"""Schemathesis against the served OpenAPI document of a real broker.

The broker runs as ``session-broker serve`` (local backend, one ready session
whose id and token the run uses, so the session-scoped operations are
reached, not just refused). Schemathesis generates requests from the document
with a fixed seed and a bounded number of cases and checks every response:
no server error, statuses, content types, headers and bodies as documented.
/build is left out: it launches sessions through BinderHub's protocol and has
its own tests (tests/binder/).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.brokerproc import broker_process

SEED = 20261207
MAX_EXAMPLES = 6  # per operation and phase: under 200 cases in all
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,positive_data_acceptance")


async def test_the_served_openapi_document_holds(tmp_path: Path, fault_table: Any) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.fail("schemathesis is not installed: `pip install -e '.[test]'`")
    env = {"BROKER_MAX_SESSIONS_PER_OWNER": "2", "BROKER_EXECUTE_TIMEOUT_MAX": "2"}
    async with broker_process(tmp_path, env) as broker:
        async with aiohttp.ClientSession() as http, http.post(
                f"{broker.url}/api/v1/sessions", params={"wait": "true"}) as resp:
            assert resp.status == 201, await resp.text()
            session = await resp.json()
        config = tmp_path / "schemathesis.toml"
        config.write_text(f'[parameters]\n"path.sid" = "{session["id"]}"\n')
        report = tmp_path / "report.json"
        proc = await asyncio.create_subprocess_exec(
            st, "--config-file", str(config), "run", f"{broker.url}/api/v1/openapi.json",
            "--checks", CHECKS, "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES),
            "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-shrink",
            "--exclude-path-regex", "^/build", "--request-timeout", "30",
            "-H", f"Authorization: token {session['token']}",
            "--report", "json", "--report-json-path", str(report),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path)
        async with asyncio.timeout(100):
            out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        assert proc.returncode == 0, text[-6000:]
        assert broker.alive()
        cases = _cases(report, text)
        assert cases > 50, text[-3000:]  # it really ran
    fault_table.record(
        fault="schemathesis against /api/v1/openapi.json",
        injected="generated requests for every documented operation but /build (fixed seed, "
                 f"at most {MAX_EXAMPLES} examples per operation and phase), with a real "
                 "session's id and token",
        clients_saw="documented statuses, content types and bodies only; 0 server errors",
        lost="nothing")


def _cases(report: Path, text: str) -> int:
    """How many test cases the run generated (from its summary line)."""
    for line in text.splitlines():
        if "generated" in line and "Test cases" not in line:
            digits = line.strip().split()[0]
            if digits.isdigit():
                return int(digits)
    if report.exists():  # the JSON report, when the summary format changes
        data = json.loads(report.read_text())
        return int(data.get("summary", {}).get("test_cases", 0))
    return 0
