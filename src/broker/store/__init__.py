"""Session storage: Redis for production, memory for the embedded default."""

from broker.store.base import SessionStore
from broker.store.crypto import TokenCipher

__all__ = ["SessionStore", "TokenCipher"]
