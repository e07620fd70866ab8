"""When the relay acknowledges a kernel's frames at once: only while it is mid-reply.

jupyter_server leaves Nagle on, so each small frame of a kernel's reply
after the first waits for the previous one's ACK; the relay sends that ACK
at once (TCP_QUICKACK) while more frames are due, and lets it ride on the
next request otherwise. These tests feed a connection's Tap the frames a
real kernel sends, in every order jupyter_server may forward them (it relays
the shell and iopub streams independently), in both wire formats, through
the compiled module and the Python one.
"""

from __future__ import annotations

import itertools
import json
import os
from types import ModuleType
from typing import Any

import pytest

from broker.proxy._wire_py import MID_REPLY, mask
from tests.kernelproto import encode_v1, make_message


def _frame(payload: bytes, *, opcode: int, masked: bool) -> bytes:
    length = len(payload)
    bit = 0x80 if masked else 0
    head = bytes([0x80 | opcode]) + (bytes([bit | length]) if length < 126
                                     else bytes([bit | 126]) + length.to_bytes(2, "big"))
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask(payload, key)


def _encode(msg: dict[str, Any], wire: str) -> tuple[bytes, int]:
    if wire == "v1":
        return encode_v1(msg), 2
    return json.dumps(msg).encode(), 1


def _reply_to(request: dict[str, Any], msg_type: str, content: dict[str, Any],
              channel: str) -> dict[str, Any]:
    msg = make_message(msg_type, content, channel=channel)
    msg["parent_header"] = request["header"]  # as real replies carry (pushes content far out)
    return msg


WIRES = ["v1", "json"]


class Feed:
    """Client frames and kernel frames through the scanners into one Tap."""

    def __init__(self, wire: str, module: ModuleType) -> None:
        self.wire = wire
        self.tap = module.Tap()
        self.to_kernel = module.FrameScanner(server=True, max_message=1 << 24)
        self.to_client = module.FrameScanner(server=False, max_message=1 << 24)

    def client(self, msg: dict[str, Any]) -> None:
        payload, opcode = _encode(msg, self.wire)
        for ev in self.to_kernel.scan(_frame(payload, opcode=opcode, masked=True)):
            self.tap.client_frame(ev.opcode, ev.length, ev.head, ev.tail)
        assert not self.to_kernel.error

    def kernel(self, msg: dict[str, Any]) -> bool:
        payload, opcode = _encode(msg, self.wire)
        answers = [bool(self.tap.kernel_frame(ev.opcode, ev.length, ev.head, ev.tail)
                        & MID_REPLY)
                   for ev in self.to_client.scan(_frame(payload, opcode=opcode, masked=False))]
        assert len(answers) == 1
        return answers[0]


def _burst(request: dict[str, Any], reply_type: str) -> dict[str, dict[str, Any]]:
    return {
        "busy": _reply_to(request, "status", {"execution_state": "busy"}, "iopub"),
        "reply": _reply_to(request, reply_type, {"status": "ok"}, "shell"),
        "idle": _reply_to(request, "status", {"execution_state": "idle"}, "iopub"),
    }


#: iopub keeps its own order (busy before idle); the shell reply may come anywhere.
ORDERS = [order for order in itertools.permutations(["busy", "reply", "idle"])
          if order.index("busy") < order.index("idle")]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("order", ORDERS)
async def test_mid_reply_until_both_reply_and_idle_have_come(
        wire: str, order: tuple[str, ...], wire_module: ModuleType) -> None:
    feed = Feed(wire, wire_module)
    request = make_message("kernel_info_request", {})
    feed.client(request)
    burst = _burst(request, "kernel_info_reply")
    assert [feed.kernel(burst[name]) for name in order] == [True, True, False]


@pytest.mark.parametrize("wire", WIRES)
async def test_an_execution_with_output_stays_mid_reply_to_its_end(
        wire: str, wire_module: ModuleType) -> None:
    feed = Feed(wire, wire_module)
    request = make_message("execute_request", {"code": "print(1); 2"})
    feed.client(request)
    frames = [
        _reply_to(request, "status", {"execution_state": "busy"}, "iopub"),
        _reply_to(request, "execute_input", {"code": "print(1); 2"}, "iopub"),
        _reply_to(request, "stream", {"name": "stdout", "text": "1\n" * 500}, "iopub"),
        _reply_to(request, "execute_result", {"data": {"text/plain": "2"}}, "iopub"),
        _reply_to(request, "status", {"execution_state": "idle"}, "iopub"),
        _reply_to(request, "execute_reply", {"status": "ok"}, "shell"),
    ]
    assert [feed.kernel(msg) for msg in frames] == [True] * 5 + [False]


@pytest.mark.parametrize("wire", WIRES)
async def test_messages_that_owe_no_reply_ask_for_no_quick_acks(
        wire: str, wire_module: ModuleType) -> None:
    """A comm message echoed back (the benchmark's echo upstream), or output
    the kernel sends unprompted, is not a reply burst."""
    feed = Feed(wire, wire_module)
    msg = make_message("comm_msg", {"data": {"x": "y" * 100}})
    feed.client(msg)
    assert feed.kernel(msg) is False
    assert feed.kernel(make_message("stream", {"name": "stdout", "text": "tick"},
                                    channel="iopub")) is False


@pytest.mark.parametrize("wire", WIRES)
async def test_a_restarted_kernel_owes_nothing(
        wire: str, wire_module: ModuleType) -> None:
    feed = Feed(wire, wire_module)
    for _ in range(3):
        feed.client(make_message("execute_request", {"code": "while True: pass"}))
    restarting = make_message("status", {"execution_state": "restarting"}, channel="iopub")
    assert feed.kernel(restarting) is False


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("order", ORDERS)
async def test_an_idle_of_another_request_does_not_end_an_execution(
        wire: str, order: tuple[str, ...], wire_module: ModuleType) -> None:
    """A cell is done for a front end when its reply and the idle status whose parent is
    that request have come. Another request's busy/idle (jupyter_server's own
    kernel_info nudge, another tab on the same kernel) may land in between: quick ACKs
    go on until the execution's own idle."""
    feed = Feed(wire, wire_module)
    request = make_message("execute_request", {"code": "1"})
    feed.client(request)
    other = make_message("kernel_info_request", {})  # sent by someone else
    assert feed.kernel(_reply_to(other, "status", {"execution_state": "busy"}, "iopub"))
    assert feed.kernel(_reply_to(other, "status", {"execution_state": "idle"}, "iopub"))
    burst = _burst(request, "execute_reply")
    assert [feed.kernel(burst[name]) for name in order] == [True, True, False]
