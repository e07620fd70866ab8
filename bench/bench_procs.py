"""Processes the benchmark starts, and the CPU time they spend.

Every process is started here, on loopback, in its own session (so a Ctrl-C
in the terminal reaches only the benchmark, which then stops them in order),
with its output in a log file under the run's temporary directory. Each is
stopped by its own PID: SIGTERM, a grace period, then SIGKILL.

CPU time comes from ``/proc``: the sum over a process's threads of
``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on CPU), or the clock-tick
``utime + stime`` of ``/proc/<pid>/stat`` where schedstat is missing. A
:class:`CpuWindow` reads it for every process of interest at the start and
end of a measurement, so each scenario is charged only its own work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import aiohttp

#: Seconds a process gets to stop after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any BROKER_* setting of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """One child process, its log, and how to stop it."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        """Raise, with the end of its log, if the process has exited."""
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited with code {self.popen.returncode}:\n{self.tail()}"
            )

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL: by this process's own PID only."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_GRACE)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def spawn(name: str, argv: Sequence[str], logdir: Path, *, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, stdout_pipe: bool = False) -> Proc:
    """Start ``argv``; stderr (and stdout unless piped) go to ``logdir/<name>.log``."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else out,
            stderr=out,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen, log)


async def read_line(proc: Proc, prefix: str, limit: float) -> str:
    """The first line of ``proc``'s piped stdout that starts with ``prefix``.

    The pipe is read without blocking (no helper thread that could outlive a
    timeout and hold up the event loop's shutdown).
    """
    assert proc.popen.stdout is not None
    fd = proc.popen.stdout.fileno()
    os.set_blocking(fd, False)
    buffer = b""
    deadline = time.monotonic() + limit
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            proc.check()
            raise RuntimeError(f"{proc.name} closed its output before saying {prefix!r}")
        if chunk:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if line.startswith(prefix):
                    return line
            continue
        proc.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} did not say {prefix!r} within {limit:g} s")
        await asyncio.sleep(0.02)


async def wait_http(proc: Proc, url: str, limit: float,
                    headers: Mapping[str, str] | None = None) -> None:
    """Poll ``url`` until it answers 200 (or ``proc`` dies, or ``limit`` seconds pass)."""
    deadline = time.monotonic() + limit
    delay = 0.02
    async with aiohttp.ClientSession() as http:
        while True:
            proc.check()
            try:
                async with http.get(url, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not answer {url} within {limit:g} s:\n"
                                   f"{proc.tail()}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


# -- /proc ------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    return text[text.rindex(")") + 2:].split()  # comm may contain spaces and parentheses


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a live process, in seconds."""
    total_ns = 0
    found = False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total_ns += int(fh.read().split()[0])
                found = True
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    if found:
        return total_ns / 1e9
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def child_running(pid: int, marker: str) -> int | None:
    """The child of ``pid`` whose command line contains ``marker``."""
    for child in children(pid):
        if marker in cmdline(child):
            return child
    return None


def stop_pid(pid: int, marker: str) -> None:
    """Stop a grandchild we only know by PID, if it is still what we think it is."""
    if marker not in cmdline(pid):
        return  # gone (or the PID was reused): nothing of ours to stop
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while marker in cmdline(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if marker in cmdline(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class CpuWindow:
    """CPU seconds per role (client, upstream, kernel, proxy, ...) over one measurement."""

    def __init__(self, roles: Mapping[str, Iterable[int]]) -> None:
        self.roles = {role: tuple(pids) for role, pids in roles.items()}
        self._start: dict[str, float] = {}
        self.spent: dict[str, float] = {}
        self.wall = 0.0
        self._t0 = 0.0

    def _read(self) -> dict[str, float]:
        return {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.roles.items()}

    def start(self) -> None:
        self._start = self._read()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        end = self._read()
        self.spent = {role: end[role] - self._start[role] for role in self.roles}


def python() -> str:
    """The interpreter running the benchmark (the project's venv)."""
    return sys.executable
