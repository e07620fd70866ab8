"""API keys: an owner identity for agent platforms, with limits of its own.

Many agents of one platform share a handful of egress addresses, so per-IP
limits would either starve them or, sized for them, let anonymous visitors
through. A platform is given a key instead: a request to create a session
that carries ``Authorization: Bearer <key>`` belongs to the owner
``key:<name>`` and is held to that key's limits, not its address's.

``BROKER_API_KEYS`` is a JSON object, one entry per key::

    {"agents-inc": {"key_sha256": "<hex sha256 of the key>",
                    "max_sessions": 50, "max_creations": 600, "creation_window": 3600}}

``key_sha256`` is preferred (the configuration then holds no usable secret);
``key`` (the key itself) is accepted too. Limits left out fall back to
``BROKER_MAX_SESSIONS_PER_OWNER``, ``BROKER_MAX_CREATIONS_PER_OWNER`` and
``BROKER_CREATION_WINDOW``; 0 means unlimited, as for those settings.

Why the header does not also carry a session token here: clients reuse a
session by presenting its token in ``Authorization``; a key holder passes
that token as ``?token=`` instead. A bearer value that matches no key is
treated as a session token, exactly as before keys existed, so unknown keys
are not told apart from stale tokens (no oracle for guessing keys).
Cluster-wide limits (capacity, per-spec, spawns) and the deny list apply to
key holders like everyone else.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

#: Prefix of every owner identity that is an API key (an IP address never has it).
OWNER_PREFIX = "key:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_LIMITS = ("max_sessions", "max_creations", "creation_window")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its name (the owner identity) and its own limits (None = default)."""

    name: str
    digest: str
    max_sessions: int | None = None
    max_creations: int | None = None
    creation_window: float | None = None

    @property
    def owner(self) -> str:
        """The owner identity of sessions created with this key."""
        return OWNER_PREFIX + self.name


def _digest(key: str) -> str:
    # surrogatepass: a presented key with undecodable header bytes matches nothing.
    return hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()


def _entry(name: str, raw: Any) -> ApiKey:
    if not _NAME.match(name):
        raise ValueError(f"API key name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise ValueError(f"API key {name!r}: the entry must be a JSON object")
    unknown = set(raw) - {"key", "key_sha256", *_LIMITS}
    if unknown:
        raise ValueError(f"API key {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    if ("key" in raw) == ("key_sha256" in raw):
        raise ValueError(f"API key {name!r}: give exactly one of 'key' and 'key_sha256'")
    if "key" in raw:
        if not isinstance(raw["key"], str) or len(raw["key"]) < 16:
            raise ValueError(f"API key {name!r}: 'key' must be a string of 16+ characters")
        digest = _digest(raw["key"])
    else:
        digest = str(raw["key_sha256"]).lower()
        if not _HEX.match(digest):
            raise ValueError(f"API key {name!r}: 'key_sha256' must be 64 hex digits")
    limits: dict[str, Any] = {}
    for field in _LIMITS:
        value = raw.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"API key {name!r}: {field!r} must be a number >= 0")
        if field == "creation_window" and value <= 0:
            raise ValueError(f"API key {name!r}: 'creation_window' must be > 0")
        limits[field] = float(value) if field == "creation_window" else int(value)
    return ApiKey(name=name, digest=digest, **limits)


def parse_api_keys(text: str) -> dict[str, ApiKey]:
    """Keys by digest from ``BROKER_API_KEYS``; raises ValueError with a usable message."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"BROKER_API_KEYS is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("BROKER_API_KEYS must be a JSON object of name -> entry")
    keys: dict[str, ApiKey] = {}
    for name, raw in data.items():
        key = _entry(str(name), raw)
        if key.digest in keys:
            raise ValueError(f"API keys {keys[key.digest].name!r} and {name!r} are the same key")
        keys[key.digest] = key
    return keys


class ApiKeys:
    """The configured keys: look one up by what a client presented, or by owner."""

    def __init__(self, text: str = "") -> None:
        self._by_digest = parse_api_keys(text)
        self._by_owner = {key.owner: key for key in self._by_digest.values()}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def match(self, presented: str) -> ApiKey | None:
        """The key a presented secret is, if any.

        The lookup is by SHA-256 of the presented value: timing can at most
        reveal something about a hash prefix, never about a key.
        """
        if not presented or not self._by_digest:
            return None
        digest = _digest(presented)
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key

    def for_owner(self, owner: str) -> ApiKey | None:
        """The key behind an owner identity (``key:<name>``), if it is one."""
        if not owner.startswith(OWNER_PREFIX):
            return None
        return self._by_owner.get(owner)

    def from_request(self, request: web.BaseRequest) -> ApiKey | None:
        """The key a request presents as ``Authorization: Bearer <key>``, if any."""
        if not self._by_digest:
            return None
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.match(value.strip())
