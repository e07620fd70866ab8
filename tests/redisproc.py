"""A redis-server of a test's own, to kill and restart (the shared ``redis_url`` is never touched).

``RedisProcess(tmp_path, persistent=True)`` keeps an append-only file in
``tmp_path``, so a restart finds every write it acknowledged; with
``persistent=False`` a restart starts empty. The port stays the same across
restarts, so clients reconnect to the same URL. Every process is stopped by
its PID.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port


class RedisProcess:
    """One redis-server on 127.0.0.1 that a test may kill and start again."""

    def __init__(self, workdir: Path, *, persistent: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test`, which installs it")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) and return once it accepts connections (its own readiness line)."""
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.workdir), *persistence, "--daemonize", "no",
             "--loglevel", "notice"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "Ready to accept connections" in line:
                return
        pytest.fail(f"redis-server exited with {self.proc.wait()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        self.kill()
