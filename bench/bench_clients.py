"""The benchmark's client side: targets, the kernel protocol, and timed loops.

A :class:`Target` is one way to reach a Jupyter server's API: a base URL and
a token, plus the PIDs whose CPU time the measurement should charge to it
(``upstream``, ``kernel``, ``proxy``, ``store``). Direct, through
configurable-http-proxy and through the broker are all just targets, and
every scenario runs the same code against each.

Each scenario connects, warms up, then measures between ``CpuWindow.start``
and ``stop`` only: connection set-up is not charged to anyone. A round trip
is one request and everything that answers it (one echoed frame for the echo
upstream; the reply plus the ``status: idle`` for a real kernel). Loops stop
at their round-trip count or their deadline, whichever comes first, and
report how many they did.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench_procs import CpuWindow

V1 = "v1.kernel.websocket.jupyter.org"
#: Largest frame either side accepts (the broker allows 64 MiB too).
MAX_MESSAGE = 64 * 1024 * 1024
#: Seconds any one frame may take before a run is declared stuck.
RECEIVE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Target:
    """A base URL (``http://host:port/prefix/``, ending in ``/``) and its token."""

    name: str
    base_url: str
    token: str
    #: role -> PIDs charged to it; the client (this process) is added by the runner.
    pids: Mapping[str, Sequence[int]] = field(default_factory=dict)
    kernel_id: str = "echo"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def channels_url(self) -> str:
        ws = "ws" + self.base_url[4:] if self.base_url.startswith("http") else self.base_url
        return f"{ws}api/kernels/{self.kernel_id}/channels"


@dataclass
class Result:
    """One scenario against one target."""

    scenario: str
    target: str
    round_trips: int
    seconds: float
    #: Bytes of payload per round trip (one way), for throughput scenarios.
    payload: int
    latencies_ns: list[int]
    cpu: dict[str, float]
    #: The interleaved rounds this result adds up (empty: it is one run).
    rounds: list[Result] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.round_trips / self.seconds if self.seconds else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.rate * self.payload / (1 << 20)

    def percentile(self, q: float) -> float:
        """Latency at quantile ``q`` (nearest rank), in milliseconds."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        rank = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return ordered[rank] / 1e6

    def cpu_per_round_trip(self, role: str) -> float | None:
        """Microseconds of CPU a role spent per round trip (None: role not present)."""
        if role not in self.cpu or not self.round_trips:
            return None
        return self.cpu[role] / self.round_trips * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "target": self.target,
            "round_trips": self.round_trips,
            "seconds": self.seconds,
            "round_trips_per_s": self.rate,
            "mib_per_s": self.mib_per_s if self.payload >= 1 << 16 else None,
            "p50_ms": self.percentile(0.50),
            "p99_ms": self.percentile(0.99),
            "cpu_seconds": self.cpu,
            "rounds": [r.as_dict() for r in self.rounds],
        }


def merge(runs: Sequence[Result]) -> Result:
    """The rounds of one scenario on one target as one result: round trips, seconds and
    CPU added up, every latency kept (percentiles over all of them), the rounds kept."""
    if len(runs) == 1:
        return runs[0]
    cpu: dict[str, float] = {}
    for run in runs:
        for role, seconds in run.cpu.items():
            cpu[role] = cpu.get(role, 0.0) + seconds
    first = runs[0]
    return Result(first.scenario, first.target, sum(r.round_trips for r in runs),
                  sum(r.seconds for r in runs), first.payload,
                  [ns for r in runs for ns in r.latencies_ns], cpu, list(runs))


def rotated(items: Sequence[Any], n: int) -> list[Any]:
    """``items`` starting at its ``n``-th (cyclically): round ``n``'s order, so that over
    the rounds every target runs first, last and between, and drift hits all alike."""
    k = n % len(items) if items else 0
    return [*items[k:], *items[:k]]


def warmup_count(count: int) -> int:
    """Unmeasured round trips before ``count`` measured ones: a fifth, at most 200.

    Enough for Node's JIT (configurable-http-proxy) and both sides' buffers to
    reach their steady state, so no target is charged its start-up.
    """
    return min(200, count // 5 + 1)


def _window(target: Target) -> CpuWindow:
    return CpuWindow({"client": [os.getpid()], **target.pids})


async def connect(http: aiohttp.ClientSession, target: Target,
                  protocols: Sequence[str] = ()) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(
        target.channels_url(),
        headers=target.headers,
        protocols=tuple(protocols),
        max_msg_size=MAX_MESSAGE,
        compress=0,
        autoping=True,
    )


async def _echo(ws: aiohttp.ClientWebSocketResponse, payload: str | bytes) -> None:
    if isinstance(payload, str):
        await ws.send_str(payload)
    else:
        await ws.send_bytes(payload)
    frame = await ws.receive(timeout=RECEIVE_TIMEOUT)
    if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
        raise RuntimeError(f"the echo connection ended: {frame.type.name} {frame.data!r}")
    if len(frame.data) != len(payload):
        raise RuntimeError(f"echo returned {len(frame.data)} bytes for {len(payload)}")


def text_payload(size: int) -> str:
    """A kernel-message-shaped JSON text of exactly ``size`` bytes (>= ~120)."""
    head = {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "comm_msg"}, "channel": "shell",
            "content": {"data": ""}}
    filler = size - len(json.dumps(head))
    if filler < 0:
        raise ValueError(f"text payloads must be at least {size - filler} bytes")
    head["content"] = {"data": "x" * filler}
    text = json.dumps(head)
    assert len(text) == size
    return text


async def echo_sequential(http: aiohttp.ClientSession, target: Target, scenario: str,
                          payload: str | bytes, count: int, deadline: float,
                          protocols: Sequence[str] = ()) -> Result:
    """``count`` round trips, one after the other, on one connection."""
    ws = await connect(http, target, protocols)
    try:
        for _ in range(warmup_count(count)):
            await _echo(ws, payload)
        window = _window(target)
        latencies: list[int] = []
        clock = time.perf_counter_ns
        window.start()
        stop_at = time.perf_counter() + deadline
        for _ in range(count):
            t0 = clock()
            await _echo(ws, payload)
            latencies.append(clock() - t0)
            if time.perf_counter() > stop_at:
                break
        window.stop()
    finally:
        await ws.close()
    return Result(scenario, target.name, len(latencies), window.wall, len(payload), latencies,
                  window.spent)


async def echo_concurrent(http: aiohttp.ClientSession, target: Target, scenario: str,
                          payload: str | bytes, connections: int, per_connection: int,
                          deadline: float, protocols: Sequence[str] = ()) -> Result:
    """``connections`` sockets, each doing ``per_connection`` sequential round trips at once."""
    sockets = await asyncio.gather(*(connect(http, target, protocols)
                                     for _ in range(connections)))
    latencies: list[int] = []
    clock = time.perf_counter_ns
    try:
        async def warm(ws: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(warmup_count(per_connection)):
                await _echo(ws, payload)

        await asyncio.gather(*(warm(ws) for ws in sockets))  # every leg
        stop_at = time.perf_counter() + deadline

        async def loop(ws: aiohttp.ClientWebSocketResponse) -> None:
            for _ in range(per_connection):
                t0 = clock()
                await _echo(ws, payload)
                latencies.append(clock() - t0)
                if time.perf_counter() > stop_at:
                    break

        window = _window(target)
        window.start()
        await asyncio.gather(*(loop(ws) for ws in sockets))
        window.stop()
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return Result(scenario, target.name, len(latencies), window.wall, len(payload), latencies,
                  window.spent)


# -- the kernel protocol ------------------------------------------------------------------
def make_message(msg_type: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "bench",
                   "session": session, "version": "5.3", "date": ""},
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }


def encode_v1(msg: dict[str, Any]) -> bytes:
    """``v1.kernel.websocket.jupyter.org``: u64 count, u64 offsets, then the parts."""
    parts = [msg["channel"].encode()] + [
        json.dumps(msg[key]).encode() for key in ("header", "parent_header", "metadata", "content")
    ] + [bytes(b) for b in msg.get("buffers", [])]
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = count.to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + b"".join(parts)


def decode_v1(data: bytes) -> dict[str, Any]:
    """The header, parent header and content of a v1 frame (metadata and buffers skipped)."""
    count = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1): 8 * (i + 2)], "little") for i in range(count)]
    part = [data[offsets[i]:offsets[i + 1]] for i in range(min(count - 1, 5))]
    return {"header": json.loads(part[1]), "parent_header": json.loads(part[2]),
            "content": json.loads(part[4])}


REQUESTS: dict[str, dict[str, Any]] = {
    "kernel_info_request": {},
    "execute_request": {"code": "1", "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False},
}


def quick_acker(ws: aiohttp.ClientWebSocketResponse) -> Callable[[], None]:
    """A call that makes the client's kernel ACK what it has received at once.

    A kernel answers one request with a burst of small frames (status busy,
    reply, status idle), and jupyter_server does not set TCP_NODELAY on its
    WebSocket, so Nagle holds each frame after the first until the previous
    one is acknowledged, while Linux delays that ACK by up to 40 ms.
    TCP_QUICKACK after each read ends the wait; it does not stick, hence
    "after each read".
    """
    sock = ws.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_QUICKACK"):
        return lambda: None

    def ack() -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    return ack


def _no_ack() -> None:
    pass


async def kernel_round_trip(ws: aiohttp.ClientWebSocketResponse, msg_type: str,
                            session: str, ack: Callable[[], None] = _no_ack) -> None:
    """Send one shell request; return once its reply and its ``idle`` status arrived."""
    binary = ws.protocol == V1
    msg = make_message(msg_type, REQUESTS[msg_type], session)
    if binary:
        await ws.send_bytes(encode_v1(msg))
    else:
        await ws.send_str(json.dumps(msg))
    want = msg_type.replace("_request", "_reply")
    msg_id = msg["header"]["msg_id"]
    replied = idle = False
    while not (replied and idle):
        frame = await ws.receive(timeout=RECEIVE_TIMEOUT)
        ack()
        if frame.type is aiohttp.WSMsgType.BINARY:
            reply = decode_v1(frame.data)
        elif frame.type is aiohttp.WSMsgType.TEXT:
            reply = json.loads(frame.data)
        else:
            raise RuntimeError(f"the kernel connection ended: {frame.type.name} {frame.data!r}")
        if reply["parent_header"].get("msg_id") != msg_id:
            continue
        kind = reply["header"]["msg_type"]
        if kind == want:
            replied = True
        elif kind == "status" and reply["content"].get("execution_state") == "idle":
            idle = True


async def kernel_sequential(ws: aiohttp.ClientWebSocketResponse, target: Target, scenario: str,
                            msg_type: str, count: int, deadline: float,
                            quickack: bool = True) -> Result:
    """``count`` sequential ``msg_type`` round trips on an open kernel connection.

    With ``quickack`` the client acknowledges every read at once (see
    :func:`quick_acker`), so its own delayed ACKs do not hide the latency a
    proxy adds; without it, the client behaves like a stock Linux client.
    """
    session = uuid.uuid4().hex
    ack = quick_acker(ws) if quickack else _no_ack
    for _ in range(min(5, count)):
        await kernel_round_trip(ws, msg_type, session, ack)
    window = _window(target)
    latencies: list[int] = []
    clock = time.perf_counter_ns
    window.start()
    stop_at = time.perf_counter() + deadline
    for _ in range(count):
        t0 = clock()
        await kernel_round_trip(ws, msg_type, session, ack)
        latencies.append(clock() - t0)
        if time.perf_counter() > stop_at:
            break
    window.stop()
    return Result(scenario, target.name, len(latencies), window.wall, 0, latencies,
                  window.spent)


async def start_kernel(http: aiohttp.ClientSession, target: Target) -> str:
    """Start a python3 kernel through ``target``'s REST API; its id."""
    async with http.post(f"{target.base_url}api/kernels", json={"name": "python3"},
                         headers=target.headers,
                         timeout=aiohttp.ClientTimeout(total=60)) as resp:
        if resp.status != 201:
            raise RuntimeError(f"{target.name}: starting a kernel: {resp.status} "
                               f"{await resp.text()}")
        return str((await resp.json())["id"])


async def wait_kernel_ready(ws: aiohttp.ClientWebSocketResponse, limit: float) -> None:
    """Until the kernel answers a kernel_info_request (it may still be starting)."""
    session = uuid.uuid4().hex
    async with asyncio.timeout(limit):
        await kernel_round_trip(ws, "kernel_info_request", session)
