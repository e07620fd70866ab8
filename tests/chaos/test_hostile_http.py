"""Hostile HTTP traffic against a real ``session-broker serve`` on loopback.

Slowloris at the open-file limit, a declared 10 GB body that never comes, a
body that stalls, and asyncio's accept-error flood at a real EMFILE. Every
wait has a deadline; every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.brokerproc import broker_process
from tests.test_edge import READ_BOUND, exchange, parse

#: Slow connections opened against a broker with NOFILE open files.
SLOW = 300
NOFILE = 256


async def _answer(reader: asyncio.StreamReader) -> str:
    """What one connection ended with: a JSON error's reason, or "closed" without one."""
    try:
        async with asyncio.timeout(READ_BOUND):
            raw = await reader.read()
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    if not raw:
        return "closed"
    status, _, body = parse(raw)
    return f"{status} {json.loads(body)['reason']}"


async def _health(port: int) -> int:
    try:
        raw = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    except (ConnectionResetError, BrokenPipeError):
        return 0
    return parse(raw)[0] if raw else 0


async def test_slowloris_at_the_file_limit(tmp_path: Path, fault_table: Any) -> None:
    env = {"BROKER_HEADER_TIMEOUT": "3"}
    async with broker_process(tmp_path, env, nofile=NOFILE) as broker:
        started_lines = len(broker.log_lines())
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(SLOW):
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
            slow.append((reader, writer))
        try:
            # While they hold the broker, a normal client is refused cleanly or served.
            during = await _health(broker.port)
            assert during in (200, 503, 0), during
            answers = await asyncio.gather(*(_answer(reader) for reader, _ in slow))
        finally:
            for _, writer in slow:
                writer.close()
        seen = set(answers)
        # Within the cap: cut after the header timeout with a 408. Beyond it: a 503
        # before anything was read, or (past the refusals in flight) a plain close.
        assert "408 header_timeout" in seen, seen
        assert seen & {"503 too_many_connections", "closed"}, seen
        assert seen <= {"408 header_timeout", "503 too_many_connections", "closed"}, seen
        # Once they are cut, normal clients are served again (poll with a deadline).
        deadline = asyncio.get_running_loop().time() + READ_BOUND
        status = await _health(broker.port)
        while status != 200 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            status = await _health(broker.port)
        assert status == 200
        assert broker.alive()
        logged = broker.log_lines()[started_lines:]
        # Hundreds of refused and cut connections: a handful of log lines at most
        # (the access lines of the health checks above), no accept-error flood.
        assert len(logged) < 60, logged[-20:]
        assert not [line for line in logged if "out of system resource" in line]
    fault_table.record(
        fault="slowloris at the open-file limit",
        injected=f"{SLOW} connections sending partial headers to a broker limited to "
                 f"{NOFILE} open files",
        clients_saw="within the connection cap: 408 header_timeout after BROKER_HEADER_TIMEOUT; "
                    "beyond it: 503 too_many_connections (Retry-After) or a plain close; "
                    "normal clients: 200 once the slow ones were cut",
        lost="nothing: the broker stayed up, no accept-error flood in its log")


async def test_a_body_that_never_comes(tmp_path: Path, fault_table: Any) -> None:
    env = {"BROKER_BODY_TIMEOUT": "2"}
    async with broker_process(tmp_path, env) as broker:
        # Declared beyond the route's limit: refused before any of it is awaited.
        too_big = parse(await exchange(
            broker.port, b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 10000000000\r\n\r\n0123456789", one_response=True))
        assert (too_big[0], json.loads(too_big[2])["reason"]) == (413, "too_large")
        # Declared within it, ten bytes sent, then silence: dropped after the body timeout
        # (READ_BOUND bounds the wait; the broker must close first).
        stalled = await exchange(broker.port, b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 100000\r\n\r\n0123456789")
        assert stalled == b""
        assert await _health(broker.port) == 200
        errors = [line for line in broker.log_lines() if '"level": "error"' in line]
        assert errors == []
    fault_table.record(
        fault="request body that never arrives",
        injected="Content-Length: 10000000000 with 10 bytes sent; Content-Length: 100000 "
                 "with 10 bytes sent, then silence",
        clients_saw="413 too_large at once; the stalled one closed after BROKER_BODY_TIMEOUT "
                    "(access log 499, no error logged)",
        lost="nothing")


_EMFILE_SERVER = textwrap.dedent("""
    import asyncio, os, resource, sys
    from broker.edge import AcceptErrorLog

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if sys.argv[1] == "throttled":
            loop.set_exception_handler(AcceptErrorLog())
        accepted = []
        class Counting(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.append(transport)
        server = await loop.create_server(Counting, "127.0.0.1", 0)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        while True:  # use up every descriptor left
            try:
                held.append(open(os.devnull))
            except OSError:
                break
        print(server.sockets[0].getsockname()[1], flush=True)
        await stdin.readline()  # the clients are connected
        await asyncio.sleep(2.5)  # accept fails (and is retried) at the limit
        for handle in held:
            handle.close()
        for _ in range(100):  # descriptors are back: the pending clients get in
            if len(accepted) >= int(sys.argv[2]):
                break
            await asyncio.sleep(0.1)
        print("accepted", len(accepted), flush=True)

    asyncio.run(main())
""")


async def _emfile_run(mode: str, clients: int, log: Path) -> tuple[list[str], int]:
    """(stderr lines, connections finally accepted) of the EMFILE server in ``mode``.

    Its stderr goes to a file: a flood into a pipe nobody reads would block it.
    """
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _EMFILE_SERVER, mode, str(clients),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdin and proc.stdout
    writers = []
    try:
        async with asyncio.timeout(40):
            port = int(await proc.stdout.readline())
            for _ in range(clients):  # completed by the kernel's listen backlog
                writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
            await proc.wait()
    finally:
        for writer in writers:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = log.read_text(errors="replace").splitlines()
    assert line.startswith(b"accepted "), lines[-20:]
    return lines, int(line.split()[1])


async def test_accept_errors_at_the_file_limit_are_logged_at_a_bounded_rate(
    tmp_path: Path, fault_table: Any
) -> None:
    clients = 30
    flood, _ = await _emfile_run("default", clients, tmp_path / "default.log")
    throttled, accepted = await _emfile_run("throttled", clients, tmp_path / "throttled.log")
    # asyncio's own handler: a line (and a traceback) per failed accept, per retry.
    assert sum("out of system resource" in line for line in flood) >= clients
    # The broker's: one line for the whole episode, and the server recovers.
    reports = [line for line in throttled if "cannot accept connections" in line]
    assert len(reports) == 1, throttled[:10]
    assert not [line for line in throttled if "out of system resource" in line]
    assert accepted == clients
    fault_table.record(
        fault="accept() at the open-file limit (EMFILE)",
        injected=f"{clients} connections while every descriptor is in use, then "
                 "descriptors freed",
        clients_saw="they waited in the listen backlog and were all accepted once "
                    "descriptors were free",
        lost="nothing; one log line per 10 s instead of one per failed accept")
