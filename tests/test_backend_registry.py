"""Backends by name: a backend registered in process, or named by an entry point, runs a
broker's sessions end to end; unknown and broken names stop the broker with a clear error.

The backend under test is a real one: :class:`Wrapped` runs every session on the local
backend (a real ``jupyter server`` with ipykernel) and leaves its own mark in the
session's stored backend state, so the test can tell it was the one used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import broker
from broker import appkeys
from broker.app import create_app
from broker.backends import federation, local
from broker.backends.base import BackendContext, LostCallback
from broker.backends.registry import (
    ENTRY_POINT_GROUP,
    BackendRegistry,
    UnknownBackend,
    backend_factory,
    registry,
)
from broker.models import ProgressEvent, Session
from broker.settings import Settings
from tests.conftest import MakeBroker

#: What this module's backend writes into every session's stored state.
MARK = "wrapped_by"


class Wrapped:
    """A backend around the local one: same servers, its own name and state mark."""

    def __init__(self, inner: local.LocalBackend, name: str) -> None:
        self.inner = inner
        self.name = name
        self.stopped: list[str] = []

    @property
    def on_lost(self) -> LostCallback | None:
        return self.inner.on_lost

    @on_lost.setter
    def on_lost(self, callback: LostCallback | None) -> None:
        self.inner.on_lost = callback

    async def spawn(self, session: Session) -> AsyncIterator[ProgressEvent]:
        async for event in self.inner.spawn(session):
            if event.phase == "ready":
                event.backend_state[MARK] = self.name
            yield event

    async def stop(self, session: Session) -> None:
        self.stopped.append(session.id)
        await self.inner.stop(session)

    async def is_alive(self, session: Session) -> bool:
        return await self.inner.is_alive(session)

    async def health(self) -> None:
        await self.inner.health()

    async def close(self) -> None:
        await self.inner.close()


def create_wrapped(context: BackendContext) -> Wrapped:
    """This module's factory: what an installed package's entry point would name."""
    return Wrapped(local.create(context), context.settings.backend)


#: This module's factory as an installed package would declare it.
ENTRY_POINT = EntryPoint("wrapped-ep", f"{__name__}:create_wrapped", ENTRY_POINT_GROUP)


@pytest.fixture
def registered() -> Iterator[None]:
    """The process's registry with this module's backend, by both routes, for one test."""
    registry.register("wrapped", create_wrapped)
    registry.add_entry_points([ENTRY_POINT])
    yield
    registry.unregister("wrapped")
    registry.unregister("wrapped-ep")


@pytest.mark.parametrize("name", ["wrapped", "wrapped-ep"], ids=["registered", "entry-point"])
async def test_a_registered_backend_runs_sessions_end_to_end(
        registered: None, make_broker: MakeBroker, name: str) -> None:
    broker_ = await make_broker(backend=name)
    backend = broker_.app[appkeys.BACKEND]
    assert isinstance(backend, Wrapped)
    session = await broker_.ready_session()
    assert session["backend"] == name
    stored = await broker_.store.get(session["id"])
    assert stored.backend_state[MARK] == name  # this backend's spawn made the session
    url = f"{broker_.url}/api/v1/sessions/{session['id']}"
    auth = {"Authorization": f"token {session['token']}"}
    async with broker_.http.post(f"{url}/execute", json={"code": "print(6*7)"},
                                 headers=auth) as resp:
        out = await resp.json()
    assert out["status"] == "ok" and out["stdout"] == "42\n", out
    async with broker_.http.delete(url, headers=auth) as resp:
        assert resp.status == 204
    assert backend.stopped == [session["id"]]
    assert not await backend.inner.is_alive(stored)


def test_entry_points_are_loaded_only_when_chosen() -> None:
    names = BackendRegistry([EntryPoint("missing", "tests.no_such_module:create",
                                        ENTRY_POINT_GROUP), ENTRY_POINT], discover=False)
    assert names.names() == ["missing", "wrapped-ep"]  # listing imports nothing
    assert names.factory("wrapped-ep") is create_wrapped
    with pytest.raises(ValueError, match=r"'missing' \(tests.no_such_module:create\) cannot "
                                         r"be loaded: ModuleNotFoundError"):
        names.factory("missing")
    with pytest.raises(ValueError, match="is not a factory"):
        BackendRegistry([EntryPoint("constant", f"{__name__}:MARK", ENTRY_POINT_GROUP)],
                        discover=False).factory("constant")


def test_a_name_is_taken_once() -> None:
    names = BackendRegistry(discover=False)
    with pytest.raises(ValueError, match="'local' is already registered"):
        names.register("local", create_wrapped)
    with pytest.raises(ValueError, match=r"'local' \(by entry point other:create\) is already"):
        names.add_entry_points([EntryPoint("local", "other:create", ENTRY_POINT_GROUP)])
    # The same entry point again (a package seen twice on the path) is not a conflict.
    names.add_entry_points([EntryPoint("local", "broker.backends.local:create",
                                       ENTRY_POINT_GROUP)])
    assert names.names() == ["binderhub", "jupyterhub", "local"]
    for bad in ("federation", "Has-Caps", "x" * 33, ""):
        with pytest.raises(ValueError, match="lower-case letters"):
            names.register(bad, create_wrapped)


def test_the_settings_choose_the_factory() -> None:
    names = BackendRegistry(discover=False)
    assert names.names() == ["binderhub", "jupyterhub", "local"]
    assert backend_factory(Settings(), names) is local.create
    with pytest.raises(UnknownBackend) as caught:
        backend_factory(Settings(backend="kubernetes"), names)
    assert str(caught.value) == ("BROKER_BACKEND='kubernetes' is not a known backend; known: "
                                 "binderhub, jupyterhub, local")
    upstreams = '[{"name": "a", "backend": "binderhub", "binder_url": "http://a.invalid"}]'
    # BROKER_UPSTREAMS picks the federation whatever BROKER_BACKEND says (it is unused then).
    factory = backend_factory(Settings(upstreams=upstreams, backend="kubernetes"), names)
    assert factory is federation.create


def test_an_unknown_backend_stops_the_app_before_it_starts() -> None:
    with pytest.raises(UnknownBackend, match="known: binderhub, jupyterhub, local"):
        create_app(Settings(backend="kubernetes"))


def test_the_cli_names_the_known_backends(tmp_path: Path) -> None:
    src = str(Path(broker.__file__).parents[1])  # this checkout's broker, not an installed one
    proc = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--port", "0"],
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "PYTHONPATH": src, "BROKER_BACKEND": "kubernetes"},
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration" in proc.stderr
    assert "BROKER_BACKEND='kubernetes' is not a known backend; known: binderhub, " \
        "jupyterhub, local" in proc.stderr
    assert "Traceback" not in proc.stderr
