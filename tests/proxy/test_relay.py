"""The relay's byte handling, driven directly through its protocol callbacks.

Transports here are minimal recorders (the relay only calls write, close,
write_eof, pause/resume_reading, is_closing, set_protocol and
get_extra_info); everything else (the relay, its pumps and scanners, the
upstream leg) is the real code, compiled and interpreted (``wire_module``).
"""

from __future__ import annotations

import asyncio
import os
from types import ModuleType
from typing import Any

from broker.proxy._wire_py import mask
from broker.proxy.relay import ClientLeg, Hooks, Relay, UpstreamLeg
from broker.upstream.websocket import UpstreamSocket


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.eof = False
        self.paused = False

    def write(self, data: Any) -> None:
        assert not self.eof, "written after write_eof"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

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


def client_frame(payload: bytes, opcode: int = 1, *, fin: bool = True) -> bytes:
    key = os.urandom(4)
    length = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode]) + (
        bytes([0x80 | length]) if length < 126
        else bytes([0x80 | 126]) + length.to_bytes(2, "big"))
    return head + key + mask(payload, key)


def decode_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each whole frame in ``data`` (the test's own parser)."""
    frames = []
    pos = 0
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        length, at = b1 & 0x7F, pos + 2
        if length == 126:
            length, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        key = b""
        if b1 & 0x80:
            key, at = data[at:at + 4], at + 4
        payload = data[at:at + length]
        assert len(payload) == length, "a frame was cut"
        frames.append((b0 & 0x0F, mask(payload, key) if key else payload))
        pos = at + length
    assert pos == len(data)
    return frames


def make_relay(module: ModuleType, *, max_message: int = 1 << 20, hooks: Hooks | None = None,
               leftover: bytes = b"") -> tuple[Relay, Recorder, Recorder]:
    leg = UpstreamLeg()
    upstream = Recorder()
    leg.connection_made(upstream)
    client = Recorder()
    relay = Relay(client, UpstreamSocket(upstream, leg, None, leftover), max_message=max_message,
                  heartbeat=0, hooks=hooks or Hooks(), module=module)
    return relay, client, upstream


async def test_bytes_after_the_handshake_reach_the_client_before_the_relay_attached(
        wire_module: ModuleType) -> None:
    leg = UpstreamLeg()
    upstream_transport = Recorder()
    leg.connection_made(upstream_transport)
    first, second = server_frame(b'{"a": 1}'), server_frame(b'{"b": 2}')
    leg.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + first)
    head, leftover = await leg.handshake()
    assert head.startswith(b"HTTP/1.1 101") and leftover == first
    leg.data_received(second)  # arrives while the client's upgrade is answered
    client = Recorder()
    client_leg = ClientLeg()
    client_leg.connection_made(client)
    early = client_frame(b'{"c": 3}')
    client_leg.data_received(early)  # the client's first frame, before the relay attached
    relay = Relay(client, UpstreamSocket(upstream_transport, leg, None, leftover),
                  max_message=1 << 20, heartbeat=0, hooks=Hooks(), client_leg=client_leg,
                  module=wire_module)
    assert bytes(client.written) == first + second
    assert bytes(upstream_transport.written) == early
    relay.finish(1000, "done")


async def test_an_oversized_client_message_is_cut_before_it_and_closed_with_1009(
        wire_module: ModuleType) -> None:
    relay, client, upstream = make_relay(wire_module, max_message=100)
    small, big = client_frame(b"x" * 50), client_frame(b"y" * 200)
    client.protocol.data_received(small + big)  # type: ignore[attr-defined]
    # What the kernel got, decoded: the small message, then the relay's close; not a byte
    # of the big one.
    sent = decode_frames(bytes(upstream.written))
    assert sent[0] == (1, b"x" * 50)
    assert [opcode for opcode, _ in sent[1:]] == [8]
    assert int.from_bytes(sent[1][1][:2], "big") == 1009
    code, _reason = relay.done.result()
    assert code == 1009 and upstream.closed
    # The client gets its close frame, then a FIN, and is read (and dropped) for a while
    # instead of being reset.
    answer = decode_frames(bytes(client.written))
    assert answer[0][0] == 8 and int.from_bytes(answer[0][1][:2], "big") == 1009
    assert client.eof and not client.closed
    client.protocol.data_received(b"z" * 1000)  # type: ignore[attr-defined]
    assert decode_frames(bytes(upstream.written)) == sent


def lost_upstream(module: ModuleType, why_lost: Any) -> tuple[Relay, Recorder]:
    """A relay whose upstream then vanishes without a close frame (a stopped server)."""
    leg = UpstreamLeg()
    upstream = Recorder()
    leg.connection_made(upstream)
    client = Recorder()
    relay = Relay(client, UpstreamSocket(upstream, leg, None, b""), max_message=1 << 20,
                  heartbeat=0, hooks=Hooks(), module=module, why_lost=why_lost)
    leg.connection_lost(ConnectionResetError())
    return relay, client


def client_close(client: Recorder) -> tuple[int, str]:
    ((opcode, payload),) = decode_frames(bytes(client.written))
    assert opcode == 8 and client.closed
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


async def test_a_lost_upstream_whose_session_ended_closes_the_client_with_1000_and_why(
        wire_module: ModuleType) -> None:
    asked = asyncio.Event()

    async def why_lost() -> str | None:
        asked.set()
        return "max_age"

    relay, client = lost_upstream(wire_module, why_lost)
    assert not relay.done.done() and client.paused  # nothing reaches a gone kernel meanwhile
    assert await relay.done == (1000, "session ended: max_age")
    assert asked.is_set() and client_close(client) == (1000, "session ended: max_age")


async def test_a_lost_upstream_of_a_live_or_unknown_session_closes_with_1011(
        wire_module: ModuleType) -> None:
    async def live() -> str | None:
        return None

    async def store_down() -> str | None:
        raise ConnectionError("the store is unreachable too")

    for why_lost in (live, store_down):
        relay, client = lost_upstream(wire_module, why_lost)
        assert await relay.done == (1011, "kernel connection lost")
        assert client_close(client) == (1011, "kernel connection lost")


async def test_a_client_leaving_while_the_loss_is_explained_ends_the_relay_once(
        wire_module: ModuleType) -> None:
    never = asyncio.Event()

    async def slow() -> str | None:
        await never.wait()  # a store that does not answer; the client leaves first
        return "deleted"

    relay, client = lost_upstream(wire_module, slow)
    client.protocol.connection_lost(None)  # type: ignore[attr-defined]
    assert await relay.done == (1001, "client closed")
    explaining = relay._explaining
    assert explaining is not None
    await asyncio.gather(explaining, return_exceptions=True)
    assert explaining.cancelled()


class Charging(Hooks):
    """Records what the relay charges to the rate limiter."""

    def __init__(self) -> None:
        self.charged: list[tuple[int, float]] = []
        self.limiter = self

    def take(self, size: int, messages: float = 1.0) -> float:
        self.charged.append((size, messages))
        return 0.0


async def test_fragmented_messages_are_charged_in_full(wire_module: ModuleType) -> None:
    """A message split into continuation frames cannot slip past a byte limit."""
    hooks = Charging()
    relay, client, _upstream = make_relay(wire_module, hooks=hooks)
    key = os.urandom(4)

    def frame(first: int, payload: bytes) -> bytes:
        return bytes([first, 0x80 | 126]) + len(payload).to_bytes(2, "big") + key + \
            mask(payload, key)

    parts = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    client.protocol.data_received(  # type: ignore[attr-defined]
        frame(0x01, parts[0]) + frame(0x00, parts[1]) + frame(0x80, parts[2]))
    assert hooks.charged == [(1000, 1.0), (1000, 0.0), (1000, 0.0)]
    assert not relay.done.done()
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
