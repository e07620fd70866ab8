"""The compiled relay module does exactly what the interpreted one does.

``broker.proxy._wire_c`` is ``_wire_py.py`` compiled by Cython. These tests
feed both the same byte streams (kernel messages in both wire formats,
large frames, fragmented messages, control frames, cut and glued at random,
oversized messages, frames a server must refuse, random garbage, rate
limiter answers) through a real :class:`~broker.proxy.relay.Relay` each and
compare everything observable: the bytes each side receives, the tallies,
the reply-tracking state, the events and limiter calls, quick ACKs and how
the relay ends. They also check the frame scanner itself on both.
"""

from __future__ import annotations

import json
import random
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

import broker.proxy.relay as relay_module
from broker.metrics import Metrics
from broker.proxy import wire
from broker.proxy._wire_py import ACTIVITY, EXEC_END, EXEC_START, MID_REPLY, SHELL, mask
from broker.proxy.relay import Relay, UpstreamLeg
from broker.proxy.wsbridge import KernelHooks
from broker.upstream.websocket import UpstreamSocket
from tests.kernelproto import encode_v1, make_message
from tests.proxy.test_relay import Recorder

COMPILED = wire.COMPILED
PYTHON = wire.PYTHON
if COMPILED is None:
    pytest.skip("the compiled module is not built (tests/proxy/conftest.py says when that "
                "is an error)", allow_module_level=True)


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
    key = (rng or seeded(None)).randbytes(4)
    return head + key + mask(payload, key)


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

    def __init__(self, limiter: Any, module: ModuleType) -> None:
        self.activity = 0
        self.events: list[int] = []
        super().__init__(Metrics("local"), self._noted, limiter=limiter, module=module)

    def _noted(self) -> None:
        self.activity += 1

    def on_event(self, flags: int) -> None:
        self.events.append(flags)
        super().on_event(flags)


class Side:
    """One relay with recording transports, hooks, limiter and quick ACKs."""

    def __init__(self, compiled: bool, *, max_message: int, delays: list[float] | None,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.limited: list[tuple[int, float]] = []
        self.acks = 0
        self._delays = list(delays or [])

        side = self

        class Limiter:
            def take(self, size: int, messages: float = 1.0) -> float:
                side.limited.append((size, messages))
                return side._delays.pop(0) if side._delays else 0.0

        def quickack() -> None:
            self.acks += 1

        quickack.sock = type("S", (), {"detach": lambda self: None})()  # type: ignore[attr-defined]
        monkeypatch.setattr(relay_module, "quickack_for", lambda transport: quickack)
        module = COMPILED if compiled else PYTHON
        # The relay's own frames (closes) get the same mask on both sides.
        monkeypatch.setattr(module, "os", SimpleNamespace(urandom=bytes))
        self.hooks = Recording(Limiter() if delays is not None else None, module)
        assert type(self.hooks.tap).__module__ == module.__name__
        self.client = Recorder()
        self.upstream = Recorder()
        leg = UpstreamLeg()
        leg.connection_made(self.upstream)
        self.relay = Relay(self.client, UpstreamSocket(self.upstream, leg, None, b""),
                           max_message=max_message, heartbeat=0, hooks=self.hooks, module=module)

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
            "state": (tap.busy, tap.owed, tap.owed_idle, list(tap.awaiting), tap.mid_reply,
                      tap.ticking, tap.dirty, tap.ended, tap.client_active, tap.upstream_active),
            "events": list(self.hooks.events),
            "activity": self.hooks.activity,
            "limited": list(self.limited),
            "acks": self.acks,
            "paused": self.client.paused,
            "closed": (self.client.closed, self.client.eof, self.upstream.closed),
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
    assert not fast.relay.done.done()  # every frame of these streams is a valid one
    fast_counts, reference_counts = fast.hooks.tap.take_counts(), reference.hooks.tap.take_counts()
    assert fast_counts == reference_counts
    assert sum(messages for _d, _c, messages, _b in fast_counts) > 200
    for side in (fast, reference):
        side.relay.finish(1000, "done")
    assert fast.observed() == reference.observed()


async def test_one_execution_through_both(monkeypatch: pytest.MonkeyPatch) -> None:
    for side in pair(monkeypatch):
        request = make_message("execute_request", {"code": "1"})
        payload = json.dumps(request).encode()
        statuses = [encode_v1(_child(request, "status", {"execution_state": state}))
                    for state in ("busy", "idle")]
        reply = encode_v1(_child(request, "execute_reply", {"status": "ok"}, "shell"))
        sent = frame(payload, opcode=1, masked=True)
        answers = [frame(p, opcode=2, masked=False) for p in [statuses[0], reply, statuses[1]]]
        side.feed(True, sent)
        for answer in answers:
            side.feed(False, answer)
        assert side.upstream.written == sent and side.client.written == b"".join(answers)
        assert side.hooks.events == [EXEC_START | ACTIVITY, EXEC_END]  # then the timer runs
        # Quick ACKs after busy and after the reply (the idle was still owed); none after it.
        assert side.acks == 2
        assert side.hooks.tap.take_counts() == [
            (0, 0, 1, len(payload)), (1, 0, 1, len(reply)),
            (1, 1, 2, sum(map(len, statuses)))]
        side.relay.finish(1000, "done")


def _child(parent: dict[str, Any], msg_type: str, content: dict[str, Any],
           channel: str = "iopub") -> dict[str, Any]:
    msg = make_message(msg_type, content, channel=channel)
    msg["parent_header"] = parent["header"]
    return msg


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


@pytest.mark.parametrize("seed", range(8))
async def test_garbage_from_a_client_ends_both_relays_alike(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid frames, then frames with random header bits and random bytes: both modules
    refuse at the same byte, with the same code."""
    rng = seeded(200 + seed)
    fast, reference = pair(monkeypatch, max_message=5000)
    good = stream_of(rng, masked=True, count=5, largest=3000)
    bad = []
    for _ in range(20):
        payload = rng.randbytes(rng.choice([0, 1, 2, 5, 126, 300]))
        bad.append(bytes([rng.randrange(256), rng.randrange(256)]) + payload
                   if rng.random() < 0.5 else
                   frame(payload, opcode=rng.choice([0, 1, 2, 3, 8, 9, 11]),
                         masked=rng.random() < 0.9, fin=rng.random() < 0.8, rng=rng))
    for chunk in chunks_of(rng, good + bad):
        fast.feed(True, chunk)
        reference.feed(True, chunk)
        assert fast.observed() == reference.observed()
    assert fast.relay.done.done()
    assert fast.relay.done.result()[0] in (1002, 1007, 1009)


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
              b'"msg_id"', b'"m1"', b'"m2"', b" ", b"   ", b"        "]

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
    c_tap, py_tap = COMPILED.Tap(), PYTHON.Tap()
    for i in range(20000):
        opcode, length, head, tail = peeks(rng)
        method = "client_frame" if i % 2 else "kernel_frame"
        assert getattr(c_tap, method)(opcode, length, head, tail) == \
            getattr(py_tap, method)(opcode, length, head, tail), (method, opcode, head, tail)
        assert (c_tap.busy, c_tap.owed, c_tap.owed_idle, c_tap.dirty, c_tap.awaiting) == \
            (py_tap.busy, py_tap.owed, py_tap.owed_idle, py_tap.dirty, py_tap.awaiting)
        if i % 97 == 0:
            c_tap.ticking = py_tap.ticking = not c_tap.ticking
    assert c_tap.take_counts() == py_tap.take_counts()
    assert c_tap.take_counts() == [] == py_tap.take_counts()


def test_the_compiled_peeks_match_on_adversarial_bytes() -> None:
    rng = seeded(11)
    for _ in range(30000):
        opcode, _length, head, tail = peeks(rng)
        assert COMPILED.channel_of(opcode, head, tail) == PYTHON.channel_of(opcode, head, tail)
        assert COMPILED.state_of(head, tail) == PYTHON.state_of(head, tail), (head, tail)
        assert COMPILED.msg_id_of(head) == PYTHON.msg_id_of(head)


def test_masking_matches_and_undoes_itself() -> None:
    rng = seeded(3)
    for _ in range(2000):
        data, key, offset = rng.randbytes(rng.randrange(0, 300)), rng.randbytes(4), \
            rng.randrange(0, 8)
        expected = bytes(b ^ key[(offset + i) % 4] for i, b in enumerate(data))
        assert COMPILED.mask(data, key, offset) == PYTHON.mask(data, key, offset) == expected


def test_a_masking_key_is_four_bytes(wire_module: ModuleType) -> None:
    """The compiled build reads the key through a C pointer: a shorter one is refused,
    never read past its end (the relay itself only ever passes four bytes)."""
    for key in (b"", b"abc", b"abcde"):
        with pytest.raises(ValueError):
            wire_module.mask(b"payload", key)


def test_channel_and_state_peeks(wire_module: ModuleType) -> None:
    """The peeks themselves, on the wire formats jupyter_server writes."""
    msg = make_message("status", {"execution_state": "busy"}, channel="iopub")
    v1 = encode_v1(msg)
    text = json.dumps(msg).encode()
    assert wire_module.channel_of(2, v1[:512], v1[-64:]) == 1
    assert wire_module.channel_of(1, text[:512], text[-64:] if len(text) > 512 else b"") == 1
    assert wire_module.state_of(v1[:512], b"") == b"busy"
    assert wire_module.state_of(b'{"execution_state": 3}', b"") is None
    tap = wire_module.Tap()
    assert tap.kernel_frame(2, len(v1), v1[:512], b"") == ACTIVITY | MID_REPLY
    assert tap.busy


def test_scanner_follows_frames_split_anywhere(wire_module: ModuleType) -> None:
    frames = [frame(b'{"channel": "shell", "msg_type": "execute_request"}', opcode=1,
                    masked=True),
              frame(b"z" * 300, opcode=2, masked=True), frame(b"", opcode=9, masked=True)]
    stream = b"".join(frames)
    for cut in range(1, len(stream)):
        scanner = wire_module.FrameScanner(server=True, max_message=1 << 20)
        events = [(e.opcode, e.head) for e in scanner.scan(stream[:cut])]
        events += [(e.opcode, e.head) for e in scanner.scan(stream[cut:])]
        assert [opcode for opcode, _head in events] == [1, 2]
        assert scanner.at_boundary and not scanner.error
        # Peeks see what the frame's first chunk holds.
        assert wire_module.channel_of(1, events[0][1], b"") == SHELL or cut < 40
    scanner = wire_module.FrameScanner(server=True, max_message=100)
    scanner.scan(frames[0] + frames[1])
    assert scanner.error == 1009 and scanner.error_at == len(frames[0]) and scanner.clean_cut
