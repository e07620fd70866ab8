"""The one build setting pyproject.toml cannot hold in a stable form: the C extension.

``broker.proxy._tap`` is the kernel WebSocket relay's fast path
(``src/broker/proxy/tap.py`` says why it exists). It is optional: without a
C compiler the package still installs, and runs the Python implementation
of the same thing.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("broker.proxy._tap", ["src/broker/proxy/_tap.c"], optional=True),
    ],
)
