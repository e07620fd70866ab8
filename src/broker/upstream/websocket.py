"""Opening a WebSocket to a session's Jupyter server: the one upstream handshake.

Both users of an upstream kernel WebSocket open it here: the relay
(:mod:`broker.proxy.relay`), which then forwards the connection's bytes, and
the agent's kernel client (:mod:`broker.agent.kernel_socket`), which reads
whole messages. Each passes the protocol its connection continues with
(``leg``, a subclass of :class:`Handshaking`), so there is one transport per
connection from the first byte to the last and no second client library.

The upgrade is a plain HTTP/1.1 request written by hand: no extension is
offered (the relay forwards frames as bytes, which only works when neither
leg compresses), ``TCP_NODELAY`` is set, and the answer is checked as RFC
6455 section 4.1 asks (101, the ``Sec-WebSocket-Accept`` of our key, no
extension, no subprotocol we did not offer;
docs/protocols.md#websocket-handshake-rfc-6455). Which URL is opened, with
which token, is the caller's
(:meth:`broker.upstream.session.SessionUpstream.websocket` keeps it inside
the session's server).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from yarl import URL

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: An upstream's answer to the upgrade is refused above this size (headers only).
MAX_HANDSHAKE = 64 * 1024


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324


class HandshakeRefused(Exception):
    """The upstream answered the upgrade with something other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class Handshaking(asyncio.Protocol):
    """An upstream connection's protocol while its upgrade is answered.

    Subclasses are what the connection becomes afterwards; until they take
    over, every byte is kept: the response head for :meth:`handshake`, and
    frame bytes that followed it (a reconnecting Jupyter client is sent the
    output buffered for it at once) for :meth:`take_buffered`.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[tuple[bytes, bytes]] | None = (
            asyncio.get_running_loop().create_future())
        self._buffer = b""
        #: The connection ended before its new owner took it over.
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        fut = self._handshake
        if fut is None or fut.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            fut.set_result((self._buffer[:end], self._buffer[end + 4:]))
            self._buffer = b""
        elif len(self._buffer) > MAX_HANDSHAKE:
            fut.set_exception(ConnectionError("oversized upstream handshake"))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(ConnectionError("upstream closed during handshake"))

    def take_buffered(self) -> bytes:
        """Bytes that arrived after the handshake, before the new owner took the leg over."""
        data, self._buffer = self._buffer, b""
        return data

    async def handshake(self) -> tuple[bytes, bytes]:
        """The upstream's response head and whatever frame bytes followed it."""
        assert self._handshake is not None
        try:
            return await self._handshake
        finally:
            self._handshake = None  # not kept (with the response head) for the connection's life


L = TypeVar("L", bound=Handshaking)


@dataclass
class UpstreamSocket(Generic[L]):
    """An upstream WebSocket after its handshake: the transport, its protocol (``leg``),
    the subprotocol the upstream chose, and the frame bytes that came with its 101."""

    transport: asyncio.Transport
    leg: L
    protocol: str | None
    leftover: bytes


async def connect(url: URL, headers: Iterable[tuple[str, str]], protocols: Sequence[str], *,
                  leg: Callable[[], L], limit: float,
                  ssl_context: ssl.SSLContext | None = None) -> UpstreamSocket[L]:
    """Open the WebSocket at ``url`` (``ws``/``wss``, or ``http``/``https``).

    ``headers`` go into the upgrade request as given (the caller's token);
    ``protocols`` are offered as ``Sec-WebSocket-Protocol``. The whole
    handshake is bounded by ``limit`` seconds. Raises
    :class:`HandshakeRefused` (any answer but 101), ``ConnectionError``
    (an invalid answer, or the upstream closed), ``OSError`` or
    ``TimeoutError``.
    """
    loop = asyncio.get_running_loop()
    secure = url.scheme in ("wss", "https")
    host = url.raw_host or "127.0.0.1"
    port = url.port or (443 if secure else 80)
    context = (ssl_context or ssl.create_default_context()) if secure else None
    async with asyncio.timeout(limit):
        transport, protocol = await loop.create_connection(
            leg, host, port, ssl=context, server_hostname=host if secure else None)
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16)).decode()
            default_port = port == (443 if secure else 80)
            lines = [
                f"GET {url.raw_path_qs} HTTP/1.1",
                f"Host: {host if default_port else f'{host}:{port}'}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
            if protocols:
                lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
            lines += [f"{name}: {value}" for name, value in headers]
            head = "\r\n".join(lines) + "\r\n\r\n"
            breaks = len(lines) + 1
            if head.count("\n") != breaks or head.count("\r") != breaks:  # a smuggled field
                raise ConnectionError("refusing an upgrade header with a line break")
            transport.write(head.encode("latin-1"))
            answer_head, leftover = await protocol.handshake()
        except BaseException:
            transport.abort()
            raise
    status_line, _, rest = answer_head.decode("latin-1").partition("\r\n")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if status != 101:
        transport.abort()
        raise HandshakeRefused(status)
    answer: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, _, value = line.partition(":")
        answer[name.strip().lower()] = value.strip()
    chosen = answer.get("sec-websocket-protocol") or None
    if (answer.get("sec-websocket-accept") != accept_key(key)
            or answer.get("sec-websocket-extensions")
            or (chosen is not None and chosen not in protocols)):
        transport.abort()
        raise ConnectionError("upstream WebSocket handshake is invalid")
    return UpstreamSocket(transport, protocol, chosen, leftover)
