"""Encryption of upstream tokens at rest.

Upstream tokens are the one secret a store holds that would let its reader
act as a visitor's server. They are encrypted with a key derived from
``BROKER_SECRET_KEY`` (Fernet: AES-128-CBC + HMAC-SHA256), so a Redis dump or
``MONITOR`` session does not reveal them. Broker tokens are never stored at
all, only their hashes.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from cryptography.fernet import Fernet, InvalidToken


class TokenCipher:
    """Encrypts and decrypts short secrets with a key derived from a passphrase."""

    def __init__(self, secret: str | None = None) -> None:
        # An empty secret means "this process only" (memory store): random key.
        material = secret or secrets.token_hex(32)
        key = base64.urlsafe_b64encode(hashlib.sha256(material.encode()).digest())
        self._fernet = Fernet(key)

    def encrypt(self, plain: str) -> str:
        """Ciphertext as ASCII text, safe to store in a Redis hash."""
        return self._fernet.encrypt(plain.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        """Plain text; raises ``ValueError`` when the key does not match."""
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except InvalidToken as exc:
            raise ValueError(
                "cannot decrypt an upstream token: BROKER_SECRET_KEY differs between replicas"
            ) from exc
