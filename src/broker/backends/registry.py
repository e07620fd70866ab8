"""Backends by name: what ``BROKER_BACKEND`` may say, and how each one is built.

A backend is a module with a factory, ``factory(context) -> Backend`` (see
:class:`~broker.backends.base.Backend`; the context,
:class:`~broker.backends.base.BackendContext`, holds the settings, the app's
HTTP client, its client to session servers, the clock and the replicas'
shared locks), registered under a name. The built-in ones (``local``,
``jupyterhub``, ``binderhub``) are named here; an installed package adds its
own through the entry-point group :data:`ENTRY_POINT_GROUP` in its
``pyproject.toml``::

    [project.entry-points."jupyter_session_broker.backends"]
    kubernetes = "my_package.k8s:create"

and code running in the broker's process (an embedding application, a test)
calls :meth:`BackendRegistry.register`. Either way, adding a backend is a
module and a name, never an edit of the app.

Factories are imported only when their name is chosen, so an installed
plugin that fails to import only matters to the broker configured to use it,
and listing the known names (for an error) imports nothing. The federation
(``BROKER_UPSTREAMS``) is not a name an operator picks: it is chosen by that
setting, and its members are the hub backends (see :func:`backend_factory`).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

from broker.models import OPERATOR_NAME

if TYPE_CHECKING:
    from broker.backends.base import Backend, BackendContext
    from broker.settings import Settings

#: Builds the configured backend once the app has its clients, clock and store.
BackendFactory = Callable[["BackendContext"], "Backend"]

#: The entry-point group installed packages name their backends in.
ENTRY_POINT_GROUP = "jupyter_session_broker.backends"

#: A backend's name is stored with every session and is a metric label value:
#: short, lower-case, and (as BROKER_BACKEND) typed by an operator.
NAME = re.compile(OPERATOR_NAME)

#: The name the federation's sessions carry; no registered backend may take it.
FEDERATION = "federation"

#: The built-in backends, named the same way an installed package names its own.
BUILTIN = (
    importlib.metadata.EntryPoint("local", "broker.backends.local:create", ENTRY_POINT_GROUP),
    importlib.metadata.EntryPoint("jupyterhub", "broker.backends.jupyterhub:create",
                                  ENTRY_POINT_GROUP),
    importlib.metadata.EntryPoint("binderhub", "broker.backends.binderhub:create",
                                  ENTRY_POINT_GROUP),
)


class UnknownBackend(ValueError):
    """BROKER_BACKEND names no registered backend; the message lists the known ones."""


class BackendRegistry:
    """Backend factories by name: registered in process, or entry points loaded on first use.

    A name can be taken once: a second registration (or an installed package
    claiming a built-in's name) is refused rather than silently replacing
    what the operator thinks they configured. The one exception is the same
    entry point seen twice (an editable install and a wheel of one package).
    """

    def __init__(self, entry_points: Iterable[importlib.metadata.EntryPoint] = BUILTIN,
                 *, discover: bool = True) -> None:
        """``entry_points``: the backends known from the start (the built-ins).
        ``discover``: also read :data:`ENTRY_POINT_GROUP` from the installed packages
        (once, on the first lookup)."""
        self._factories: dict[str, BackendFactory] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] = {}
        self._discover = discover
        self.add_entry_points(entry_points)

    def register(self, name: str, factory: BackendFactory) -> None:
        """Make ``name`` build its backend with ``factory``; ValueError if the name is taken."""
        self._check_free(name)
        self._factories[name] = factory

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a test's backend, when the test ends); a no-op if unknown."""
        self._factories.pop(name, None)
        self._entry_points.pop(name, None)

    def add_entry_points(self, entry_points: Iterable[importlib.metadata.EntryPoint]) -> None:
        """Register entry points (``name = "module:factory"``) without importing them."""
        for point in entry_points:
            known = self._entry_points.get(point.name)
            if known is not None and known == point:
                continue  # one package seen twice on the path
            self._check_free(point.name, f" (by entry point {point.value})")
            self._entry_points[point.name] = point

    def names(self) -> list[str]:
        """Every name BROKER_BACKEND may take, sorted."""
        self._discover_installed()
        return sorted({*self._factories, *self._entry_points})

    def factory(self, name: str) -> BackendFactory:
        """The factory registered as ``name``, importing its module if it is an entry point.

        Raises :class:`UnknownBackend` (listing the known names) for an unknown name,
        and ValueError when the entry point does not load to something callable.
        """
        self._discover_installed()
        factory = self._factories.get(name)
        point = self._entry_points.get(name)
        if factory is not None:
            return factory
        if point is None:
            raise UnknownBackend(f"BROKER_BACKEND={name!r} is not a known backend; known: "
                                 f"{', '.join(self.names())}")
        return _load(point)

    def _discover_installed(self) -> None:
        if not self._discover:
            return
        self._discover = False
        self.add_entry_points(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def _check_free(self, name: str, how: str = "") -> None:
        if not NAME.match(name) or name == FEDERATION:
            raise ValueError(f"backend name {name!r}{how}: lower-case letters, digits, '-' "
                             f"and '_', at most 32 characters, not {FEDERATION!r}")
        if name in self._factories or name in self._entry_points:
            raise ValueError(f"backend name {name!r}{how} is already registered")


def _load(point: importlib.metadata.EntryPoint) -> BackendFactory:
    """Import an entry point's factory; a broken plugin is named in the error."""
    try:
        loaded = point.load()
    except Exception as exc:  # ImportError, AttributeError, or the module's own failure
        raise ValueError(f"backend {point.name!r} ({point.value}) cannot be loaded: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not callable(loaded):
        raise ValueError(f"backend {point.name!r} ({point.value}) is not a factory "
                         "(a callable taking a BackendContext)")
    return cast("BackendFactory", loaded)


#: The process's registry: the built-ins and every installed package's backends.
registry = BackendRegistry()


def backend_factory(settings: Settings, backends: BackendRegistry | None = None
                    ) -> BackendFactory:
    """The factory the settings choose: the federation when BROKER_UPSTREAMS is set,
    else the backend BROKER_BACKEND names in ``backends`` (the process's registry).

    Called when the app is built, so a misspelt or missing backend stops the
    broker at start-up with the list of known names (:class:`UnknownBackend`).
    """
    if settings.upstreams.get_secret_value():
        from broker.backends import federation  # the hub backends it builds on, on demand

        return federation.create
    return (backends or registry).factory(settings.backend)
