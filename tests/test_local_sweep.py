"""Local backend servers against the store: sweeps, replicas, cleanup under EMFILE.

Real ``jupyter server`` processes, a real Redis, real brokers on loopback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.backends.base import Liveness, probe_server
from broker.models import Status
from broker.upstream.session import UpstreamAccess
from tests.brokerproc import broker_process
from tests.conftest import BrokerHarness, MakeBroker, marked_for, pid_alive, wait_for_exit


@contextlib.contextmanager
def no_descriptors_left() -> Iterator[None]:
    """This process cannot open another file descriptor until the block ends (EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        with pytest.raises(OSError) as full:
            while True:  # fill the holes below the limit too
                held.append(os.open(os.devnull, os.O_RDONLY))
        assert full.value.errno == errno.EMFILE
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _replicas(make_broker: MakeBroker, redis_url: str,
                    tmp_path: Path) -> tuple[BrokerHarness, BrokerHarness]:
    shared = {"redis_url": redis_url, "redis_prefix": f"t{uuid.uuid4().hex[:8]}:",
              "secret_key": "sweep-test"}
    a = await make_broker(local_root_dir=str(tmp_path / "a"), **shared)
    b = await make_broker(local_root_dir=str(tmp_path / "b"), **shared)
    return a, b


def _auth(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"token {session['token']}"}


async def test_two_local_replicas_over_one_redis_keep_each_others_sessions(
    make_broker: MakeBroker, redis_url: str, tmp_path: Path
) -> None:
    """B's reaper probes A's server instead of taking "not mine" for dead, and a
    delete through B stops A's server (found by its marker) and its directory."""
    a, b = await _replicas(make_broker, redis_url, tmp_path)
    session = await a.ready_session()
    stored = await a.store.get(session["id"])
    pid, workdir = int(stored.backend_state["pid"]), Path(stored.backend_state["workdir"])

    assert await b.manager.reap_once() == 0
    assert (await b.store.get(session["id"])).status is Status.READY
    assert pid_alive(pid)
    async with b.http.get(f"{b.url}/s/{session['id']}/api/kernels",
                          headers=_auth(session)) as resp:
        assert resp.status == 200  # B serves A's session

    async with b.http.delete(f"{b.url}/api/v1/sessions/{session['id']}",
                             headers=_auth(session)) as resp:
        assert resp.status == 204
    assert await wait_for_exit(pid)
    assert not workdir.exists()


async def test_a_server_whose_record_is_gone_is_stopped_by_the_sweep(
    make_broker: MakeBroker, redis_url: str, tmp_path: Path
) -> None:
    """Redis lost the record (flushed, restarted without persistence): the next
    sweep stops the server and removes its directory instead of keeping it for good."""
    a, b = await _replicas(make_broker, redis_url, tmp_path)
    session = await a.ready_session()
    kernel_session = await a.ready_session()
    await a.start_kernel(kernel_session)
    stored = await a.store.get(session["id"])
    pid, workdir = int(stored.backend_state["pid"]), Path(stored.backend_state["workdir"])
    await a.store.delete(session["id"])

    await b.manager.reap_once()  # another replica's sweep sees the orphan on this host
    assert await wait_for_exit(pid)
    assert not workdir.exists()
    kept = await a.store.get(kernel_session["id"])
    assert kept.status is Status.READY and pid_alive(int(kept.backend_state["pid"]))


async def test_memory_store_replicas_on_one_root_warn_instead_of_killing(
    make_broker: MakeBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two memory-store brokers on one root directory (unsupported): the second
    cannot know the first's sessions, so it says so and leaves its server alone."""
    root = str(tmp_path / "shared-root")
    a = await make_broker(local_root_dir=root)
    b = await make_broker(local_root_dir=root)
    session = await a.ready_session()
    pid = int((await a.store.get(session["id"])).backend_state["pid"])
    with caplog.at_level(logging.WARNING, logger="broker.backends.local"):
        await b.manager.reap_once()
        await b.manager.reap_once()
    warnings = [r.getMessage() for r in caplog.records if "another running broker" in
                r.getMessage()]
    assert len(warnings) == 1, warnings  # once per server, not once per sweep
    assert session["id"] in warnings[0]
    assert pid_alive(pid)
    assert (await a.store.get(session["id"])).status is Status.READY


async def test_a_probe_without_descriptors_is_cannot_check_not_dead(
    broker: BrokerHarness,
) -> None:
    """Our own EMFILE says nothing about the upstream: the probe is UNKNOWN."""
    session = await broker.ready_session()
    stored = await broker.store.get(session["id"])
    fresh = UpstreamAccess()  # no pooled connection to reuse
    try:
        assert await probe_server(fresh, stored.upstream_url, stored.upstream_token,
                                  5) is Liveness.ALIVE
    finally:
        await fresh.close()
    fresh = UpstreamAccess()
    try:
        with no_descriptors_left():
            seen = await probe_server(fresh, stored.upstream_url, stored.upstream_token, 5)
    finally:
        await fresh.close()
    assert seen is Liveness.UNKNOWN


async def test_cleanup_that_hits_emfile_is_retried_and_leaves_nothing(
    broker: BrokerHarness,
) -> None:
    """A stop whose cleanup cannot scan /proc (EMFILE) is retried later; the
    working directory and the kernels do not stay behind for good."""
    session = await broker.ready_session()
    await broker.start_kernel(session)
    stored = await broker.store.get(session["id"])
    workdir = Path(stored.backend_state["workdir"])
    with no_descriptors_left():
        await broker.manager.stop(stored, "deleted")
    # Which step ran out (the /proc scan, the directory walk) depends on which of our
    # descriptors the dying server freed; whatever was left is retried now.
    assert (await broker.store.get(session["id"], include_expired=True)).status \
        is Status.STOPPED  # recorded all the same
    assert await broker.manager.retry_cleanups() == 0
    assert not workdir.exists()
    leftovers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if marked_for(pid, session["id"])]
    assert leftovers == []


def _marked_pids(session_id: str) -> list[int]:
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if marked_for(pid, session_id)]


def _server_pids(session_id: str) -> list[int]:
    """The session's server process (``python -m broker.localserver``) among its marked
    ones: a server also runs short-lived helpers that carry the mark (``npm prefix -g``,
    a language-server probe), which end on their own whoever is watching."""
    servers = []
    for pid in _marked_pids(session_id):
        with contextlib.suppress(OSError):
            if b"broker.localserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                servers.append(pid)
    return servers


async def test_start_up_sweep_stops_what_a_killed_memory_store_broker_left(
    make_broker: MakeBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A memory-store broker SIGKILLed leaves its servers running (their records died
    with it); the next broker on the same root stops them at start-up, and says so."""
    root = tmp_path / "root"
    async with aiohttp.ClientSession() as http, \
            broker_process(tmp_path, {"BROKER_LOCAL_ROOT_DIR": str(root)}) as old:
        async with http.post(f"{old.url}/api/v1/sessions", params={"wait": "true"}) as resp:
            session = await resp.json()
            assert resp.status == 201, session
        orphans = _server_pids(session["id"])
        assert orphans
        old.proc.send_signal(signal.SIGKILL)
        await old.proc.wait()
    assert all(pid_alive(pid) for pid in orphans)  # nothing else would ever stop them
    with caplog.at_level(logging.WARNING, logger="broker.backends.local"):
        await make_broker(local_root_dir=str(root))  # its reaper sweeps at start-up
        for pid in orphans:
            assert await wait_for_exit(pid, 20)
    assert any(session["id"] in r.getMessage() and "no live session owns them" in
               r.getMessage() for r in caplog.records)
    assert not (root / session["id"]).exists()
