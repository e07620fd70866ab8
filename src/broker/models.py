"""Core value types: a brokered session and the progress events of its spawn.

A :class:`Session` is the only thing the broker remembers about a visitor. It
holds the upstream URL and token (the secret the broker never hands out) and
the hash of the broker token it did hand out. Stores serialise it with
:meth:`Session.to_record` / :meth:`Session.from_record`; the upstream token
is encrypted by the store's :class:`~broker.store.crypto.TokenCipher`, never
written in clear.

A session normally accepts one broker token. A ``/build`` reuse proven by the
broker's visitor cookie (no token presented) adds the hash of a freshly minted
token, so a visitor's later page loads can be handed a working token without
any token ever being stored in a recoverable form. At most
:data:`MAX_EXTRA_TOKENS` are added; none is ever dropped, so every token a
session was issued opens it for the session's whole life.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

#: A source of the current time in seconds since the epoch. Injected
#: everywhere time matters, so expiry and limits are testable without sleeping.
Clock = Callable[[], float]
system_clock: Clock = time.time
#: The shape of a name an operator gives a backend or a federation member: short,
#: lower-case, typed in configuration, and a metric label value (so a small set).
OPERATOR_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
#: Extra broker tokens a session accepts (one per cookie-proven /build reuse).
#: Bounded so a record cannot grow without limit. Once a session holds this
#: many, it is not handed out by cookie again (that visitor gets a new
#: session): dropping an old hash instead would log out a page still using it.
MAX_EXTRA_TOKENS = 10
#: The Jupyter session path that names a broker session's default kernel (the
#: execute API's; a warm pool entry starts it ahead). Not a file: Jupyter Server
#: only uses it as a key (the kernel's working directory is the server's root).
DEFAULT_KERNEL_PATH = "broker-execute"
#: thebe asks for ``python``; jupyter_client maps it to this kernel.
KERNEL_ALIASES = {"python": "python3"}
#: Owner of a warm pool's unclaimed entries: ``pool:<pool name>`` (``@<replica>``
#: appended where the pool is per replica). No client owner has this form
#: (owners are addresses, networks or ``key:<name>``), so no visitor can reuse one.
POOL_OWNER_PREFIX = "pool:"


class Status(enum.StrEnum):
    """Lifecycle of a session: pending -> ready -> stopped, or pending -> failed."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        """True for the states a session never leaves."""
        return self in (Status.FAILED, Status.STOPPED)


def new_session_id() -> str:
    """A short, URL-safe, unguessable id (it appears in URLs, so it is not a secret)."""
    return secrets.token_hex(8)


def new_token() -> str:
    """A broker session token: 256 bits, URL-safe, shown to the client exactly once."""
    return secrets.token_urlsafe(32)


def iso_utc(ts: float) -> str:
    """A clock time as the API shows it (ISO 8601, UTC, ``Z``): one format for the client
    view and the admin view of a session."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def hash_token(token: str) -> str:
    """What the store keeps instead of the token itself.

    A presented token may hold anything a client put in a header or query
    (undecodable bytes arrive as lone surrogates): it hashes all the same,
    and matches nothing, instead of failing to encode.
    """
    return hashlib.sha256(token.encode(errors="surrogatepass")).hexdigest()


@dataclasses.dataclass
class Session:
    """One visitor's isolated Jupyter server, as the broker knows it."""

    id: str
    token_hash: str
    owner: str
    backend: str
    created_at: float
    expires_at: float
    spec: str = ""
    profile: str = ""
    kernel_name: str = ""
    status: Status = Status.PENDING
    last_activity: float = 0.0
    upstream_url: str = ""
    upstream_token: str = dataclasses.field(default="", repr=False)
    #: Backend-private facts needed to stop or check the server later
    #: (process id, hub user name, ...). Never shown to clients.
    backend_state: dict[str, str] = dataclasses.field(default_factory=dict)
    message: str = ""
    ended_reason: str = ""
    #: Which visitor of the owner's address asked: on /build with
    #: BROKER_BUILD_VISITOR_COOKIE, an opaque hash of the page's Origin and the
    #: broker's visitor cookie (a secret only that browser holds); part of the
    #: reuse key. Empty otherwise.
    visitor: str = ""
    #: Hashes of further broker tokens minted for cookie-proven /build reuse.
    extra_token_hashes: list[str] = dataclasses.field(default_factory=list, repr=False)

    def token_matches(self, token: str) -> bool:
        """Constant-time check of a presented broker token against every accepted hash."""
        presented = hash_token(token)
        matched = hmac.compare_digest(self.token_hash, presented)
        for extra in self.extra_token_hashes:  # no early exit: timing says nothing
            matched |= hmac.compare_digest(extra, presented)
        return matched

    @property
    def tokens_full(self) -> bool:
        """True once no further token can be minted (see :data:`MAX_EXTRA_TOKENS`)."""
        return len(self.extra_token_hashes) >= MAX_EXTRA_TOKENS

    def add_token_hash(self, token_hash: str) -> bool:
        """Accept one more broker token; False (nothing changed) once the bound is reached.

        Refusing rather than forgetting the oldest keeps every issued token valid.
        """
        if self.tokens_full:
            return False
        self.extra_token_hashes = [*self.extra_token_hashes, token_hash]
        return True

    @property
    def pooled(self) -> bool:
        """True while this is an unclaimed warm pool entry (see :mod:`broker.pool`)."""
        return self.owner.startswith(POOL_OWNER_PREFIX)

    def expired(self, now: float) -> bool:
        """True once the session is past its max age."""
        return now >= self.expires_at

    @property
    def reuse_key(self) -> str:
        """Identifies "the same owner asking for the same thing" for session reuse."""
        parts = [self.owner, self.spec, self.profile, self.kernel_name]
        if self.visitor:  # appended only when set, so existing keys stay the same
            parts.append(self.visitor)
        material = json.dumps(parts)
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    def to_record(self, encrypt: Callable[[str], str]) -> dict[str, str]:
        """Flat string mapping for storage (a Redis hash); the upstream token encrypted."""
        record = {
            field.name: str(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in ("upstream_token", "backend_state", "status",
                                  "extra_token_hashes")
        }
        record["status"] = self.status.value
        record["extra_token_hashes"] = json.dumps(self.extra_token_hashes)
        record["backend_state"] = json.dumps(self.backend_state)
        record["upstream_token"] = encrypt(self.upstream_token) if self.upstream_token else ""
        return record

    @classmethod
    def from_record(cls, record: dict[str, str], decrypt: Callable[[str], str]) -> Session:
        """Inverse of :meth:`to_record`."""
        return cls(
            id=record["id"],
            token_hash=record["token_hash"],
            owner=record["owner"],
            backend=record["backend"],
            created_at=float(record["created_at"]),
            expires_at=float(record["expires_at"]),
            spec=record.get("spec", ""),
            profile=record.get("profile", ""),
            kernel_name=record.get("kernel_name", ""),
            status=Status(record.get("status", "pending")),
            last_activity=float(record.get("last_activity", 0) or 0),
            upstream_url=record.get("upstream_url", ""),
            upstream_token=(
                decrypt(record["upstream_token"]) if record.get("upstream_token") else ""
            ),
            backend_state=json.loads(record.get("backend_state") or "{}"),
            message=record.get("message", ""),
            ended_reason=record.get("ended_reason", ""),
            visitor=record.get("visitor", ""),
            extra_token_hashes=json.loads(record.get("extra_token_hashes") or "[]"),
        )


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    """One step of a spawn, relayed to clients on the session's event stream.

    ``phase`` follows BinderHub's vocabulary where it applies (``waiting``,
    ``launching``, ``ready``, ``failed``) so the same events can feed the
    BinderHub-compatible ``/build`` stream. A backend's final event is
    ``ready`` (with ``upstream_url`` and ``upstream_token``) or ``failed``.
    """

    phase: str
    message: str = ""
    progress: int | None = None
    upstream_url: str = ""
    upstream_token: str = dataclasses.field(default="", repr=False)
    backend_state: dict[str, str] = dataclasses.field(default_factory=dict)
    #: For ``failed``: the error a client should see (status, reason).
    status_code: int | None = None
    reason: str = ""

    def public(self) -> dict[str, Any]:
        """The client-visible form: never the upstream URL, token or backend state."""
        data: dict[str, Any] = {"phase": self.phase, "message": self.message}
        if self.progress is not None:
            data["progress"] = self.progress
        if self.status_code is not None:
            data["status_code"] = self.status_code
        if self.reason:
            data["reason"] = self.reason
        return data


@dataclasses.dataclass
class Readiness:
    """What ``/ready`` reports (see broker.api.health): whether this replica is
    draining, and the latest check of each dependency."""

    draining: bool = False
    #: One entry per dependency: service, dependency (metric label), ok, since, error.
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
