"""The relay engine: a C thread relays steady-state traffic; everything else stays exact.

Each test relays over real sockets (a socket pair per leg, the far ends held
by the test) through a relay with the compiled Tap and the engine, and checks
what arrives at the far ends against the Python reference relay fed the same
chunks, or against what the relay must do: heartbeats and closes written by
the loop in between engine-relayed frames, the end of a stream, a peer that
stops reading. ``tests/proxy/test_tap.py`` holds the per-frame logic to the
reference; this module is about who reads the sockets when.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import pytest

from broker.policy.wsrate import WsLimits
from broker.proxy.relay import Relay, Upstream, UpstreamLeg
from broker.proxy.tap import ACTIVITY, EXEC_END, EXEC_START, CTap, PyTap, engine_for
from tests.kernelproto import encode_v1, make_message
from tests.proxy.test_relay import Recorder
from tests.proxy.test_tap import Counting, Recording, frame, interleave, seeded


def bits(events: list[int]) -> dict[int, int]:
    """How many of each event the hooks heard (the engine reports them one by one)."""
    return {bit: sum(1 for flags in events if flags & bit)
            for bit in (EXEC_START, EXEC_END, ACTIVITY)}

if CTap is None or not hasattr(CTap, "give"):
    if os.environ.get("BROKER_NO_EXTENSIONS") or not hasattr(socket, "TCP_QUICKACK"):
        pytest.skip("no engine here (BROKER_NO_EXTENSIONS, or not Linux)",
                    allow_module_level=True)
    raise RuntimeError("broker.proxy._tap is not built with its engine")


class Watched(Counting):
    """A relay that counts what the engine handed back and what Python had to scan."""

    __slots__ = ("handbacks",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handbacks = 0
        super().__init__(*args, **kwargs)

    def _from_engine(self, pending: tuple[Any, ...]) -> None:
        self.handbacks += pending[3] != 0
        super()._from_engine(pending)


class Wired:
    """A relay between two socket pairs; the test holds ``client`` and ``kernel``."""

    relay: Watched
    hooks: Recording
    client: socket.socket
    kernel: socket.socket

    @classmethod
    async def open(cls, *, heartbeat: float = 0, max_message: int = 1 << 24,
                   limiter: Any = None) -> Wired:
        loop = asyncio.get_running_loop()
        assert engine_for(loop)
        self = cls()
        relay_client, self.client = socket.socketpair()
        relay_upstream, self.kernel = socket.socketpair()
        for sock in (self.client, self.kernel):
            sock.setblocking(False)
        client_transport, _ = await loop.connect_accepted_socket(asyncio.Protocol,
                                                                 relay_client)
        upstream_transport, leg = await loop.connect_accepted_socket(UpstreamLeg, relay_upstream)
        self.hooks = Recording(limiter)
        self.relay = Watched(client_transport, Upstream(upstream_transport, leg, None, b""),
                             max_message=max_message, heartbeat=heartbeat, hooks=self.hooks)
        client_transport.set_protocol(self.relay.client_leg)
        await asyncio.sleep(0)
        assert self.relay._engine_owned  # the engine has it from the loop's next turn
        return self

    async def read(self, sock: socket.socket, size: int, timeout: float = 10) -> bytes:
        """Exactly ``size`` bytes from ``sock`` (one of the far ends)."""
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(timeout):
            while len(data) < size:
                more = await loop.sock_recv(sock, size - len(data))
                assert more, f"end of stream after {len(data)} of {size} bytes"
                data += more
        return data

    async def send(self, to_kernel: bool, chunk: bytes) -> bytes:
        """Send a chunk from one far end; what the other far end receives of it."""
        loop = asyncio.get_running_loop()
        sending = loop.sock_sendall(self.client if to_kernel else self.kernel, chunk)
        _, received = await asyncio.gather(
            sending, self.read(self.kernel if to_kernel else self.client, len(chunk)))
        return received

    def close(self) -> None:
        self.relay.finish(1000, "done")
        self.client.close()
        self.kernel.close()


async def test_whole_frames_go_through_the_engine_alone() -> None:
    wired = await Wired.open()
    payload = json.dumps(make_message("execute_request", {"code": "1"})).encode()
    request = frame(payload, opcode=1, masked=True)
    replies = [frame(encode_v1(make_message("status", {"execution_state": state},
                                            channel="iopub")), opcode=2, masked=False)
               for state in ("busy", "idle")]
    replies.append(frame(encode_v1(make_message("execute_reply", {"status": "ok"})),
                         opcode=2, masked=False))
    for _ in range(50):
        assert await wired.send(True, request) == request
        for reply in replies:
            assert await wired.send(False, reply) == reply
    assert wired.relay.slow_calls == 0 and wired.relay.handbacks == 0
    assert wired.relay._engine_owned
    # What the engine queued (execution timing, activity) reached the hooks.
    await asyncio.sleep(0)  # the loop's turn to drain the engine's last queue
    wired.relay._take()
    assert bits(wired.hooks.events) == {EXEC_START: 50, EXEC_END: 50, ACTIVITY: 1}
    counts = {(d, c): (m, b) for d, c, m, b in wired.hooks.tap.take_counts()}
    assert counts[(0, 0)] == (50, 50 * len(payload))  # to_kernel, shell
    assert counts[(1, 1)][0] == 100 and counts[(1, 0)][0] == 50  # iopub, shell replies
    wired.close()


@pytest.mark.parametrize("seed", range(16))
async def test_the_engine_relays_what_the_python_relay_relays(seed: int) -> None:
    """Random kernel streams, cut and glued, with fragments and control frames: the far
    ends get the same bytes, and the tallies, reply state and events are the reference's."""
    rng = seeded(seed)
    wired = await Wired.open()
    leg = UpstreamLeg()
    upstream = Recorder()
    leg.connection_made(upstream)
    hooks = Recording(None)
    hooks.tap = PyTap()
    reference = Relay(Recorder(), Upstream(upstream, leg, None, b""), max_message=1 << 24,
                      heartbeat=0, hooks=hooks)
    # Messages of a few KiB at most: a socket delivers each chunk in one read, so the
    # engine peeks what the reference peeks. (What a frame longer than a read gets is
    # the other tests' business; where a read ends is the kernel's choice.)
    for to_kernel, chunk in interleave(rng, 80, largest=3000):
        assert await wired.send(to_kernel, chunk) == chunk
        (reference.from_client if to_kernel else reference.from_upstream)(chunk)
    await asyncio.sleep(0)
    wired.relay._take()
    tap, ref = wired.hooks.tap, hooks.tap
    assert (tap.busy, tap.owed, tap.owed_idle, tap.ticking, tap.dirty) == \
        (ref.busy, ref.owed, ref.owed_idle, ref.ticking, ref.dirty)
    assert tap.take_counts() == ref.take_counts()
    assert bits(wired.hooks.events) == bits(hooks.events)
    assert wired.relay.handbacks > 0  # fragments and control frames went to Python
    wired.close()
    reference.finish(1000, "done")


async def test_heartbeats_are_written_between_engine_frames() -> None:
    wired = await Wired.open(heartbeat=0.05)
    ping = await wired.read(wired.client, 2)
    assert ping == b"\x89\x00"  # written by the loop, which took the connection back
    async with asyncio.timeout(5):
        while not wired.relay._engine_owned:  # and gave it back to the engine
            await asyncio.sleep(0.01)
    # Frames still go through, between the pings the kernel side gets too.
    request = frame(b'{"channel": "shell"}', opcode=1, masked=True)
    await asyncio.get_running_loop().sock_sendall(wired.client, request)
    seen = b""
    async with asyncio.timeout(5):
        while request not in seen:
            seen += await asyncio.get_running_loop().sock_recv(wired.kernel, 4096)
    wired.close()


async def test_a_session_end_closes_an_engine_connection_with_its_code() -> None:
    wired = await Wired.open()
    request = frame(b'{"channel": "shell"}', opcode=1, masked=True)
    assert await wired.send(True, request) == request
    wired.relay.finish(1000, "session ended")
    close = await wired.read(wired.client, 2 + 2 + len("session ended"))
    assert close[:4] == b"\x88\x0f\x03\xe8"  # close, 15 bytes, code 1000
    assert await asyncio.get_running_loop().sock_recv(wired.client, 10) == b""  # then EOF
    assert wired.relay.done.result() == (1000, "session ended")
    wired.client.close()
    wired.kernel.close()


async def test_a_client_that_goes_away_ends_the_relay() -> None:
    wired = await Wired.open()
    wired.client.close()
    async with asyncio.timeout(10):
        code, _reason = await wired.relay.done
    assert code == 1001
    assert await asyncio.get_running_loop().sock_recv(wired.kernel, 64)  # a close frame
    wired.kernel.close()


async def test_a_peer_that_stops_reading_loses_nothing() -> None:
    """The engine cannot write all it read: it keeps the rest (one read at most) and
    stops reading the other side until the peer takes it."""
    wired = await Wired.open()
    loop = asyncio.get_running_loop()
    frames = [frame(bytes([i]) * 60000, opcode=2, masked=True) for i in range(40)]
    sent = b"".join(frames)
    sending = asyncio.ensure_future(loop.sock_sendall(wired.client, sent))
    await asyncio.sleep(0.2)  # nobody reads the kernel side: buffers fill up
    assert not sending.done()
    assert await wired.read(wired.kernel, len(sent)) == sent
    await sending
    assert wired.relay.handbacks == 0 and wired.relay._engine_owned
    wired.close()


async def test_the_loop_takes_back_what_a_full_peer_did_not_take() -> None:
    """A heartbeat while the engine holds bytes for a peer that stopped reading: they
    are written first, by the loop's transport, then the ping."""
    wired = await Wired.open(heartbeat=0.05)
    loop = asyncio.get_running_loop()
    frames = [frame(bytes([i]) * 60000, opcode=2, masked=True) for i in range(40)]
    sent = b"".join(frames)
    sending = asyncio.ensure_future(loop.sock_sendall(wired.client, sent))
    await asyncio.sleep(0.3)  # beats pass while the kernel side reads nothing
    data, _pings = await data_frames(wired, len(sent))
    await sending
    assert data == sent  # every frame whole and in order: pings only between frames
    assert await wired.read(wired.client, 2) == b"\x89\x00"  # the beats went on
    wired.close()


async def data_frames(wired: Wired, size: int) -> tuple[bytes, int]:
    """Frames from the kernel side until ``size`` bytes of data frames came: their bytes
    (headers included) and how many pings came between them."""
    buffer, data, pings = b"", b"", 0
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        while len(data) < size:
            buffer += await loop.sock_recv(wired.kernel, 1 << 16)
            while len(buffer) >= 2:
                length, at = buffer[1] & 0x7F, 2
                if length == 126:
                    length, at = int.from_bytes(buffer[2:4], "big"), 4
                end = at + 4 + length  # masked: the client's frames
                if len(buffer) < end:
                    break
                if buffer[0] == 0x89:
                    pings += 1
                else:
                    data += buffer[:end]
                buffer = buffer[end:]
    return data, pings


async def test_frames_longer_than_a_read_stay_in_the_engine() -> None:
    wired = await Wired.open()
    frames = [frame(bytes([i]) * (1 << 20), opcode=2, masked=False) for i in range(4)]
    for data in frames:
        assert await wired.send(False, data) == data
    assert wired.relay.handbacks == 0 and wired.relay.slow_calls == 0
    wired.relay._take()
    assert wired.hooks.tap.take_counts() == [(1, 4, 4, 4 << 20)]  # to_client, other
    wired.close()


async def test_a_heartbeat_in_the_middle_of_a_long_frame_waits_for_its_end() -> None:
    """The loop takes the connection back while the engine is inside a frame: its scanner
    continues that frame, so the ping goes after it, never into it."""
    wired = await Wired.open(heartbeat=0.05)
    data = frame(b"z" * (1 << 20), opcode=2, masked=True)
    assert await wired.send(True, data[:300000]) == data[:300000]
    assert await wired.read(wired.client, 2) == b"\x89\x00"  # a beat passed meanwhile
    assert await wired.send(True, data[300000:]) == data[300000:]
    ping = await wired.read(wired.kernel, 6)  # the kernel side's ping comes after it
    assert ping[:2] == b"\x89\x80"
    wired.close()


async def test_the_engine_charges_the_rate_limit_and_leaves_throttling_to_the_loop() -> None:
    """Within the buckets the engine charges the client's messages itself; the message that
    would be throttled goes to the loop's limiter, which pauses reading as always."""
    throttled = []
    limiter = WsLimits(messages_per_second=200, message_burst=20).new(
        on_throttle=lambda: throttled.append(1))
    wired = await Wired.open(limiter=limiter.take)
    loop = asyncio.get_running_loop()
    message = frame(b'{"channel": "shell"}', opcode=1, masked=True)
    started = loop.time()
    for _ in range(60):  # one at a time: each a whole read, as the engine likes them
        assert await wired.send(True, message) == message
    elapsed = loop.time() - started
    assert elapsed >= (60 - 20 - 1) / 200  # the bucket's refill rate bounds it from below
    assert throttled  # the loop's limiter did the throttling
    assert wired.relay.handbacks >= len(throttled)
    assert wired.relay.slow_calls < 60  # and the engine relayed the rest
    wired.close()


async def test_activity_from_several_frames_of_one_read_is_noted_as_the_loop_notes_it() -> None:
    """The first frame's activity is written at once and starts the flush timer; the
    second, in the same read, is left for the timer (dirty), as the loop does it."""
    wired = await Wired.open()
    status = encode_v1(make_message("status", {"execution_state": "idle"}, channel="iopub"))
    two = frame(status, opcode=2, masked=False) * 2
    assert await wired.send(False, two) == two
    await asyncio.sleep(0)
    wired.relay._take()
    assert wired.hooks.activity == 1
    assert wired.hooks.tap.ticking and wired.hooks.tap.dirty
    wired.close()
