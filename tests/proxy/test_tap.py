"""The compiled Tap does exactly what the Python reference does.

``broker.proxy._tap.Tap`` (C) relays whole frames itself and keeps the
tallies and reply tracking of a kernel connection; ``PyTap`` and the relay's
Python scanner are the reference. These tests feed both the same byte
streams (kernel messages in both wire formats, large frames, fragmented
messages, control frames, cut and glued at random, oversized messages, rate
limiter answers) and compare everything observable: the bytes each side
receives, the tallies, the reply-tracking state, the events and limiter
calls, quick ACKs and how the relay ends. They also check that the C path
really handles whole frames without the Python scanner.

The compiled Tap must be built for these tests (``pip install -e .`` does it
where a C compiler is); with ``BROKER_NO_EXTENSIONS=1`` they are skipped,
as the Python implementation is then the only one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

import broker.proxy.relay as relay_module
from broker.metrics import Metrics
from broker.proxy.relay import Relay, Upstream, UpstreamLeg, unmask
from broker.proxy.tap import (
    ACTIVITY,
    EXEC_END,
    EXEC_START,
    MID_REPLY,
    CTap,
    PyTap,
    channel_of,
    state_of,
)
from broker.proxy.wsbridge import KernelHooks
from tests.kernelproto import encode_v1, make_message
from tests.proxy.test_relay import Recorder

if CTap is None:
    if os.environ.get("BROKER_NO_EXTENSIONS"):
        pytest.skip("BROKER_NO_EXTENSIONS is set: the Python Tap is the only one",
                    allow_module_level=True)
    raise RuntimeError("broker.proxy._tap is not built: `pip install -e .` with a C compiler "
                       "builds it (set BROKER_NO_EXTENSIONS=1 to test without it)")


# -- frames -----------------------------------------------------------------------------


def seeded(seed: int | None) -> random.Random:
    """Reproducible test data (a seed per case), not secrets."""
    return random.Random(seed)  # noqa: S311


def frame(payload: bytes, *, opcode: int, masked: bool, fin: bool = True,
          rng: random.Random | None = None) -> bytes:
    length = len(payload)
    bit = 0x80 if masked else 0
    if length < 126:
        head = bytes([(0x80 if fin else 0) | opcode, bit | length])
    elif length < 65536:
        head = bytes([(0x80 if fin else 0) | opcode, bit | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([(0x80 if fin else 0) | opcode, bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = (rng or seeded(None)).randbytes(4)
    return head + mask + unmask(payload, mask, 0)


MSG_TYPES = ["execute_request", "kernel_info_request", "comm_msg", "status", "stream",
             "execute_reply", "kernel_info_reply", "execute_result", "complete_request"]
CHANNEL_NAMES = ["shell", "iopub", "control", "stdin", "other"]
STATES = ["busy", "idle", "starting", "restarting", "dead"]


def kernel_message(rng: random.Random, largest: int = 70000) -> tuple[bytes, int]:
    """A Jupyter message as a v1 binary or JSON text payload, sometimes far past the peek."""
    msg_type = rng.choice(MSG_TYPES)
    content: dict[str, Any] = {}
    if msg_type == "status":
        content = {"execution_state": rng.choice(STATES)}
    elif rng.random() < 0.3:
        content = {"text": "x" * rng.choice([n for n in (10, 600, 3000, 70000) if n <= largest])}
    msg = make_message(msg_type, content, channel=rng.choice(CHANNEL_NAMES))
    if rng.random() < 0.5:
        msg["parent_header"] = {"msg_id": "p" * rng.randrange(0, 700)}
    if rng.random() < 0.5:
        return encode_v1(msg), 2
    text = json.dumps(msg)
    if rng.random() < 0.3:  # "channel" first, as some clients write it
        text = json.dumps({"channel": msg["channel"], **msg})
    return text.encode(), 1


def stream_of(rng: random.Random, *, masked: bool, count: int,
              largest: int = 70000) -> list[bytes]:
    """``count`` frames, mostly whole kernel messages, some fragmented or control frames."""
    frames: list[bytes] = []
    for _ in range(count):
        roll = rng.random()
        payload, opcode = kernel_message(rng, largest)
        if roll < 0.08:  # a fragmented message: first part, continuation, final part
            a, b = sorted(rng.sample(range(1, len(payload)), 2)) if len(payload) > 3 else (1, 2)
            frames += [frame(payload[:a], opcode=opcode, masked=masked, fin=False, rng=rng),
                       frame(payload[a:b], opcode=0, masked=masked, fin=False, rng=rng),
                       frame(payload[b:], opcode=0, masked=masked, rng=rng)]
        elif roll < 0.12:
            frames.append(frame(b"", opcode=rng.choice([9, 10]), masked=masked, rng=rng))
        elif roll < 0.14:
            frames.append(frame(b"", opcode=1, masked=masked, rng=rng))
        else:
            frames.append(frame(payload, opcode=opcode, masked=masked, rng=rng))
    return frames


def chunks_of(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """The frames as a transport might deliver them: mostly one per read, some cut or glued."""
    chunks: list[bytes] = []
    pending = b""
    for data in frames:
        roll = rng.random()
        if roll < 0.7 and not pending:
            chunks.append(data)
        elif roll < 0.85:
            pending += data
            if rng.random() < 0.5:
                chunks.append(pending)
                pending = b""
        else:
            data = pending + data
            pending = b""
            cut = rng.randrange(1, len(data)) if len(data) > 1 else 1
            chunks += [data[:cut], data[cut:]]
    if pending:
        chunks.append(pending)
    return [c for c in chunks if c]


# -- two relays side by side ------------------------------------------------------------


class Recording(KernelHooks):
    """KernelHooks that also records what it is told."""

    __slots__ = ("activity", "events")

    def __init__(self, limiter: Callable[[int, float], float] | None) -> None:
        self.activity = 0
        self.events: list[int] = []
        super().__init__(Metrics("local"), self._noted, limiter=limiter)

    def _noted(self) -> None:
        self.activity += 1

    def on_event(self, flags: int) -> None:
        self.events.append(flags)
        super().on_event(flags)


class Counting(Relay):
    """A relay that counts the chunks its Python methods had to handle."""

    __slots__ = ("slow_calls",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slow_calls = 0
        super().__init__(*args, **kwargs)

    def from_client(self, data: bytes) -> None:
        self.slow_calls += 1
        super().from_client(data)

    def from_upstream(self, data: bytes) -> None:
        self.slow_calls += 1
        super().from_upstream(data)


class Side:
    """One relay with recording transports, hooks, limiter and quick ACKs."""

    def __init__(self, compiled: bool, *, max_message: int, delays: list[float] | None,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.limited: list[tuple[int, float]] = []
        self.acks = 0
        self._delays = list(delays or [])

        def limiter(size: int, messages: float) -> float:
            self.limited.append((size, messages))
            return self._delays.pop(0) if self._delays else 0.0

        def quickack() -> None:
            self.acks += 1

        quickack.sock = type("S", (), {"detach": lambda self: None})()  # type: ignore[attr-defined]
        monkeypatch.setattr(relay_module, "quickack_for", lambda transport: quickack)
        # The relay's own frames (closes) get the same mask on both sides.
        monkeypatch.setattr(relay_module, "os", SimpleNamespace(urandom=bytes))
        self.hooks = Recording(limiter if delays is not None else None)
        if not compiled:
            self.hooks.tap = PyTap()
        assert isinstance(self.hooks.tap, CTap) == compiled
        self.client = Recorder()
        self.upstream = Recorder()
        leg = UpstreamLeg()
        leg.connection_made(self.upstream)
        self.relay = Counting(self.client, Upstream(self.upstream, leg, None, b""),
                              max_message=max_message, heartbeat=0, hooks=self.hooks)
        self.client.set_protocol(self.relay.client_leg)

    def feed(self, to_kernel: bool, chunk: bytes) -> None:
        if to_kernel:
            self.client.protocol.data_received(chunk)  # type: ignore[attr-defined]
        else:
            self.upstream.protocol.data_received(chunk)  # type: ignore[attr-defined]

    def observed(self) -> dict[str, Any]:
        tap = self.hooks.tap
        return {
            "to_client": bytes(self.client.written),
            "to_upstream": bytes(self.upstream.written),
            "state": (tap.busy, tap.owed, tap.owed_idle, tap.mid_reply, tap.ticking, tap.dirty,
                      tap.ended, tap.client_active, tap.upstream_active),
            "events": list(self.hooks.events),
            "activity": self.hooks.activity,
            "limited": list(self.limited),
            "acks": self.acks,
            "paused": self.client.paused,
            "closed": (self.client.closed, self.upstream.closed),
            "done": self.relay.done.result() if self.relay.done.done() else None,
        }


def pair(monkeypatch: pytest.MonkeyPatch, *, max_message: int = 1 << 24,
         delays: list[float] | None = None) -> tuple[Side, Side]:
    return (Side(True, max_message=max_message, delays=delays, monkeypatch=monkeypatch),
            Side(False, max_message=max_message, delays=delays, monkeypatch=monkeypatch))


def interleave(rng: random.Random, count: int,
               largest: int = 70000) -> list[tuple[bool, bytes]]:
    """Client and kernel chunks in a random order (each direction in its own order)."""
    up = [(True, c)
          for c in chunks_of(rng, stream_of(rng, masked=True, count=count, largest=largest))]
    down = [(False, c)
            for c in chunks_of(rng, stream_of(rng, masked=False, count=count, largest=largest))]
    merged: list[tuple[bool, bytes]] = []
    while up or down:
        source = up if (up and (not down or rng.random() < 0.5)) else down
        merged.append(source.pop(0))
    return merged


# -- the tests --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
async def test_the_compiled_relay_does_what_the_python_one_does(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = seeded(seed)
    fast, reference = pair(monkeypatch, delays=[] if seed % 2 else None)
    for to_kernel, chunk in interleave(rng, 150):
        fast.feed(to_kernel, chunk)
        reference.feed(to_kernel, chunk)
        assert fast.observed() == reference.observed()
    fast_counts, reference_counts = fast.hooks.tap.take_counts(), reference.hooks.tap.take_counts()
    assert fast_counts == reference_counts
    assert sum(messages for _d, _c, messages, _b in fast_counts) > 200
    for side in (fast, reference):
        side.relay.finish(1000, "done")
    assert fast.observed() == reference.observed()
    # The C path took the whole frames (about half the chunks of these streams).
    assert fast.relay.slow_calls < reference.relay.slow_calls * 0.75


async def test_whole_frames_never_reach_python(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, _reference = pair(monkeypatch)
    request = json.dumps(make_message("execute_request", {"code": "1"})).encode()
    statuses = [encode_v1(make_message("status", {"execution_state": state}, channel="iopub"))
                for state in ("busy", "idle")]
    reply = encode_v1(make_message("execute_reply", {"status": "ok"}))
    sent = frame(request, opcode=1, masked=True)
    answers = [frame(payload, opcode=2, masked=False) for payload in [*statuses, reply]]
    fast.feed(True, sent)
    for answer in answers:
        fast.feed(False, answer)
    assert fast.relay.slow_calls == 0
    assert fast.upstream.written == sent and fast.client.written == b"".join(answers)
    assert fast.hooks.events == [EXEC_START | ACTIVITY, EXEC_END]  # then the timer runs
    assert fast.acks == 2  # after busy and idle (the reply was still owed); none after it
    assert fast.hooks.tap.take_counts() == [(0, 0, 1, len(request)), (1, 0, 1, len(reply)),
                                            (1, 1, 2, sum(map(len, statuses)))]
    fast.relay.finish(1000, "done")


@pytest.mark.parametrize("seed", range(4))
async def test_oversized_messages_end_both_relays_alike(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = seeded(100 + seed)
    fast, reference = pair(monkeypatch, max_message=2000)
    for to_kernel, chunk in interleave(rng, 60):
        fast.feed(to_kernel, chunk)
        reference.feed(to_kernel, chunk)
        assert fast.observed() == reference.observed()
        if fast.relay.done.done():
            break
    assert fast.relay.done.done() and fast.relay.done.result()[0] == 1009


async def test_limiter_answers_pause_or_close_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    for delays in ([0.0, 0.0, 5.0], [0.0, -1.0]):
        fast, reference = pair(monkeypatch, delays=delays)
        for _ in range(3):
            payload = json.dumps(make_message("comm_msg", {})).encode()
            chunk = frame(payload, opcode=1, masked=True)
            fast.feed(True, chunk)
            reference.feed(True, chunk)
            assert fast.observed() == reference.observed()
        assert fast.limited == [(len(payload), 1.0)] * len(delays)
        if delays[-1] > 0:
            assert fast.client.paused
        else:
            assert fast.relay.done.result()[0] == 1008
        for side in (fast, reference):
            side.relay.finish(1000, "done")


def peeks(rng: random.Random) -> tuple[int, int, bytes, bytes]:
    """Peeked bytes made to trip a scanner: tokens, stray quotes, bad v1 offset tables."""
    tokens = [b'"channel"', b'"execution_state"', b'"', b": ", b'"shell"', b'"iopub"',
              b'"control"', b'"stdin"', b'"busy"', b'"idle"', b'"dead"', b'"starting"',
              b'_request"', b'_reply"', b'"execute_request"', b'"execute_reply"', b"x", b"{",
              b" ", b"   ", b"        "]
    def text() -> bytes:
        return b"".join(rng.choice(tokens) for _ in range(rng.randrange(0, 40)))[:rng.choice(
            [64, 512, 10000])]
    opcode = rng.choice([0, 1, 2])
    head = text()
    if opcode == 2 and rng.random() < 0.7:
        start, stop = rng.randrange(0, 40), rng.randrange(0, 40)
        if rng.random() < 0.1:
            stop = 2 ** 64 - 1
        head = (rng.randrange(0, 9).to_bytes(8, "little") + start.to_bytes(8, "little")
                + stop.to_bytes(8, "little") + rng.choice([b"shell", b"iopub", b"sh"]) + head)
    return opcode, rng.randrange(0, 1 << 20), head, text() if rng.random() < 0.5 else b""


def test_the_compiled_peeks_and_bookkeeping_match_on_adversarial_bytes() -> None:
    rng = seeded(7)
    c_tap, py_tap = CTap(), PyTap()
    for i in range(20000):
        opcode, length, head, tail = peeks(rng)
        method = "client_frame" if i % 2 else "kernel_frame"
        assert getattr(c_tap, method)(opcode, length, head, tail) == \
            getattr(py_tap, method)(opcode, length, head, tail), (method, opcode, head, tail)
        assert (c_tap.busy, c_tap.owed, c_tap.owed_idle, c_tap.dirty) == \
            (py_tap.busy, py_tap.owed, py_tap.owed_idle, py_tap.dirty)
        if i % 97 == 0:
            c_tap.ticking = py_tap.ticking = not c_tap.ticking
    assert c_tap.take_counts() == py_tap.take_counts()
    assert c_tap.take_counts() == [] == py_tap.take_counts()


def test_the_compiled_peeks_match_on_adversarial_bytes() -> None:
    from broker.proxy import _tap  # type: ignore[attr-defined]

    rng = seeded(11)
    for _ in range(30000):
        opcode, _length, head, tail = peeks(rng)
        assert _tap.channel_of(opcode, head, tail) == channel_of(opcode, head, tail)
        assert _tap.state_of(head, tail) == state_of(head, tail), (head, tail)


def test_channel_and_state_peeks() -> None:
    """The reference peeks themselves, on the wire formats jupyter_server writes."""
    msg = make_message("status", {"execution_state": "busy"}, channel="iopub")
    v1 = encode_v1(msg)
    text = json.dumps(msg).encode()
    assert channel_of(2, v1[:512], v1[-64:]) == 1
    assert channel_of(1, text[:512], text[-64:] if len(text) > 512 else b"") == 1
    assert state_of(v1[:512], b"") == b"busy"
    assert state_of(b'{"execution_state": 3}', b"") is None
    for tap in (CTap(), PyTap()):
        assert tap.kernel_frame(2, len(v1), v1[:512], b"") == ACTIVITY | MID_REPLY
        assert tap.busy
