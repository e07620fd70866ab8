"""The local backend's session server: ``jupyter server`` with its start-up heap frozen.

``python -m broker.localserver ARGS`` is ``python -m jupyter_server ARGS``
(the same application, configuration and extensions) with one difference:
once the server is initialised (every extension imported and loaded), the
objects that exist then are moved out of the garbage collector's reach
(:func:`gc.freeze`) before the server starts taking requests.

Why: a freshly started ``jupyter server`` holds about 200,000 tracked
objects, nearly all of them modules, classes and configuration that live as
long as the process. Every full (generation 2) collection walks all of them
(60-70 ms on this project's shared 2-core test machine at load 4-5), and one
such collection fell right into a warm-pool visitor's first kernel
connection (the server's second WebSocket to that kernel) in nearly every
run. Frozen, a full collection walks only what the server allocated since (a
few thousand objects, about 1 ms). Nothing is lost:
frozen objects are never freed, and start-up objects never were either.
``docs/pool.md`` has the measurement.

This module is a leaf on purpose: it imports nothing of the broker, so the
session's server does not pay for importing the broker's own dependencies.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

#: Written to the server's log (stderr) once the heap is frozen; the tests look for it.
FROZEN_MESSAGE = "session-broker: froze the server's start-up heap"


def main(argv: Sequence[str] | None = None) -> None:
    """Run jupyter_server's ``ServerApp`` as its own ``launch_instance`` does, freezing the heap
    between ``initialize`` and ``start``."""
    from jupyter_core.application import NoStart
    from jupyter_core.utils import ensure_event_loop
    from jupyter_server.serverapp import ServerApp

    loop = ensure_event_loop()  # as JupyterApp.launch_instance: a loop before any other code
    app = ServerApp.instance()
    try:
        app.initialize(list(argv) if argv is not None else None)
        gc.collect()  # what is garbage now must not be frozen (it could never be freed)
        gc.freeze()
        print(f"{FROZEN_MESSAGE} ({gc.get_freeze_count()} objects)", file=sys.stderr, flush=True)
        app.start()
    except NoStart:
        return
    loop.close()


if __name__ == "__main__":
    main()
