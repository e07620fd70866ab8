"""Backends: where sessions' Jupyter servers actually run."""

from broker.backends.base import Backend, LostCallback

__all__ = ["Backend", "LostCallback"]
