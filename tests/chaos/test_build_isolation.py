"""Visitors behind one address (a classroom, a company NAT) never share a /build session.

Two readers of the same book open the same launch URL at the same moment:
same client address, same page Origin, neither holding a token. Each must
get a session of their own, with a kernel the other cannot reach: a value
one sets is not there for the other, and neither token opens the other's
session. Real broker, real ``jupyter server`` processes, loopback only.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tests.binder.eventsource import event_source
from tests.conftest import BrokerHarness, MakeBroker
from tests.faulttable import _Recorder
from tests.kernelproto import V1, execute

BOOK = "https://book.example.org"
SPEC = "gh/owner/repo/HEAD"
NAT = "203.0.113.20"  # the one public address the classroom's proxy shows


async def run(broker: BrokerHarness, ready: dict[str, Any], code: str) -> str:
    """Run ``code`` in a new kernel of the session, as thebe does; its stdout."""
    auth = {"Authorization": f"token {ready['token']}", "Origin": BOOK}
    async with broker.http.post(f"{ready['url']}api/kernels", json={"name": "python3"},
                                headers=auth) as resp:
        assert resp.status == 201, await resp.text()
        kernel_id = (await resp.json())["id"]
    async with broker.http.ws_connect(
        f"ws{ready['url'][4:]}api/kernels/{kernel_id}/channels",
        params={"session_id": uuid.uuid4().hex, "token": ready["token"]},
        protocols=[V1], headers={"Origin": BOOK},
    ) as ws:
        return (await execute(ws, code)).stdout


async def test_two_visitors_behind_one_address_get_two_sessions(
    make_broker: MakeBroker, fault_table: _Recorder
) -> None:
    broker = await make_broker(allowed_origins=[BOOK], trusted_proxies=["127.0.0.1/32"])
    url = f"{broker.url}/build/{SPEC}"
    nat = {"X-Forwarded-For": NAT}
    one, two = await asyncio.wait_for(asyncio.gather(
        event_source(broker.http, url, origin=BOOK, headers=nat),
        event_source(broker.http, url, origin=BOOK, headers=nat),
    ), 60)
    a, b = one.ready, two.ready
    assert a["binder_client_ip"] == b["binder_client_ip"] == NAT
    separate = a["url"] != b["url"]
    assert separate

    statuses = []
    for ready, other in ((a, b), (b, a)):
        async with broker.http.get(f"{ready['url']}api/kernels",
                                   params={"token": other["token"]}) as resp:
            statuses.append(resp.status)
    assert statuses == [403, 403]

    assert await run(broker, a, "secret = 'visitor A'; print(secret)") == "visitor A\n"
    seen_by_b = await run(broker, b, "print(globals().get('secret'))")
    assert seen_by_b == "None\n"

    fault_table.record(
        fault="two visitors behind one address open the same /build URL",
        injected="two EventSource launches at once: one spec, one client address, "
                 "one Origin, no token or cookie",
        clients_saw=f"two separate sessions; each token opens only its own "
                    f"(other's: {statuses[0]}); a variable set in one kernel is "
                    f"{seen_by_b.strip()} in the other",
        lost="nothing",
    )
