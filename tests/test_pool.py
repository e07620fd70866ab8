"""Warm pools on the local backend (real jupyter servers and kernels; memory store).

The JupyterHub side (two replicas claiming from one shared pool, shrinking,
a hub refusing refills) is in ``tests/hub/test_pool_hub.py``.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from broker import appkeys
from broker.localserver import FROZEN_MESSAGE
from broker.settings import Settings, parse_pools
from tests.conftest import BrokerHarness, MakeBroker, eventually

ADMIN = "admin-secret"


async def pools(broker: BrokerHarness) -> dict[str, dict[str, Any]]:
    """The admin API's view of the pools, by name."""
    async with broker.http.get(f"{broker.url}/api/v1/admin/pools",
                               headers={"Authorization": f"token {ADMIN}"}) as resp:
        assert resp.status == 200, await resp.text()
        return {p["pool"]: p for p in (await resp.json())["pools"]}


async def filled(broker: BrokerHarness, name: str, size: int, limit: float = 60.0) -> list[str]:
    """Wait until pool ``name`` holds ``size`` ready entries; their ids."""
    async def probe() -> list[str] | None:
        view = (await pools(broker))[name]
        ready = [e["id"] for e in view["entries"] if e["status"] == "ready"]
        return ready if view["ready"] == size and len(ready) == size else None

    ids: list[str] = await eventually(probe, limit)
    return ids


def claims(broker: BrokerHarness, pool: str, outcome: str) -> float:
    value = broker.manager.metrics.pool_claims.labels(pool, outcome)._value.get()
    return float(value)


@pytest.fixture
async def pooled(make_broker: MakeBroker) -> BrokerHarness:
    return await make_broker(pool=["default=1"], admin_token=ADMIN, pool_check_interval=0.2)


def test_pool_setting_parses_min_and_max() -> None:
    assert parse_pools(["default=2", "gh/org/book/HEAD=4:20"]) == {
        "default": (2, 2), "gh/org/book/HEAD": (4, 20)}
    for bad in (["default"], ["default=x"], ["default=3:1"], ["=2"], ["a=1", "a=2"]):
        with pytest.raises(ValueError):
            parse_pools(bad)
    assert Settings(pool="default=1, gh/a/b/HEAD=0:3").pool == ["default=1", "gh/a/b/HEAD=0:3"]


async def test_a_claim_is_a_ready_session_whose_warm_kernel_runs_code(
        make_broker: MakeBroker) -> None:
    broker = await make_broker(pool=["default=1"], admin_token=ADMIN, pool_check_interval=0.2)
    [entry] = await filled(broker, "default", 1)
    warm = await broker.store.get(entry)
    status, data = await broker.create(wait=False)
    assert status == 201, data
    assert data["status"] == "ready" and data["id"] == entry
    assert claims(broker, "default", "hit") == 1
    # The entry's default kernel was started ahead: the execute API finds and uses it.
    headers = {"Authorization": f"token {data['token']}"}
    async with broker.http.get(f"{data['base_url']}api/sessions", headers=headers) as resp:
        kernels = [s["kernel"]["id"] for s in await resp.json()
                   if s["path"] == "broker-execute"]
    assert len(kernels) == 1
    async with broker.http.post(f"{broker.url}/api/v1/sessions/{entry}/execute",
                                json={"code": "print(1)"}, headers=headers) as resp:
        out = await resp.json()
    assert out["status"] == "ok" and out["stdout"] == "1\n", out
    async with broker.http.get(f"{data['base_url']}api/kernels", headers=headers) as resp:
        assert [k["id"] for k in await resp.json()] == kernels  # no second kernel started
    # A client that starts its own kernel (thebe, @jupyterlab/services) is given the warm
    # one the first time; a later start gets a kernel of its own.
    page = {"path": "book.ipynb", "name": "book.ipynb", "type": "notebook",
            "kernel": {"name": "python"}}
    async with broker.http.post(f"{data['base_url']}api/sessions", json=page,
                                headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["kernel"]["id"] == kernels[0]
    async with broker.http.post(f"{data['base_url']}api/kernels", json={"name": "python3"},
                                headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["id"] not in kernels
    # It belongs to the visitor now, with its own max age; the same server.
    claimed = await broker.store.get(entry)
    assert claimed.owner == "127.0.0.1" and not claimed.pooled
    assert claimed.upstream_url == warm.upstream_url
    assert claimed.expires_at - claimed.created_at == broker.manager.settings.session_max_age

    # The pool refills with a new entry; draining stops it and leaves the visitor's alone.
    async def refilling() -> list[str]:
        return [e["id"] for e in (await pools(broker))["default"]["entries"]]

    [refill] = await eventually(refilling, 30)
    assert refill != entry
    async with broker.http.delete(f"{broker.url}/api/v1/admin/pools",
                                  headers={"Authorization": f"token {ADMIN}"}) as resp:
        assert (await resp.json())["stopped"] == 1
    assert (await broker.store.get(refill, include_expired=True)).status.value == "stopped"
    assert (await broker.store.get(entry)).status.value == "ready"


async def test_a_dead_or_claimed_entry_is_never_handed_out_again(
        make_broker: MakeBroker) -> None:
    broker = await make_broker(pool=["default=2"], admin_token=ADMIN, pool_warm_kernel=False,
                               pool_refill_concurrency=2, pool_check_interval=60)
    frozen, live = await filled(broker, "default", 2)
    # A frozen server: its process is there (the backend sees nothing) but it never answers.
    pid = _pid(broker, frozen)
    os.kill(pid, signal.SIGSTOP)
    try:
        made = [await broker.create(wait=False) for _ in range(3)]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [status for status, _ in made] == [201, 201, 201], made
    ids = [data["id"] for _, data in made]
    assert ids[0] == live  # the live one, whichever was queued first
    assert frozen not in ids
    assert claims(broker, "default", "dead") == 1
    assert len(set(ids)) == 3  # a claimed entry is never handed to a second visitor
    # The claims start refills at once: a refilled entry may be ready in time for the
    # second or third visitor (a hit, ready), else they are misses (pending spawns).
    later = [data["status"] for _, data in made[1:]]
    assert set(later) <= {"pending", "ready"}, later
    assert claims(broker, "default", "miss") == later.count("pending")
    assert claims(broker, "default", "hit") == 1 + later.count("ready")

    async def discarded() -> bool:
        entry = await broker.store.get(frozen, include_expired=True)
        return entry.status.value == "stopped"

    await eventually(discarded, 30)
    for _, data in made[1:]:
        async with broker.http.delete(f"{broker.url}/api/v1/sessions/{data['id']}",
                                      headers={"Authorization": f"token {data['token']}"}):
            pass


async def test_local_servers_start_with_their_start_up_heap_frozen(
        make_broker: MakeBroker, tmp_path: Path) -> None:
    """An entry's server (any local session's) froze what it allocated while starting.

    Unfrozen, the first full garbage collection of a new ``jupyter server``
    walks its ~200,000 start-up objects (60-300 ms on a 2-core machine), and it
    fell into a pool visitor's first kernel connection (docs/pool.md).
    """
    broker = await make_broker(pool=["default=1"], admin_token=ADMIN, pool_warm_kernel=False,
                               pool_check_interval=0.2, local_root_dir=str(tmp_path / "s"))
    [entry] = await filled(broker, "default", 1)
    log = (tmp_path / "s" / f"{entry}.log").read_text()
    frozen = re.search(re.escape(FROZEN_MESSAGE) + r" \((\d+) objects\)", log)
    assert frozen is not None, log[-2000:]
    assert int(frozen.group(1)) > 0
    # The server is jupyter_server as before: the claimed session serves its API.
    status, data = await broker.create(wait=False)
    assert status == 201 and data["id"] == entry, data
    async with broker.http.get(f"{data['base_url']}api/status",
                               headers={"Authorization": f"token {data['token']}"}) as resp:
        assert resp.status == 200, await resp.text()


def _pid(broker: BrokerHarness, session_id: str) -> int:
    return int(broker.app[appkeys.BACKEND].pids()[session_id])


async def test_local_pools_are_per_replica_over_one_redis(
        make_broker: MakeBroker, redis_url: str) -> None:
    shared = {"redis_url": redis_url, "redis_prefix": f"poolrep{os.getpid()}:",
              "secret_key": "pool-test-secret", "pool": ["default=1"], "admin_token": ADMIN,
              "pool_warm_kernel": False, "pool_check_interval": 0.2}
    first = await make_broker(**shared)
    second = await make_broker(**shared)
    [mine] = await filled(first, "default", 1)
    [theirs] = await filled(second, "default", 1)
    assert mine != theirs  # each replica keeps its own entry (a local server lives beside it)
    # A visitor on the second replica gets the second replica's server, never the first's.
    _, data = await second.create(wait=False)
    assert data["id"] == theirs and theirs in second.app[appkeys.BACKEND].pids()
    assert (await first.store.get(mine)).pooled  # still waiting on the first replica
