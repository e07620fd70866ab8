"""Copy one benchmark run into docs/benchmark.md and the README's table.

Usage::

    make -s bench BENCH_ARGS="--json /tmp/run.json" > /tmp/run.txt
    .venv/bin/python bench/bench_docs.py /tmp/run.txt /tmp/run.json

The run's stdout replaces the fenced block under "## One run on this machine"
in docs/benchmark.md, and the README's "Proxy speed" table is rebuilt from the
same run's JSON with the report's own number format, so every figure in both
places comes from that one run and nothing is typed by hand. The prose around
them (which run, how loaded, the range of other runs) stays hand-written.
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
    start = lines.index(TABLE_HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + list(table) + lines[end:])


def replace_run(text: str, report: str) -> str:
    at = text.index(RUN_HEADING)
    match = re.compile(r"```\n.*?\n```", re.S).search(text, at)
    if match is None:
        raise ValueError(f"no fenced block after {RUN_HEADING!r}")
    return text[:match.start()] + "```\n" + report.strip("\n") + "\n```" + text[match.end():]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the run's stdout")
    parser.add_argument("json", type=Path, help="the run's --json file")
    args = parser.parse_args(argv)
    text = args.report.read_text()
    # `make bench` may print its set-up commands first: the report starts at its header.
    start = text.find("# proxy benchmark: ")
    if start < 0:
        parser.error(f"{args.report} is not a benchmark report")
    report = text[start:]
    run = json.loads(args.json.read_text())
    DOC.write_text(replace_run(DOC.read_text(), report))
    README.write_text(replace_table(README.read_text(), readme_table(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
