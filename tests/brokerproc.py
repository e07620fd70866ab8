"""A broker run the way operators run it: ``session-broker serve`` in its own process.

The HTTP edge (connection cap, header and body timeouts, JSON parser
refusals) is wired by the CLI, so tests of it start the real command line on
a free loopback port, optionally with a lowered open-file limit, and read
its log from a file (to count lines). The process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

_LISTENING = re.compile(rb"Broker listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class BrokerProcess:
    """A running ``session-broker serve``."""

    url: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def alive(self) -> bool:
        return self.proc.returncode is None


@contextlib.asynccontextmanager
async def broker_process(tmp_path: Path, env: dict[str, str] | None = None, *,
                         nofile: int | None = None) -> AsyncIterator[BrokerProcess]:
    """Start the CLI on 127.0.0.1 (port 0), wait for its "listening" line, stop it after."""
    log = tmp_path / f"broker-{len(list(tmp_path.glob('broker-*.log')))}.log"
    full_env = {
        **os.environ,
        "BROKER_HOST": "127.0.0.1",
        "BROKER_PORT": "0",
        "BROKER_LOCAL_ROOT_DIR": str(tmp_path / "sessions"),
        "BROKER_REAP_INTERVAL": "3600",
        "BROKER_LOG_FORMAT": "json",
        **(env or {}),
    }
    if "BROKER_REDIS_URL" not in (env or {}):
        full_env.pop("BROKER_REDIS_URL", None)  # the in-memory store unless asked

    def limit_files() -> None:  # runs in the child, before exec
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker.cli", "serve", env=full_env,
            stdout=asyncio.subprocess.PIPE, stderr=err, preexec_fn=limit_files)
    assert proc.stdout is not None
    try:
        match = None
        async with asyncio.timeout(30):
            while match is None:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"the broker exited: {log.read_text()[-2000:]}")
                match = _LISTENING.search(line)
        url = match.group(1).decode()
        yield BrokerProcess(url=url, port=int(url.rsplit(":", 1)[1]), proc=proc, log=log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
