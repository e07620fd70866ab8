"""The deny list: refused outright, reloaded from its file without a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from broker import appkeys
from broker.policy.denylist import DenyList
from tests.limits.conftest import ORIGIN, MakeLimited, post_session


def set_file(path: Path, text: str, stamp: int) -> None:
    """Write the file with an explicit mtime (a change the stat check must see)."""
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))


async def test_denied_networks_are_refused_everywhere_but_probes(make_limited: MakeLimited) -> None:
    broker = await make_limited(deny_networks=["127.0.0.0/8"])
    status, headers, body = await post_session(broker)
    assert status == 403 and body == {"error": "denied", "reason": "denied",
                                      "message": body["message"]}
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    async with broker.http.get(f"{broker.url}/build/gh/o/r/HEAD",
                               headers={"Accept": "text/event-stream", "Origin": ORIGIN}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        event = json.loads((await resp.text()).split("data:", 1)[1])
    assert event["phase"] == "failed" and event["status_code"] == 403
    for probe in ("/health", "/metrics"):
        async with broker.http.get(broker.url + probe) as resp:
            assert resp.status == 200, probe
    assert await broker.store.count_live() == 0
    registry = broker.manager.metrics.registry
    assert registry.get_sample_value("broker_limit_refusals_total", {"reason": "denied"}) == 2


async def test_the_address_checked_is_the_resolved_client(make_limited: MakeLimited) -> None:
    broker = await make_limited(deny_networks=["198.51.100.0/24", "2001:db8:bad::/48"],
                                trusted_proxies=["127.0.0.1/32"])
    assert (await post_session(broker, headers={"X-Forwarded-For": "198.51.100.5"}))[0] == 403
    assert (await post_session(broker, headers={"X-Forwarded-For": "2001:db8:bad:1::5"}))[0] \
        == 403
    # Forging a clean address in front of the real one does not help.
    assert (await post_session(
        broker, headers={"X-Forwarded-For": "203.0.113.1, 198.51.100.5"}))[0] == 403
    assert (await post_session(broker, headers={"X-Forwarded-For": "203.0.113.1"}))[0] == 201


async def test_the_file_is_reloaded_without_a_restart(
    make_limited: MakeLimited, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deny_file = tmp_path / "deny.txt"
    set_file(deny_file, "# nobody yet\n", 1_000_000_000)
    broker = await make_limited(deny_list_file=str(deny_file), trusted_proxies=["127.0.0.1/32"])
    deny = broker.app[appkeys.DENY]
    client = {"X-Forwarded-For": "198.51.100.5"}
    assert (await post_session(broker, headers=client, spec="a"))[0] == 201

    set_file(deny_file, "198.51.100.0/24  # a mining farm\n\n203.0.113.7\n", 2_000_000_000)
    assert deny.reload() is True
    assert (await post_session(broker, headers=client, spec="b"))[0] == 403
    assert (await post_session(broker, headers={"X-Forwarded-For": "203.0.113.7"}))[0] == 403

    # A broken file keeps the list in force, and says why.
    set_file(deny_file, "198.51.100.0/24\nnot-a-network\n", 3_000_000_000)
    with caplog.at_level(logging.ERROR, logger="broker.policy.denylist"):
        assert deny.reload() is False
    assert "not-a-network" in caplog.text
    assert (await post_session(broker, headers=client, spec="c"))[0] == 403

    set_file(deny_file, "", 4_000_000_000)
    assert deny.reload() is True
    assert (await post_session(broker, headers=client, spec="d"))[0] == 201
    assert deny.reload() is False  # unchanged file: nothing to do


def test_lookups_match_networks_of_every_size() -> None:
    deny = DenyList(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "::ffff:0:0/96"])
    assert deny.denied("10.200.1.1") and deny.denied("192.0.2.1")
    assert not deny.denied("192.0.2.2") and not deny.denied("11.0.0.1")
    assert deny.denied("2001:db8:ffff::1") and not deny.denied("2001:db9::1")
    assert not deny.denied("garbage") and len(deny) == 4
    assert not DenyList().active and not DenyList().denied("10.0.0.1")
    with pytest.raises(ValueError, match=r"not an address or network"):
        DenyList(["10.0.0.0/33"])


async def test_the_broker_watches_the_file_by_itself(
    make_limited: MakeLimited, tmp_path: Path
) -> None:
    deny_file = tmp_path / "deny.txt"
    set_file(deny_file, "", 1_000_000_000)
    broker = await make_limited(deny_list_file=str(deny_file), deny_list_reload=0.02)
    deny = broker.app[appkeys.DENY]
    set_file(deny_file, "127.0.0.1\n", 2_000_000_000)
    # The reload loop has no event to await: poll its observable effect, bounded.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not deny.denied("127.0.0.1") and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert (await post_session(broker))[0] == 403
