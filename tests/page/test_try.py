"""``session-broker try`` against a real broker (the CLI in its own process) and kernel."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.brokerproc import broker_process

ADMIN = "admin-secret-for-tests"


def _try(url: str, *code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", "try", "--broker-url", url, *code],
                          capture_output=True, text=True, timeout=60)


async def _live_sessions(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"{url}/api/v1/admin/sessions", headers={"Authorization": f"token {ADMIN}"}) as resp:
        return int((await resp.json())["count"])


async def test_try_shows_progress_runs_the_snippet_and_deletes_the_session(
        tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_ADMIN_TOKEN": ADMIN}) as broker:
        proc = _try(broker.url)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        sid = re.fullmatch(r"Session ([0-9a-f]+) \(local backend\)", lines[0])
        assert sid is not None, lines
        # Plain lines when stdout is not a terminal: each progress event, then the run.
        assert lines[1:] == ["[waiting] Waiting to launch",
                             "[launching] Starting a Jupyter server",
                             "[launching] Waiting for the Jupyter server to answer",
                             "[ready] Jupyter server is ready",
                             ">>> print(6*7)",
                             "42",
                             f"Session {sid.group(1)} deleted"]
        assert proc.stderr == ""
        assert await _live_sessions(broker.url) == 0

        failed = _try(broker.url, "import sys; print('to stderr', file=sys.stderr); 1/0")
        assert failed.returncode == 1
        assert "to stderr\n" in failed.stderr and "ZeroDivisionError" in failed.stderr
        assert await _live_sessions(broker.url) == 0


async def test_try_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    async with broker_process(tmp_path) as broker:
        leader, follower = pty.openpty()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "broker.cli", "try", "--broker-url", broker.url],
                stdout=follower, stderr=subprocess.PIPE, timeout=60)
            os.close(follower)
            follower = -1
            out = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the terminal's other side is closed and drained
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            os.close(leader)
            if follower >= 0:
                os.close(follower)
    assert proc.returncode == 0, proc.stderr
    text = out.decode()
    # One line rewritten in place (\r + erase line), ending full at ready.
    assert "\r\x1b[K[------------------------]   0% waiting: Waiting to launch" in text
    assert "\r\x1b[K[########################] 100% ready: Jupyter server is ready\r\n" in text
    assert "42\r\n" in text


async def test_try_prints_the_brokers_refusal(tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_DENY_NETWORKS": "127.0.0.1"}) as broker:
        proc = _try(broker.url)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == ("session-broker try: the broker refused a session: HTTP 403: "
                           "Requests from your network are not accepted by this service.\n")


def test_try_says_when_no_broker_answers() -> None:
    proc = _try("http://127.0.0.1:9")  # the discard port: nothing listens on loopback
    assert proc.returncode == 1
    assert proc.stderr.startswith("session-broker try: cannot reach http://127.0.0.1:9: ")
