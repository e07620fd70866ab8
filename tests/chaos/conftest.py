"""The fault suite: bounded fault injection against real processes on loopback.

Every test here carries the ``chaos`` marker (added below) and records one row
of the operators' fault table with the ``fault_table`` fixture
(:mod:`tests.faulttable`; the fixture is available in every test directory, so
a fault test that needs the shared JupyterHub lives in ``tests/hub/`` with
``@pytest.mark.chaos``). Each test bounds itself: its processes are stopped by
PID, its waits have deadlines, and it sends traffic to 127.0.0.1 only.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/chaos/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.chaos)
