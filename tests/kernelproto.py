"""A minimal Jupyter kernel-protocol client for tests, in both wire formats.

``v1.kernel.websocket.jupyter.org`` frames (binary): a little-endian u64
count of offsets, the offsets, then channel name, header, parent header,
metadata, content and buffers back to back (docs/protocols.md#kernel-websocket-protocols;
the messages themselves: docs/protocols.md#kernel-messages).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

V1 = "v1.kernel.websocket.jupyter.org"


def make_message(msg_type: str, content: dict[str, Any], channel: str = "shell",
                 session: str = "test") -> dict[str, Any]:
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "test",
                   "session": session, "version": "5.3", "date": ""},
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


def encode_v1(msg: dict[str, Any]) -> bytes:
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
    count = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1): 8 * (i + 2)], "little") for i in range(count)]
    parts = [data[offsets[i]:offsets[i + 1]] for i in range(count - 1)]
    msg = {"channel": parts[0].decode()}
    for key, part in zip(("header", "parent_header", "metadata", "content"), parts[1:5],
                         strict=True):
        msg[key] = json.loads(part)
    msg["buffers"] = parts[5:]
    return msg


@dataclass
class Execution:
    stdout: str = ""
    stderr: str = ""
    reply: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)


async def execute(ws: aiohttp.ClientWebSocketResponse, code: str) -> Execution:
    """Run code on an open kernel socket; return its outputs once the kernel is idle."""
    binary = ws.protocol == V1
    msg = make_message("execute_request", {"code": code, "silent": False, "store_history": True,
                                           "user_expressions": {}, "allow_stdin": False})
    if binary:
        await ws.send_bytes(encode_v1(msg))
    else:
        await ws.send_str(json.dumps(msg))
    result = Execution()
    idle = replied = False
    while not (idle and replied):
        frame = await ws.receive(timeout=60)
        if frame.type == aiohttp.WSMsgType.BINARY:
            assert binary, "binary frame without the v1 subprotocol"
            reply = decode_v1(frame.data)
        elif frame.type == aiohttp.WSMsgType.TEXT:
            assert not binary, "text frame on a v1 connection"
            reply = json.loads(frame.data)
        else:
            raise AssertionError(f"socket ended during execution: {frame.type} {frame.data!r}")
        if reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        result.messages.append(reply)
        kind = reply["header"]["msg_type"]
        if kind == "stream":
            name = reply["content"]["name"]
            setattr(result, name, getattr(result, name) + reply["content"]["text"])
        elif kind == "execute_reply":
            result.reply = reply["content"]
            replied = True
        elif kind == "status" and reply["content"]["execution_state"] == "idle":
            idle = True
    return result


async def closing(ws: aiohttp.ClientWebSocketResponse, limit: float = 5.0) -> aiohttp.WSMessage:
    """The close the server sends (kernel messages before it are skipped), within ``limit`` s.

    Its ``data`` is the close code and ``extra`` the reason, as the server sent
    them (``ws.close_code`` may say 1006 if the server drops the connection
    before aiohttp's close reply).
    """
    async with asyncio.timeout(limit):
        message = await ws.receive()
        while message.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                   aiohttp.WSMsgType.CLOSING):
            message = await ws.receive()
    return message
