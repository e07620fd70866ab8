"""Copy one benchmark run into docs/benchmark.md and the README's table.

Usage::

    make -s bench BENCH_ARGS="--json /tmp/run.json" > /tmp/run.txt
    .venv/bin/python bench/bench_docs.py /tmp/run.txt /tmp/run.json

The run's stdout replaces the fenced block under "## One run on this machine"
in docs/benchmark.md, and the README's "Proxy speed" table is rebuilt from the
same run's JSON with the report's own number format, so every figure in both
places comes from that one run and nothing is typed by hand. The prose around
them (which run, how loaded, the range of other runs) stays hand-written.

The first-output benchmark (``make bench-first-output``, bench/bench_first_output.py)
is copied the same way, recognised by its header: its report replaces the
fenced block under "### First output of a new visitor: one run" and its JSON
the README's "First output" table::

    make -s bench-first-output BENCH_ARGS="--json /tmp/fo.json" > /tmp/fo.txt
    .venv/bin/python bench/bench_docs.py /tmp/fo.txt /tmp/fo.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_report import fmt

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmark.md"
README = ROOT / "README.md"
RUN_HEADING = "## One run on this machine"
TABLE_HEADER = "| scenario | direct | configurable-http-proxy | broker |"
#: README rows: label, scenario, key of the JSON result.
ROWS = (
    ("WS 200 B ping-pong, 1 conn (round trips/s)", "a", "round_trips_per_s"),
    ("WS 200 B ping-pong, 64 conns (round trips/s)", "b", "round_trips_per_s"),
    ("WS 1 MiB binary, 64 conns (MiB/s)", "c64", "mib_per_s"),
    ("HTTP GET api/kernels, 1 conn (req/s)", "h1", "round_trips_per_s"),
    ("HTTP GET api/kernels, 64 conns (req/s)", "h64", "round_trips_per_s"),
    ("kernel_info_request p50 (ms)", "d1", "p50_ms"),
    ("execute_request p50 (ms)", "d2", "p50_ms"),
)
TARGETS = ("direct", "chp", "broker")
FIRST_HEADER = "# first-output benchmark: "
FIRST_HEADING = "### First output of a new visitor: one run"
FIRST_TABLE_HEADER = ("| new visitor to print(1)'s output | pool | served | hits | p50 (ms) "
                      "| p95 (ms) |")


def first_output_table(run: dict[str, Any]) -> list[str]:
    """The README's first-output rows, one per (backend, pool hit or miss, client)."""
    lines = [FIRST_TABLE_HEADER, "|---|---|---:|---:|---:|---:|"]
    for r in run["results"]:
        lines.append(f"| {r['backend']}, {r['client']} | {r['mode']} | "
                     f"{r['served']}/{r['visitors']} | {r['hits']} | {fmt(r['p50_ms'])} | "
                     f"{fmt(r['p95_ms'])} |")
    return lines


def readme_table(run: dict[str, Any]) -> list[str]:
    by = {(r["scenario"], r["target"]): r for r in run["results"]}
    lines = [TABLE_HEADER, "|---|---:|---:|---:|"]
    for label, scenario, key in ROWS:
        if not any((scenario, t) in by for t in TARGETS):
            continue
        cells = [fmt(by[scenario, t][key]) if (scenario, t) in by else "-" for t in TARGETS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells_by = {(c["target"], c["protocol"]): c for c in run.get("cells", [])}
    for protocol in dict.fromkeys(c["protocol"] for c in run.get("cells", [])):
        values = [fmt(cells_by[t, protocol]["p50_ms"]) if (t, protocol) in cells_by else "-"
                  for t in TARGETS]
        lines.append(f"| notebook cell p50, @jupyterlab/services, {protocol} (ms) | "
                     + " | ".join(values) + " |")
    idle = {r["target"]: r for r in run.get("idle", [])}
    if idle:
        values = [fmt(idle[t]["proxy_per_connection_kib"]) if t in idle and t != "direct"
                  else "-" for t in TARGETS]
        lines.append("| idle kernel WebSocket (KiB each) | " + " | ".join(values) + " |")
    return lines


def replace_table(text: str, table: Sequence[str]) -> str:
    lines = text.split("\n")
    start = lines.index(table[0])
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + list(table) + lines[end:])


def replace_run(text: str, report: str, heading: str = RUN_HEADING) -> str:
    at = text.index(heading)
    match = re.compile(r"```\n.*?\n```", re.S).search(text, at)
    if match is None:
        raise ValueError(f"no fenced block after {heading!r}")
    return text[:match.start()] + "```\n" + report.strip("\n") + "\n```" + text[match.end():]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the run's stdout")
    parser.add_argument("json", type=Path, help="the run's --json file")
    args = parser.parse_args(argv)
    text = args.report.read_text()
    run = json.loads(args.json.read_text())
    first = text.find(FIRST_HEADER)
    if first >= 0:
        DOC.write_text(replace_run(DOC.read_text(), text[first:], FIRST_HEADING))
        README.write_text(replace_table(README.read_text(), first_output_table(run)))
        return 0
    # `make bench` may print its set-up commands first: the report starts at its header.
    start = text.find("# proxy benchmark: ")
    if start < 0:
        parser.error(f"{args.report} is not a benchmark report")
    report = text[start:]
    DOC.write_text(replace_run(DOC.read_text(), report))
    README.write_text(replace_table(README.read_text(), readme_table(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
