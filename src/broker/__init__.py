"""jupyter-session-broker: per-visitor Jupyter kernels behind one brokering service."""

__version__ = "0.1.0"
