"""The agent routes reach the session's server with its token and never hand it out.

The execute and files APIs go through the same per-session upstream layer as
the proxy (broker/upstream/session.py adds the ``Authorization`` header);
everything a client of theirs receives (headers and bodies, answers and
refusals, a streamed execution) is searched for the upstream token.
"""

from __future__ import annotations

import json

from broker import appkeys
from tests.agent.conftest import Agent


async def test_agent_routes_never_show_the_upstream_token(agent: Agent) -> None:
    seen: list[str] = []

    async def call(method: str, tail: str, **kwargs: object) -> int:
        async with agent.http.request(method, agent.url(tail), headers=agent.headers,
                                      **kwargs) as resp:  # type: ignore[arg-type]
            seen.append(json.dumps(dict(resp.headers)))
            seen.append((await resp.read()).decode("utf-8", "replace"))
            return resp.status

    assert await call("PUT", "files/data/a.txt", data=b"hello") == 201
    assert await call("GET", "files/data/a.txt") == 200
    assert await call("GET", "files/data/") == 200
    assert await call("GET", "files/no-such-file") == 404
    assert await call("GET", "files/data/a.txt/inside") >= 400  # (the server fails it)
    assert await call("POST", "execute", json={"code": "print(open('data/a.txt').read())"}) \
        == 200
    assert "hello" in seen[-1]
    assert await call("POST", "execute", json={"code": "raise ValueError('x')"}) == 200
    async for name, data in agent.events("print(1)"):
        seen.append(f"{name} {json.dumps(data)}")
    assert await call("DELETE", "files/data/a.txt") == 204
    stored = await agent.broker.app[appkeys.STORE].get(agent.session["id"])
    assert stored is not None and len(stored.upstream_token) > 20
    everything = "\n".join(seen)
    assert "ValueError" in everything  # (the refusal and error paths were taken)
    assert stored.upstream_token not in everything
