"""The one build setting pyproject.toml cannot hold: the optional compiled relay module.

``broker/proxy/_wire_c.py`` is the kernel WebSocket relay's per-frame module
(``_wire_py.py``, the same file, says what it does). Where Cython and a C
compiler are there, ``pip install`` compiles it, with the C types of
``_wire_c.pxd``; where either is missing the package still installs and
runs the same code as Python (``broker.proxy.wire`` picks). Nothing is
written in C by hand.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def ext_modules() -> list[Extension]:
    """The compiled relay module, when Cython is importable (a build requirement, but an
    install from a source tree without build isolation may not have it)."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    extension = Extension("broker.proxy._wire_c", ["src/broker/proxy/_wire_c.py"])
    directives = {
        "language_level": 3,
        # Type hints stay hints: the .pxd says what is typed in C.
        "annotation_typing": False,
        "boundscheck": False,
        "wraparound": True,
    }
    return list(cythonize([extension], quiet=True, build_dir="build/cython",
                          compiler_directives=directives))


class OptionalBuildExt(build_ext):
    """Builds the compiled module where it can; a missing or failing C compiler only
    leaves it out (the package then runs the same module as Python)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, a missing compiler, ...: not fatal
            print(f"warning: {ext.name} not compiled ({exc}); the relay runs as Python",
                  file=sys.stderr)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
