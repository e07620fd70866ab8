"""The relay's per-frame cost alone, in CPU instructions: repeatable on a busy machine.

``make bench`` times whole processes, which a loaded machine blurs by tens of
percent. This feeds scenario b's round trip (a 200-byte JSON text frame from
the client, masked, and the same frame back from the kernel, unmasked)
through both :class:`~broker.proxy._wire_py.Pump` objects of one build of the
relay module, with no sockets, and with ``--callgrind`` counts the
instructions of the process under ``valgrind --tool=callgrind``: a run with
``N`` round trips minus a run with none, divided by ``N``. The count does not
move with the machine's load, so it compares two versions of the module
where a timing could not (it leaves out what the relay pays uvloop and the
kernel per read and write, which no change to this module touches).

Usage::

    .venv/bin/python bench/bench_wire.py [--python] [-n 2000] [--callgrind]

Without ``--callgrind`` it prints microseconds per round trip (wall clock:
only meaningful on an idle machine).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from bench_clients import text_payload
from broker.proxy import wire


def frames(w: ModuleType) -> tuple[bytes, bytes]:
    """One client frame (masked, as a browser sends it) and one kernel frame (plain)."""
    payload = text_payload(200).encode()
    key = os.urandom(4)
    head = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    client = head + key + w.mask(payload, key)
    kernel = bytes([0x81, 126]) + len(payload).to_bytes(2, "big") + payload
    return client, kernel


def round_trips(w: ModuleType, count: int) -> float:
    """Seconds for ``count`` round trips through the two pumps of one connection."""
    client, kernel = frames(w)
    sink: list[bytes] = []

    def nothing(*_args: object) -> None:
        pass

    tap = w.Tap()
    up = w.Pump(from_client=True, max_message=1 << 20, tap=tap, write=sink.append,
                on_error=nothing, on_delay=nothing, on_event=nothing)
    down = w.Pump(from_client=False, max_message=1 << 20, tap=tap, write=sink.append,
                  on_error=nothing, on_delay=nothing, on_event=nothing, quickack=nothing)
    to_kernel, to_client = up.feed, down.feed
    to_kernel(client)  # one of each first: both directions must take the frames whole
    to_client(kernel)
    if up.scanner.error or down.scanner.error or sink != [client, kernel]:
        raise RuntimeError("the pumps did not forward the benchmark's frames as they came")
    started = time.perf_counter()
    for _ in range(count):
        to_kernel(client)
        to_client(kernel)
        sink.clear()
    return time.perf_counter() - started


def instructions(build: str, count: int) -> int:
    """Instructions this script runs with ``count`` round trips, under callgrind."""
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--build", build, "-n", str(count)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", choices=["compiled", "python"], default="compiled",
                        help="which build of the relay module (compiled: the Cython one)")
    parser.add_argument("--python", dest="build", action="store_const", const="python",
                        help="the interpreted build (same as --build python)")
    parser.add_argument("-n", "--round-trips", type=int, default=2000)
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions under valgrind instead of timing")
    args = parser.parse_args(argv)
    module = wire.select(args.build == "compiled")
    if wire.mode(args.build == "compiled") != args.build:
        print(f"the {args.build} build is not installed", file=sys.stderr)
        return 1
    if args.callgrind:
        if shutil.which("valgrind") is None:
            print("valgrind is not installed", file=sys.stderr)
            return 1
        per = (instructions(args.build, args.round_trips) - instructions(args.build, 0)) \
            / args.round_trips
        print(f"{args.build}: {per:,.0f} instructions per round trip (client frame + kernel "
              f"frame, 200 B each; {args.round_trips} round trips, callgrind)")
    elif args.round_trips:
        seconds = round_trips(module, args.round_trips)
        print(f"{args.build}: {seconds / args.round_trips * 1e6:.2f} us per round trip "
              f"({args.round_trips} round trips, wall clock)")
    else:
        round_trips(module, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
