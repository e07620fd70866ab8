"""Many kernel WebSockets through one broker at once: each gets its own bytes, and only them.

The relay serves every connection of a broker from the one event loop, each
with its own frame scanners and tallies. Here thirty connections of three sessions
send tagged messages of mixed sizes (some spanning many socket reads, some
with rate limits on their session's broker) through a real broker to the
echo upstream of this package's harness, all at once, while some of them go
away mid-stream: every survivor must get exactly its own messages back, in
order, and every relay must end.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

from aiohttp import WSMsgType

from tests.limits.conftest import MakeLimited, post_session


async def kernel_ws(broker: Any, session: dict[str, Any]) -> Any:
    url = f"{session['ws_url']}api/kernels/{uuid.uuid4().hex}/channels"
    return await broker.http.ws_connect(url, params={"token": session["token"]},
                                        max_msg_size=0, autoping=True)


def messages(tag: str, count: int, rng: random.Random) -> list[str | bytes]:
    """Tagged text and binary messages, from a few bytes to past one socket read."""
    sizes = [10, 200, 3000, 70_000, 300_000]
    out: list[str | bytes] = []
    for seq in range(count):
        body = f"{tag}:{seq}:" + "x" * rng.choice(sizes)
        out.append(body if rng.random() < 0.5 else body.encode())
    return out


async def converse(ws: Any, sent: list[str | bytes], quit_after: int | None) -> list[Any]:
    """Send every message and collect the echoes; stop early (going away) if told to."""
    received: list[Any] = []

    async def send() -> None:
        for message in sent:
            if isinstance(message, str):
                await ws.send_str(message)
            else:
                await ws.send_bytes(message)

    sender = asyncio.create_task(send())
    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            received.append(msg.data)
            if quit_after is not None and len(received) == quit_after:
                ws._response.connection.transport.abort()  # gone without a close frame
                break
            if len(received) == len(sent):
                break
    finally:
        await asyncio.gather(sender, return_exceptions=True)
    return received


async def test_thirty_connections_each_get_exactly_their_own_messages(
        make_limited: MakeLimited) -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    plain = await make_limited()
    limited = await make_limited(ws_client_messages_per_second=2000,
                                 ws_client_message_burst=20)
    sessions = [(broker, (await post_session(broker))[2])
                for broker in (plain, plain, limited)]
    plans = []
    for index in range(30):
        broker, session = sessions[index % 3]
        ws = await kernel_ws(broker, session)
        sent = messages(f"c{index}", 60, rng)
        quit_after = rng.randrange(5, 40) if index % 5 == 4 else None
        plans.append((ws, sent, quit_after))
    results = await asyncio.wait_for(
        asyncio.gather(*(converse(ws, sent, quit) for ws, sent, quit in plans)), 120)
    for (ws, sent, quit_after), received in zip(plans, results, strict=True):
        assert received == sent[:quit_after or len(sent)]  # its own, in order, nothing else
        await ws.close()
    for broker in (plain, limited):
        await asyncio.wait_for(broker.manager._no_connections.wait(), 30)  # every relay ended
