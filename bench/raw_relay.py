"""The floor for any proxy: a TCP relay that only copies bytes (``--floor`` target).

Run as its own process (``python bench/raw_relay.py --upstream HOST:PORT``).
It binds 127.0.0.1 on a free port, prints ``port <N>`` once it accepts, and
relays every connection to the upstream byte for byte from one socket's
``data_received`` into the other's ``write`` (uvloop when installed,
``TCP_NODELAY`` on both legs, write back-pressure honoured). No HTTP
parsing, no WebSocket framing, no policy, no logging: what it costs per
round trip is what the event loop and the kernel charge a proxy in Python
for moving the bytes at all, the "raw byte relay (upper bound)" column of
the proxy speed issue. The broker does everything this does and more, so
the gap between the two is the broker's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys


class _Leg(asyncio.Protocol):
    """One side of a relayed connection; ``peer`` is the other side's leg."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self.pending = b""  # bytes that arrived before the other leg was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending += data
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Inbound(_Leg):
    """A client's connection: opens the upstream leg and pairs the two."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.target = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, out = await asyncio.get_running_loop().create_connection(_Leg, *self.target)
        except OSError:
            self.transport.close()
            return
        out.peer, self.peer = self, out
        if self.pending:
            out.transport.write(self.pending)  # type: ignore[union-attr]
            self.pending = b""
        if self.transport.is_closing():
            out.transport.close()  # type: ignore[union-attr]


async def main(upstream: str) -> None:
    host, _, port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Inbound(host, int(port)), "127.0.0.1", 0,
                                      backlog=4096)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(main(args.upstream))
    sys.exit(0)
