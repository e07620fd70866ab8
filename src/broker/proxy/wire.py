"""Which build of the relay's per-frame module runs: compiled when it is built, else Python.

``_wire_py.py`` is the one implementation; ``_wire_c`` is the same source
compiled by Cython at install time (``setup.py``), present only where Cython
and a C compiler were. The setting ``ws_relay_compiled`` (default on) lets an
operator run the interpreted module anyway, to rule the compiled one out
when chasing a problem; ``/versions`` and the ``broker_info`` metric say
which one runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from types import ModuleType

from broker.proxy import _wire_py


def _compiled_module() -> ModuleType | None:
    """``broker.proxy._wire_c`` when it is a built extension (not the Python source it
    is made from, which the same name finds where nothing was built)."""
    spec = importlib.util.find_spec("broker.proxy._wire_c")
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return importlib.import_module("broker.proxy._wire_c")


#: The compiled module, or None where the package was installed without one.
COMPILED: ModuleType | None = _compiled_module()
#: The interpreted module (always there).
PYTHON: ModuleType = _wire_py


def select(compiled: bool = True) -> ModuleType:
    """The module the relay runs: the compiled one when asked for and built."""
    return COMPILED if compiled and COMPILED is not None else PYTHON


def mode(compiled: bool = True) -> str:
    """``"compiled"`` or ``"python"``: what :func:`select` picks, for operators."""
    return "compiled" if select(compiled) is not PYTHON else "python"
