"""Idle footprint: many open kernel WebSockets through one proxy process, and its memory.

The client opens ``N`` kernel WebSockets through a proxy target to the echo
upstream (at most :data:`OPENING` handshakes in flight), leaves them idle,
and reads the proxy's resident set (``VmRSS`` in ``/proc/<pid>/status``)
before the first opens and once the last is open; the growth divided by the
connections open is the memory one proxied connection costs, i.e. one
client leg plus one upstream leg. The upstream's growth is reported too,
as a reference: it holds one WebSocket per connection where the proxy
holds two. The proxy's RSS after every connection is closed again shows how
much it keeps (Python's and V8's allocators keep freed memory for reuse).

Each client socket has a reader task, so pings are answered as a browser
would (the broker's heartbeat runs every 30 s). Opening stops at the time
limit or at the first refused handshake; the report says how many were open
and why it stopped. Every proxied connection needs
two file descriptors in the proxy, so ``N`` is lowered to what
``RLIMIT_NOFILE`` allows (see :func:`raise_nofile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from dataclasses import dataclass

import aiohttp

from bench_clients import MAX_MESSAGE, V1, Target

#: Handshakes in flight at once while opening.
OPENING = 64
#: File descriptors kept free for everything else a process has open.
FD_MARGIN = 256
#: Seconds the proxy gets to settle before each RSS reading (default).
SETTLE = 1.0


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the new soft limit.

    Children started afterwards (the proxies, the upstream) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_capacity(requested: int) -> int:
    """How many proxied connections the file-descriptor limit leaves room for."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(0, min(requested, (soft - FD_MARGIN) // 2))


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for PID {pid}")


@dataclass
class IdleResult:
    """N idle proxied kernel WebSockets on one proxy process."""

    target: str
    requested: int
    opened: int
    seconds_to_open: float
    proxy_before_kib: int
    proxy_open_kib: int
    proxy_closed_kib: int
    upstream_before_kib: int
    upstream_open_kib: int
    #: Why opening stopped early ("" when it did not).
    error: str = ""

    @property
    def proxy_per_connection_kib(self) -> float:
        return (self.proxy_open_kib - self.proxy_before_kib) / self.opened if self.opened else 0.0

    @property
    def upstream_per_connection_kib(self) -> float:
        growth = self.upstream_open_kib - self.upstream_before_kib
        return growth / self.opened if self.opened else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**self.__dict__, "proxy_per_connection_kib": self.proxy_per_connection_kib,
                "upstream_per_connection_kib": self.upstream_per_connection_kib}


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read until the connection ends, so pings get their pongs."""
    with contextlib.suppress(Exception):
        async for _msg in ws:
            pass


async def idle_footprint(target: Target, count: int, limit: float,
                         settle: float = SETTLE) -> IdleResult:
    """Open ``count`` kernel WebSockets through ``target``, measure, close them.

    ``target.pids`` must name exactly one ``proxy`` and one ``upstream`` PID.
    """
    (proxy,), (upstream,) = target.pids["proxy"], target.pids["upstream"]
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    readers: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(OPENING)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.sleep(settle)
        proxy_before, upstream_before = rss_kib(proxy), rss_kib(upstream)
        started = time.monotonic()
        stop_at = started + limit

        errors: list[str] = []

        async def open_one() -> None:
            async with gate:
                if errors or time.monotonic() > stop_at:
                    return
                try:
                    ws = await http.ws_connect(target.channels_url(), headers=target.headers,
                                               protocols=(V1,), max_msg_size=MAX_MESSAGE,
                                               compress=0, autoping=True)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")  # stop opening more
                    return
                sockets.append(ws)
                readers.append(asyncio.create_task(_drain(ws)))

        try:
            await asyncio.gather(*(open_one() for _ in range(count)))
            opened_in = time.monotonic() - started
            await asyncio.sleep(settle)
            alive = [ws for ws in sockets if not ws.closed]
            proxy_open, upstream_open = rss_kib(proxy), rss_kib(upstream)
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.sleep(settle)
        proxy_closed = rss_kib(proxy)
    return IdleResult(target.name, count, len(alive), opened_in, proxy_before, proxy_open,
                      proxy_closed, upstream_before, upstream_open,
                      errors[0] if errors else "")
