"""Fixtures of the relay tests.

``wire_module`` (parametrised): the relay's per-frame module, compiled and
interpreted. Every test that takes it runs on both, so the Cython build and
the Python source are held to the same behaviour. Where the package was
installed without a C compiler the compiled case fails, unless
``BROKER_TEST_NO_COMPILER=1`` says that is expected.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from broker.proxy import wire


@pytest.fixture(params=["compiled", "python"])
def wire_module(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "python":
        return wire.PYTHON
    if wire.COMPILED is None:
        if os.environ.get("BROKER_TEST_NO_COMPILER"):
            pytest.skip("installed without a C compiler: the Python module is the only one")
        raise RuntimeError("broker.proxy._wire_c is not built: `pip install -e .` with Cython "
                           "and a C compiler builds it (BROKER_TEST_NO_COMPILER=1 to test "
                           "without it)")
    return wire.COMPILED
