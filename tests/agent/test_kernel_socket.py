"""The agent's message socket over the one upstream handshake.

Protocol corners (fragments, pings, closes, oversized and masked server
frames) against a WebSocket server written by hand on loopback, so each test
controls every byte the server sends and sees every byte the client sent;
then a real kernel through a real session's server.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from yarl import URL

from broker import appkeys
from broker.agent.kernel_socket import KernelSocket
from broker.proxy._wire_py import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, mask
from broker.upstream.websocket import accept_key, connect
from tests.conftest import BrokerHarness

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def server_frame(opcode: int, payload: bytes, *, fin: bool = True, key: bytes = b"") -> bytes:
    """A frame as a server sends it (unmasked unless ``key`` is given, which no server may)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([b0, (0x80 if key else 0) | n])
    elif n < 1 << 16:
        head = bytes([b0, (0x80 if key else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, (0x80 if key else 0) | 127]) + n.to_bytes(8, "big")
    return head + key + (mask(payload, key) if key else payload)


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One frame of the client, which must be masked; (opcode, unmasked payload)."""
    b0, b1 = await reader.readexactly(2)
    assert b1 & 0x80, "client frames are masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    key = await reader.readexactly(4)
    return b0 & 0x0F, mask(await reader.readexactly(n), key)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[URL]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script, extra: bytes = b"") -> URL:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                       if line.lower().startswith("sec-websocket-key:"))
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                         + accept_key(key).encode() + b"\r\n" + extra + b"\r\n")
            try:
                await script(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return URL(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws")

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def open_socket(url: URL, max_message: int = 0, heartbeat: float = 0.0) -> KernelSocket:
    opened = await connect(url, [], [], limit=10, leg=lambda: KernelSocket(
        max_message=max_message, heartbeat=heartbeat))
    opened.leg.start(opened.leftover)
    return opened.leg


async def test_messages_pings_and_the_close(serve: Callable[..., Awaitable[URL]]) -> None:
    client_sent: asyncio.Future[list[tuple[int, bytes]]] = (
        asyncio.get_running_loop().create_future())

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # All in one write: the 101 and these frames may reach the client together.
        writer.write(server_frame(OP_PING, b"are you there")
                     + server_frame(OP_TEXT, b"hel", fin=False)
                     + server_frame(OP_PING, b"")  # control frames may come between fragments
                     + server_frame(OP_CONT, b"lo", fin=True)
                     + server_frame(OP_BINARY, bytes(range(256)) * 300)
                     + server_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"))
        # Two pongs, then the answer to the close.
        client_sent.set_result([await read_client_frame(reader) for _ in range(3)])

    sock = await open_socket(await serve(script))
    assert await sock.receive() == (OP_TEXT, b"hello")
    assert await sock.receive() == (OP_BINARY, bytes(range(256)) * 300)
    assert await sock.receive() is None
    assert sock.closed and sock.ended == (1000, "bye")
    assert await asyncio.wait_for(client_sent, 10) == [(OP_PONG, b"are you there"), (OP_PONG, b""),
                           (OP_CLOSE, (1000).to_bytes(2, "big"))]
    with pytest.raises(ConnectionError):
        sock.send_text("too late")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
async def test_sent_messages_are_masked_with_every_length_form(
        serve: Callable[..., Awaitable[URL]], size: int) -> None:
    received: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await read_client_frame(reader))

    sock = await open_socket(await serve(script))
    text = "é" * (size // 2) + "x" * (size % 2)
    sock.send_text(text)
    assert await asyncio.wait_for(received, 10) == (OP_TEXT, text.encode())
    sock.close()


@pytest.mark.parametrize(("frames", "code"), [
    # Over max_message, in one frame and across fragments: 1009.
    ([server_frame(OP_TEXT, b"x" * 1001)], 1009),
    ([server_frame(OP_TEXT, b"x" * 600, fin=False), server_frame(OP_CONT, b"x" * 600)], 1009),
    # A masked server frame, a stray continuation, an unknown opcode: 1002.
    ([server_frame(OP_TEXT, b"hi", key=b"abcd")], 1002),
    ([server_frame(OP_CONT, b"hi")], 1002),
    ([server_frame(3, b"hi")], 1002),
])
async def test_protocol_violations_close_the_socket(
        serve: Callable[..., Awaitable[URL]], frames: list[bytes], code: int) -> None:
    closed_with: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(frames))
        closed_with.set_result(await read_client_frame(reader))

    sock = await open_socket(await serve(script), max_message=1000)
    assert await sock.receive() is None
    assert sock.ended is not None and sock.ended[0] == code
    opcode, payload = await asyncio.wait_for(closed_with, 10)
    assert opcode == OP_CLOSE and int.from_bytes(payload[:2], "big") == code


async def test_a_silent_server_ends_the_socket_after_the_heartbeat(
        serve: Callable[..., Awaitable[URL]]) -> None:
    pings = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        while True:  # reads the client's pings and never answers one
            opcode, _ = await read_client_frame(reader)
            if opcode != OP_PING:
                return
            pings += 1

    sock = await open_socket(await serve(script), heartbeat=0.2)
    assert await asyncio.wait_for(sock.receive(), 30) is None
    assert sock.ended == (1011, "kernel connection lost")
    assert pings >= 2


@pytest.mark.parametrize("extra", [b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
                                   b"Sec-WebSocket-Protocol: not-offered\r\n"])
async def test_an_answer_the_client_did_not_ask_for_fails_the_handshake(
        serve: Callable[..., Awaitable[URL]], extra: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    url = await serve(script, extra)
    with pytest.raises(ConnectionError, match="handshake is invalid"):
        await connect(url, [], ["v1.kernel.websocket.jupyter.org"], limit=10, leg=KernelSocket)


async def test_the_subprotocol_the_server_picked_is_known(
        serve: Callable[..., Awaitable[URL]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    url = await serve(script, b"Sec-WebSocket-Protocol: v1.kernel.websocket.jupyter.org\r\n")
    opened = await connect(url, [], ["v1.kernel.websocket.jupyter.org", "other"], limit=10,
                           leg=KernelSocket)
    assert opened.protocol == "v1.kernel.websocket.jupyter.org"
    opened.transport.close()


async def test_a_real_kernel_answers_through_the_session_upstream(broker: BrokerHarness) -> None:
    data = await broker.ready_session()
    session = await broker.store.get(data["id"])
    assert session is not None
    upstream = broker.app[appkeys.UPSTREAM].for_session(session)
    status, kernel = await upstream.json("POST", "api/kernels", {"name": "python3"})
    assert status == 201
    opened = await upstream.websocket(f"api/kernels/{kernel['id']}/channels",
                                      query=f"session_id={uuid.uuid4().hex}",
                                      leg=lambda: KernelSocket(max_message=1 << 20), limit=30)
    sock = opened.leg
    sock.start(opened.leftover)
    msg_id = uuid.uuid4().hex
    sock.send_text(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "kernel_info_request", "username": "t",
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "content": {}, "channel": "shell"}))
    while True:
        message = await asyncio.wait_for(sock.receive(), 30)
        assert message is not None
        msg = json.loads(message[1])
        if msg["parent_header"].get("msg_id") == msg_id \
                and msg["header"]["msg_type"] == "kernel_info_reply":
            break
    assert msg["content"]["status"] == "ok"
    sock.close()
    while await sock.receive() is not None:  # what had arrived is still read, then the end
        pass
    assert sock.ended == (1000, "")

