"""HTTP GET round trips on the Jupyter REST surface (scenarios h1 and h64).

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams: one
pre-built ``GET`` per round trip, the response read by ``Content-Length``
(or chunked). It spends a few tens of microseconds per request where
aiohttp's client spends a few hundred, so on a 2-core machine the proxies,
not the client, set the pace. The token goes in ``Authorization: token …``
as a Jupyter client sends it. Every response must be ``200`` with the same
body length as the first, and keep the connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from urllib.parse import urlsplit

from bench_clients import RECEIVE_TIMEOUT, Result, Target, warmup_count
from bench_procs import CpuWindow


class HttpConnection:
    """One keep-alive connection that repeats one GET."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 request: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.request = request

    @classmethod
    async def open(cls, target: Target, path: str) -> HttpConnection:
        """Connect to ``target`` for ``GET <base_url><path>``."""
        url = urlsplit(target.base_url + path)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        request = (f"GET {url.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   f"Authorization: token {target.token}\r\nAccept: application/json\r\n"
                   "User-Agent: ws-bench\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, request)

    async def get(self) -> int:
        """One round trip; the body's length."""
        self.writer.write(self.request)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), RECEIVE_TIMEOUT)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        if status_line.split(" ", 2)[1:2] != ["200"]:
            raise RuntimeError(f"GET answered {status_line!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        if headers.get("connection") == "close":
            raise RuntimeError("the server closed a keep-alive connection")
        if "content-length" in headers:
            size = int(headers["content-length"])
            await self.reader.readexactly(size)
            return size
        if headers.get("transfer-encoding") == "chunked":
            return await self._chunked()
        raise RuntimeError(f"a response without length: {headers}")

    async def _chunked(self) -> int:
        size = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            chunk = int(line.split(b";")[0], 16)
            await self.reader.readexactly(chunk + 2)
            size += chunk
            if chunk == 0:
                return size

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _window(target: Target) -> CpuWindow:
    return CpuWindow({"client": [os.getpid()], **target.pids})


async def http_concurrent(target: Target, scenario: str, path: str, connections: int,
                          per_connection: int, deadline: float) -> Result:
    """``connections`` keep-alive connections at once, ``per_connection`` GETs each.

    With one connection this is sequential round trips (scenario h1).
    """
    conns = await asyncio.gather(*(HttpConnection.open(target, path)
                                   for _ in range(connections)))
    latencies: list[int] = []
    clock = time.perf_counter_ns
    try:
        async def warm(conn: HttpConnection) -> int:
            for _ in range(warmup_count(per_connection) - 1):
                await conn.get()
            return await conn.get()

        expected = (await asyncio.gather(*(warm(c) for c in conns)))[0]
        stop_at = time.perf_counter() + deadline

        async def loop(conn: HttpConnection) -> None:
            for _ in range(per_connection):
                t0 = clock()
                size = await conn.get()
                latencies.append(clock() - t0)
                if size != expected:
                    raise RuntimeError(f"GET {path}: {size} bytes, then {expected}")
                if time.perf_counter() > stop_at:
                    break

        window = _window(target)
        window.start()
        await asyncio.gather(*(loop(c) for c in conns))
        window.stop()
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return Result(scenario, target.name, len(latencies), window.wall, expected, latencies,
                  window.spent)
