"""The relay's byte handling, driven directly through its protocol callbacks.

Transports here are minimal recorders (the relay only calls write, close,
pause/resume_reading, is_closing and get_extra_info); everything else — the
relay, its frame scanner and the upstream leg — is the real code.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from broker.proxy.relay import (
    FrameScanner,
    Hooks,
    Relay,
    TooBig,
    Upstream,
    UpstreamLeg,
    unmask,
)
from broker.proxy.tap import SHELL, channel_of


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol


def server_frame(payload: bytes, opcode: int = 1) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    length = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | length]) if length < 126
                                     else bytes([0x80 | 126]) + length.to_bytes(2, "big"))
    return head + mask + unmask(payload, mask, 0)


async def test_bytes_after_the_handshake_reach_the_client_before_the_relay_attached() -> None:
    leg = UpstreamLeg()
    upstream_transport = Recorder()
    leg.connection_made(upstream_transport)
    first, second = server_frame(b'{"a": 1}'), server_frame(b'{"b": 2}')
    leg.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + first)
    head, leftover = await leg.handshake()
    assert head.startswith(b"HTTP/1.1 101") and leftover == first
    leg.data_received(second)  # arrives while aiohttp answers the client's upgrade
    client = Recorder()
    relay = Relay(client, Upstream(upstream_transport, leg, None, leftover),
                  max_message=1 << 20, heartbeat=0, hooks=Hooks())
    assert bytes(client.written) == first + second
    relay.finish(1000, "done")


async def test_an_oversized_client_message_is_cut_before_it_and_closed_with_1009() -> None:
    leg = UpstreamLeg()
    upstream_transport = Recorder()
    leg.connection_made(upstream_transport)
    client = Recorder()
    relay = Relay(client, Upstream(upstream_transport, leg, None, b""), max_message=100,
                  heartbeat=0, hooks=Hooks())
    small, big = client_frame(b"x" * 50), client_frame(b"y" * 200)
    relay.from_client(small + big)
    assert bytes(upstream_transport.written).startswith(small)
    assert b"y" not in bytes(upstream_transport.written)[:len(small)]
    code, _reason = relay.done.result()
    assert code == 1009 and upstream_transport.closed
    assert client.written[:2] == b"\x88" + bytes([len(client.written) - 2])  # a close frame


def test_scanner_follows_frames_split_anywhere() -> None:
    frames = [client_frame(b'{"channel": "shell", "msg_type": "execute_request"}'),
              client_frame(b"z" * 300, opcode=2), client_frame(b"", opcode=9)]
    stream = b"".join(frames)
    for cut in range(1, len(stream)):
        scanner = FrameScanner(masked=True, max_message=1 << 20)
        events = [*scanner.scan(stream[:cut]), *scanner.scan(stream[cut:])]
        assert [e.opcode for e in events] == [1, 2]
        assert scanner.at_boundary
        ev = events[0]
        # Peeks see only the first chunk.
        assert channel_of(ev.opcode, ev.head, ev.tail) == SHELL or cut < 30
    scanner = FrameScanner(masked=True, max_message=100)
    with pytest.raises(TooBig):
        scanner.scan(frames[1])


class Charging(Hooks):
    """Records what the relay would charge to the rate limiter."""

    def __init__(self) -> None:
        self.charged: list[tuple[int, int]] = []

    def client_message(self, ev: Any) -> float:
        self.charged.append((ev.opcode, ev.length))
        return 0.0


async def test_fragmented_messages_are_charged_in_full() -> None:
    """A message split into continuation frames cannot slip past a byte limit."""
    leg = UpstreamLeg()
    upstream_transport = Recorder()
    leg.connection_made(upstream_transport)
    hooks = Charging()
    relay = Relay(Recorder(), Upstream(upstream_transport, leg, None, b""),
                  max_message=1 << 20, heartbeat=0, hooks=hooks)
    mask = os.urandom(4)

    def frame(first: int, payload: bytes) -> bytes:
        return bytes([first, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + \
            unmask(payload, mask, 0)

    parts = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    relay.from_client(frame(0x01, parts[0]) + frame(0x00, parts[1]) + frame(0x80, parts[2]))
    assert sum(length for _op, length in hooks.charged) == 3000
    assert [op for op, _length in hooks.charged] == [1, 0, 0]
    relay.finish(1000, "done")


def test_a_borrowed_socket_never_closes_its_descriptor() -> None:
    """The quick-ACK socket object shares the transport's descriptor: dropping it, even
    without a detach, must leave the connection open."""
    import gc
    import socket

    from broker.proxy.relay import BorrowedSocket

    mine, peer = socket.socketpair()
    try:
        for forget in ("collect", "close"):
            borrowed = BorrowedSocket(fileno=mine.fileno())
            borrowed.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if forget == "close":
                borrowed.close()
            del borrowed
            gc.collect()
            mine.send(b"still open")
            assert peer.recv(16) == b"still open"
    finally:
        mine.close()
        peer.close()
