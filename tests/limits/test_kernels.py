"""Kernels per session: counted on the session's own server, starts serialised.

The first test runs a real ``jupyter server`` (local backend) and real
ipykernels; the second puts two replicas on one Redis in front of the small
Jupyter-shaped upstream, so many concurrent starts are cheap.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import BrokerHarness, MakeBroker
from tests.limits.conftest import MakeLimited, assert_refusal, post_session
from tests.limits.upstream import FakeJupyter


async def call(broker: BrokerHarness, session: dict[str, Any], method: str, path: str,
               body: Any = None) -> tuple[int, Any, Any]:
    url = session["base_url"].replace(session["base_url"].split("/s/")[0], broker.url) + path
    async with broker.http.request(method, url, json=body,
                                   headers={"Authorization": f"token {session['token']}"}) as r:
        data = await r.json() if r.content_type == "application/json" else None
        return r.status, r.headers.copy(), data


async def test_kernel_starts_beyond_the_cap_are_refused_on_a_real_server(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(max_kernels_per_session=2)
    session = await broker.ready_session()
    starts = await asyncio.gather(*(call(broker, session, "POST", "api/kernels",
                                         {"name": "python3"}) for _ in range(4)))
    assert sorted(status for status, *_ in starts) == [201, 201, 429, 429]
    for status, headers, body in starts:
        if status == 429:
            assert_refusal(status, headers, body, expect_status=429,
                           reason="kernels_per_session", origin=None)
    running = [body["id"] for status, _h, body in starts if status == 201]

    # A session for a new path would start a third kernel; one on a running kernel, or
    # for a path that already has a session, starts nothing.
    new_path = {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    assert (await call(broker, session, "POST", "api/sessions", new_path))[0] == 429
    attach = {"path": "b.ipynb", "type": "notebook", "kernel": {"id": running[0]}}
    attached = await call(broker, session, "POST", "api/sessions", attach)
    assert attached[0] == 201, attached
    again = {"path": "b.ipynb", "type": "notebook", "kernel": {"name": "python"}}
    assert (await call(broker, session, "POST", "api/sessions", again))[0] == 201
    status, _h, kernels = await call(broker, session, "GET", "api/kernels")
    assert status == 200 and len(kernels) == 2

    assert (await call(broker, session, "DELETE", f"api/kernels/{running[1]}"))[0] == 204
    assert (await call(broker, session, "POST", "api/kernels", {"name": "python3"}))[0] == 201
    registry = broker.manager.metrics.registry
    assert registry.get_sample_value("broker_limit_refusals_total",
                                     {"reason": "kernels_per_session"}) == 3


async def test_concurrent_starts_through_two_replicas_stop_at_the_cap(
    make_limited: MakeLimited, upstream: FakeJupyter
) -> None:
    replicas = [await make_limited(redis=True, max_kernels_per_session=3) for _ in range(2)]
    session = (await post_session(replicas[0]))[2]
    starts = await asyncio.gather(*(call(replicas[i % 2], session, "POST", "api/kernels",
                                         {"name": "python3"}) for i in range(12)))
    assert sorted(status for status, *_ in starts) == [201] * 3 + [429] * 9
    assert len(upstream.kernels) == 3 and upstream.kernel_posts == 3


async def test_the_execute_apis_default_kernel_counts_against_the_cap(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(max_kernels_per_session=1)
    session = await broker.ready_session()
    assert (await call(broker, session, "POST", "api/kernels", {"name": "python3"}))[0] == 201
    async with broker.http.post(f"{broker.url}/api/v1/sessions/{session['id']}/execute",
                                json={"code": "1 + 1"},
                                headers={"Authorization": f"token {session['token']}"}) as r:
        body = await r.json()
        assert r.status == 429, body
        assert_refusal(r.status, r.headers, body, expect_status=429,
                       reason="kernels_per_session", origin=None)
    status, _h, kernels = await call(broker, session, "GET", "api/kernels")
    assert status == 200 and len(kernels) == 1
