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

import hmac

from aiohttp import web

from broker.settings import OWNER_PREFIX, ApiKey, key_digest, parse_api_keys

#: The parsing lives with the setting (settings.py, a lower floor); callers keep importing here.
__all__ = ["OWNER_PREFIX", "ApiKey", "ApiKeys", "parse_api_keys"]

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
        digest = key_digest(presented)
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
