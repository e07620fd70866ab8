"""BROKER_REDIS_URL forms (TLS, Sentinel), replication acknowledgement and session-end
announcements, against real redis-server processes on loopback.

The failover under load is :mod:`tests.chaos.test_redis_failover`.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from broker.errors import Unavailable
from broker.models import Session
from broker.settings import Settings, describe_errors
from broker.store.connect import check_redis_url, parse_sentinel_url
from broker.store.crypto import TokenCipher
from broker.store.redis import RedisStore
from tests.conftest import eventually, free_port
from tests.redisproc import RedisProcess


def _session(now: float = 1_800_000_000.0) -> Session:
    return Session(id=uuid.uuid4().hex[:12], token_hash="h", owner="o", backend="local",
                   created_at=now, expires_at=now + 600, spec="s")


def _store(url: str, *, wait_replicas: int = 0, wait_timeout: float = 1.0) -> RedisStore:
    return RedisStore(url, TokenCipher("ha-test"), prefix=f"t{uuid.uuid4().hex[:8]}:",
                      clock=lambda: 1_800_000_000.0, wait_replicas=wait_replicas,
                      wait_timeout=wait_timeout)


# -- URL forms ------------------------------------------------------------------------------
def test_sentinel_urls_name_hosts_service_db_and_passwords() -> None:
    target = parse_sentinel_url("redis+sentinel://:pw%40x@10.0.0.1:26379,[::1]:26380/cache/3"
                                "?sentinel_password=sp&ssl_ca_certs=/ca.pem")
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (target.service, target.db, target.password) == ("cache", 3, "pw@x")
    assert target.sentinel_password == "sp" and target.options == {"ssl_ca_certs": "/ca.pem"}
    assert not target.tls and parse_sentinel_url("rediss+sentinel://h:1/m").tls


@pytest.mark.parametrize("url", [
    "redis+sentinel://h1/m",            # no port
    "redis+sentinel://h1:26379/",       # no service name
    "redis+sentinel://h1:26379/m/x",    # db is not a number
    "redis+sentinel://h1:26379/m/0/9",  # too many parts
    "http://h1:6379/0",
])
def test_malformed_redis_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_redis_url(url)


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url="redis+sentinel://:hunter2@h1/m", secret_key="k")
    lines = describe_errors(caught.value)
    assert any(line.startswith("BROKER_REDIS_URL") for line in lines), lines
    assert "hunter2" not in "\n".join(lines)


# -- TLS --------------------------------------------------------------------------------------
def _pem_pair(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
              *, ca: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS (a private CA), and that CA's certificate."""
    work = tmp_path_factory.mktemp("tls")
    ca = _pem_pair("broker test CA", None, ca=True)
    server = _pem_pair("127.0.0.1", ca, ca=False)
    _write(work / "ca", ca[0], None)
    _write(work / "server", *server)
    port = free_port()
    proc = RedisProcess(work, persistent=False, args=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(work / "server.crt"),
        "--tls-key-file", str(work / "server.key"), "--tls-ca-cert-file", str(work / "ca.crt"),
        "--tls-auth-clients", "no"])
    proc.start()
    try:
        yield port, work / "ca.crt"
    finally:
        proc.stop()


async def test_a_rediss_url_stores_sessions_over_verified_tls(
    tls_redis: tuple[int, Path], tmp_path: Path
) -> None:
    port, ca_file = tls_redis
    store = _store(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_file}")
    try:
        session = _session()
        await store.create(session)
        stored = await store.get(session.id)
        assert stored is not None and stored.owner == "o"
    finally:
        await store.close()
    # A certificate from another CA is refused: the store is unavailable, not silently
    # trusted (and a plain redis:// URL cannot talk to a TLS port either).
    other_ca = _pem_pair("another CA", None, ca=True)
    _write(tmp_path / "other", other_ca[0], None)
    for url in (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'other.crt'}",
                f"redis://127.0.0.1:{port}/0"):
        wrong = _store(url)
        try:
            with pytest.raises(Unavailable) as caught:
                await wrong.get("x")
            assert caught.value.reason == "store_unavailable"
        finally:
            await wrong.close()


async def test_a_rediss_sentinel_url_finds_the_primary_over_tls(
    tls_redis: tuple[int, Path], tmp_path: Path
) -> None:
    """Sentinel and primary both speak only TLS: rediss+sentinel:// verifies both."""
    port, ca_file = tls_redis
    work = ca_file.parent
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port 0\nbind 127.0.0.1\ndir {tmp_path}\ntls-port {sentinel_port}\n"
        f"tls-cert-file {work / 'server.crt'}\ntls-key-file {work / 'server.key'}\n"
        f"tls-ca-cert-file {ca_file}\ntls-auth-clients no\ntls-replication yes\n"
        f"sentinel monitor tlsha 127.0.0.1 {port} 1\n")
    sentinel = subprocess.Popen([shutil.which("redis-server") or "redis-server", str(conf),
                                 "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    store = _store(f"rediss+sentinel://127.0.0.1:{sentinel_port}/tlsha/0?ssl_ca_certs={ca_file}")
    plain = _store(f"redis+sentinel://127.0.0.1:{sentinel_port}/tlsha/0")
    try:
        async def answers() -> bool:
            try:
                await store.ping()
            except Unavailable:
                return False  # the sentinel is still starting
            return True

        await eventually(answers, 20)
        session = _session()
        await store.create(session)
        stored = await store.get(session.id)
        assert stored is not None and stored.owner == "o"
        with pytest.raises(Unavailable):  # without TLS the sentinel cannot be asked
            await plain.get(session.id)
    finally:
        await store.close()
        await plain.close()
        sentinel.kill()
        sentinel.wait(10)


# -- replication acknowledgement -----------------------------------------------------------
async def test_session_writes_wait_for_a_replica_and_go_on_without_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    primary = RedisProcess(tmp_path / "p", persistent=False)
    primary.start()
    replica = RedisProcess(tmp_path / "r", persistent=False,
                           args=["--replicaof", "127.0.0.1", str(primary.port)])
    replica.start()
    store = _store(primary.url, wait_replicas=1, wait_timeout=0.3)
    reader = aioredis.Redis(port=replica.port, host="127.0.0.1", decode_responses=True)
    try:
        async def linked() -> bool:
            return (await reader.info("replication")).get("master_link_status") == "up"

        await eventually(linked, 20)
        session = _session()
        await store.create(session)
        # Acknowledged means on the replica when create returns: read it there at once.
        assert await reader.hget(f"{store.prefix}s:{session.id}", "owner") == "o"
        replica.stop()
        with caplog.at_level(logging.WARNING, logger="broker.store.redis"):
            second = _session()
            await store.create(second)  # stands without a replica, after the wait
            await store.create(_session())
        assert await store.get(second.id) is not None
        warnings = [r for r in caplog.records if "acknowledged" in r.getMessage()]
        assert len(warnings) == 1, "logged once per change, not per write"
        # The replica is back: writes are acknowledged again (and waited for in full).
        replica.start()
        await eventually(linked, 20)
        third = _session()

        async def acknowledged_again() -> bool:
            await store.save(third)
            return any("again" in r.getMessage() for r in caplog.records)

        with caplog.at_level(logging.INFO, logger="broker.store.redis"):
            await store.create(third)
            await eventually(acknowledged_again, 20)
        assert await reader.hget(f"{store.prefix}s:{third.id}", "owner") == "o"
    finally:
        await reader.aclose()
        await store.close()
        replica.stop()
        primary.stop()


# -- session ends ---------------------------------------------------------------------------
async def test_an_announced_end_reaches_another_store_instance(redis_url: str) -> None:
    first = _store(redis_url)
    second = RedisStore(redis_url, TokenCipher("ha-test"), prefix=first.prefix)
    ends = second.follow_ends()
    try:
        assert await anext(ends) is None  # subscribed
        await first.announce_end("abc", "deleted")
        assert await anext(ends) == ("abc", "deleted")
    finally:
        await ends.aclose()
        await first.close()
        await second.close()
