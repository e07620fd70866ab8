"""Two broker replicas sharing one real Redis: any replica serves any session."""

from __future__ import annotations

import uuid

from tests.conftest import MakeBroker
from tests.kernelproto import V1, execute


async def test_a_session_created_on_one_replica_works_on_another(
    make_broker: MakeBroker, redis_url: str
) -> None:
    shared = {"redis_url": redis_url, "secret_key": "replica-test-secret",
              "redis_prefix": f"r{uuid.uuid4().hex[:8]}:"}
    first = await make_broker(**shared)
    second = await make_broker(**shared)
    session = await first.ready_session()
    token = session["token"]
    # The second replica knows the session from Redis alone.
    async with second.http.get(f"{second.url}/api/v1/sessions/{session['id']}",
                               headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    base = f"{second.url}/s/{session['id']}/"
    async with second.http.post(f"{base}api/kernels", json={"name": "python3"},
                                headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 201
        kernel = (await resp.json())["id"]
    async with second.http.ws_connect(f"ws{base[4:]}api/kernels/{kernel}/channels",
                                      params={"token": token}, protocols=[V1]) as ws:
        result = await execute(ws, "print(6*7)")
    assert result.stdout == "42\n"
    # A wrong secret key cannot read the stored upstream token: a clear refusal.
    third = await make_broker(**(shared | {"secret_key": "another-secret"}))
    async with third.http.get(f"{base.replace(second.url, third.url)}api/status",
                              headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 500
        body = await resp.json()
        assert body["error"] == "internal" and "Traceback" not in body["message"]
