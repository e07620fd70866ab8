"""Malformed client frames on a kernel WebSocket, over raw sockets, through a real broker.

RFC 6455 section 5 says what a server must refuse; the broker passes client
frames on as bytes, so it checks them itself, in its one relay module
(compiled and interpreted: both run here). Each row opens a kernel
WebSocket with a hand-written upgrade, sends one bad frame, and reads what
comes back until the broker ends the connection: a close frame with the
code the RFC asks for, then an orderly end of stream (never a reset that
would swallow the close frame). The session's kernel must survive each.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest

from tests.conftest import BrokerHarness, MakeBroker

#: The cap on client messages in these tests (the oversized row sends 3 times this).
CLIENT_CAP = 1 << 20


def frame(payload: bytes, *, opcode: int = 1, fin: bool = True, rsv: int = 0,
          masked: bool = True) -> bytes:
    """One frame as a (possibly misbehaving) client writes it."""
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 65536:
        head = bytes([first, bit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int) -> bytes:
    return code.to_bytes(2, "big") + b"bye"


#: (what is wrong, the frame, the close code the broker must answer with)
ROWS: list[tuple[str, bytes, int]] = [
    ("unmasked client frame", frame(b'{"x": 1}', masked=False), 1002),
    ("RSV1 bit set (no extension negotiated)", frame(b'{"x": 1}', rsv=0x40), 1002),
    ("unknown data opcode 3", frame(b"abc", opcode=3), 1002),
    ("unknown control opcode 11", frame(b"", opcode=11), 1002),
    ("fragmented ping (FIN clear)", frame(b"p", opcode=9, fin=False), 1002),
    ("126-byte ping", frame(b"p" * 126, opcode=9), 1002),
    ("continuation with no message started", frame(b"abc", opcode=0), 1002),
    ("close code 999", frame(close_payload(999), opcode=8), 1002),
    ("close code 1005", frame(close_payload(1005), opcode=8), 1002),
    ("close code 1006", frame(close_payload(1006), opcode=8), 1002),
    ("close code 1015", frame(close_payload(1015), opcode=8), 1002),
    ("close code 1016", frame(close_payload(1016), opcode=8), 1002),
    ("close code 2999", frame(close_payload(2999), opcode=8), 1002),
    ("invalid UTF-8 in a text frame", frame(b'{"x": "\xff\xfe"}'), 1007),
]


async def upgrade(broker: BrokerHarness, session: dict[str, Any],
                  kernel_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A kernel WebSocket opened by hand (no client library to tidy our frames)."""
    port = int(broker.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    path = f"/s/{session['id']}/api/kernels/{kernel_id}/channels?token={session['token']}"
    writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def close_code_then_eof(reader: asyncio.StreamReader) -> int:
    """Skip kernel frames up to the broker's close frame; its code, once the stream ended
    in order (a reset raises)."""
    code = None
    while code is None:
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), 20)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        assert not b1 & 0x80  # a server never masks
        payload = await reader.readexactly(length)
        if b0 & 0x0F == 8:
            code = int.from_bytes(payload[:2], "big")
    assert await asyncio.wait_for(reader.read(), 20) == b""
    return code


async def kernel_alive(broker: BrokerHarness, session: dict[str, Any], kernel_id: str) -> bool:
    async with broker.http.get(f"{session['base_url']}api/kernels/{kernel_id}",
                               headers={"Authorization": f"token {session['token']}"}) as resp:
        return resp.status == 200


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
async def test_client_frames_a_server_must_refuse(make_broker: MakeBroker, fault_table: Any,
                                                  compiled: bool) -> None:
    broker = await make_broker(ws_relay_compiled=compiled,
                               ws_client_max_message_size=CLIENT_CAP)
    async with broker.http.get(f"{broker.url}/versions") as resp:
        assert (await resp.json())["relay"] == ("compiled" if compiled else "python")
    session = await broker.ready_session()
    kernel_id = await broker.start_kernel(session)
    for fault, bad, expected in ROWS:
        reader, writer = await upgrade(broker, session, kernel_id)
        writer.write(bad)
        code = await close_code_then_eof(reader)
        writer.close()
        assert code == expected, fault
        alive = await kernel_alive(broker, session, kernel_id)
        assert alive, fault
        if compiled:  # (the same row either way: recorded once)
            fault_table.record(
                fault=f"WebSocket: {fault}", injected="one raw client frame",
                clients_saw=f"close {code}, then an orderly end of stream (no reset)",
                lost="nothing: the kernel and session stay up" if alive else "the kernel")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
async def test_an_oversized_client_frame_gets_its_1009_before_the_end(
        make_broker: MakeBroker, fault_table: Any, compiled: bool) -> None:
    """The client is still sending when the broker refuses; the close frame must reach it
    anyway: the broker half-closes and drains instead of resetting."""
    broker = await make_broker(ws_relay_compiled=compiled,
                               ws_client_max_message_size=CLIENT_CAP)
    session = await broker.ready_session()
    kernel_id = await broker.start_kernel(session)
    reader, writer = await upgrade(broker, session, kernel_id)
    payload = b"y" * (3 * CLIENT_CAP)

    async def send() -> None:
        writer.write(frame(payload, opcode=2))
        await writer.drain()

    sender = asyncio.create_task(send())
    code = await close_code_then_eof(reader)
    sender.cancel()
    writer.close()
    assert code == 1009
    alive = await kernel_alive(broker, session, kernel_id)
    assert alive
    if compiled:
        fault_table.record(
            fault="WebSocket: client message over the size cap (3 MiB, cap 1 MiB)",
            injected="one raw frame, still being sent when refused",
            clients_saw="close 1009, then an orderly end of stream (no reset)",
            lost="nothing: the kernel and session stay up; the message never reached it")
