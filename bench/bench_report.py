"""The benchmark's tables and its verdict against the issue's targets.

Four Markdown tables (throughput and latency per target with ratios; CPU
per round trip per process; the notebook cell with ``@jupyterlab/services``;
the idle footprint) and a verdict block. Ratios
are ``<target>/direct`` for every proxy and ``<target>/chp`` for every
other proxy, computed within one run: only those are comparable on a shared
machine. The verdict is informative: it never changes the exit status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bench_cell import CellResult
from bench_clients import Result
from bench_idle import IdleResult

#: CPU roles, in column order.
ROLES = ("client", "upstream", "kernel", "proxy", "store")
#: Scenarios where the proxy's CPU per round trip is held against CHP's.
CPU_SCENARIOS = ("a", "b", "c", "c64", "h1", "h64")
#: Issue targets: small frames on 64 connections (b) cost the proxy at most this
#: times the upstream's own CPU.
SMALL_FRAME_SCENARIO = "b"
WS_CPU_MAX = 1.3
C64_THROUGHPUT_MIN = 1.3
KERNEL_P50_MAX_MS = 10.0
CELL_P50_MAX_MS = 8.0
IDLE_KIB_MAX = 10.0
#: The byte-copying relay (``--floor``): shown beside the targets it bounds, never judged.
FLOOR = "raw"


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2g}"


def throughput_metric(scenario: str) -> tuple[str, str]:
    """(label, Result attribute) of a scenario's throughput."""
    if scenario.startswith("c"):
        return "MiB/s", "mib_per_s"
    if scenario.startswith("h"):
        return "requests/s", "rate"
    return "round trips/s", "rate"


def metrics(scenario: str) -> list[tuple[str, str]]:
    """(label, Result attribute or percentile) rows shown for a scenario."""
    return [throughput_metric(scenario), ("p50 ms", "p50"), ("p99 ms", "p99")]


def value(result: Result, key: str) -> float:
    if key == "p50":
        return result.percentile(0.50)
    if key == "p99":
        return result.percentile(0.99)
    return float(getattr(result, key))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def ratio_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Every proxy against direct, then every other proxy against chp."""
    proxies = [n for n in names if n != "direct"]
    pairs = [(n, "direct") for n in proxies if "direct" in names]
    pairs += [(n, "chp") for n in proxies if n != "chp" and "chp" in names]
    return pairs


def proxy_share(result: Result) -> float | None:
    """The proxy's CPU per round trip over the upstream's."""
    return ratio(result.cpu_per_round_trip("proxy"), result.cpu_per_round_trip("upstream"))


def report(scenarios: Sequence[str], labels: Mapping[str, str],
           results: Sequence[Result]) -> str:
    names = list(dict.fromkeys(r.target for r in results))
    pairs = ratio_pairs(names)
    by = {(r.scenario, r.target): r for r in results}
    lines = [
        "| id | scenario | metric | " + " | ".join(names) + " | "
        + " | ".join(f"{a}/{b}" for a, b in pairs) + " |",
        "|---|---|---|" + "---:|" * (len(names) + len(pairs)),
    ]
    for scenario in scenarios:
        for metric, key in metrics(scenario):
            values = {n: value(by[scenario, n], key) if (scenario, n) in by else None
                      for n in names}
            lines.append(f"| {scenario} | {labels[scenario]} | {metric} | "
                         + " | ".join(fmt(values[n]) for n in names) + " | "
                         + " | ".join(fmt(ratio(values[a], values[b])) for a, b in pairs)
                         + " |")
    lines += [
        "",
        "CPU per round trip (microseconds of CPU time, all threads, over the measured window):",
        "",
        "| id | target | round trips | seconds | " + " | ".join(ROLES) + " | proxy/upstream |",
        "|---|---|---:|---:|" + "---:|" * (len(ROLES) + 1),
    ]
    for r in results:
        cpu = {role: r.cpu_per_round_trip(role) for role in ROLES}
        lines.append(f"| {r.scenario} | {r.target} | {r.round_trips} | {r.seconds:.2f} | "
                     + " | ".join(fmt(cpu[role]) for role in ROLES)
                     + f" | {fmt(proxy_share(r))} |")
    return "\n".join(lines)


def cell_report(cells: Sequence[CellResult], results: Sequence[Result], d2_protocol: str) -> str:
    """The notebook cell per target and protocol, with d2's ``execute_request`` p50 beside it.

    d2 runs one protocol per run (``--kernel-protocol``), so its p50 sits on
    the rows of that protocol only.
    """
    d2 = {r.target: r.percentile(0.50) for r in results if r.scenario == "d2"}
    lines = [
        "Notebook cell with @jupyterlab/services under node: "
        "`kernel.requestExecute({code: '1'}).done` (execute_reply and iopub idle), each "
        "target with its own kernel; d2 = this run's execute_request p50 on the same target:",
        "",
        "| target | protocol | cells | p50 ms | p95 ms | min ms | max ms "
        "| d2 execute_request p50 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cells:
        beside = d2.get(r.target) if r.protocol == d2_protocol else None
        lines.append(f"| {r.target} | {r.protocol} | {len(r.samples_ms)} | "
                     f"{fmt(r.percentile(0.50))} | {fmt(r.percentile(0.95))} | "
                     f"{fmt(r.minimum)} | {fmt(r.maximum)} | {fmt(beside)} |")
    return "\n".join(lines)


def idle_report(idle: Sequence[IdleResult]) -> str:
    lines = [
        "Idle footprint (kernel WebSockets held open to the echo upstream; "
        "RSS from /proc/<pid>/status):",
        "",
        "| target | connections | opened | open s | proxy RSS before MiB | proxy RSS open MiB "
        "| proxy KiB per connection | proxy RSS after close MiB | upstream KiB per connection |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in idle:
        lines.append(f"| {r.target} | {r.requested} | {r.opened} | {r.seconds_to_open:.1f} | "
                     f"{fmt(r.proxy_before_kib / 1024)} | {fmt(r.proxy_open_kib / 1024)} | "
                     f"{fmt(r.proxy_per_connection_kib)} | {fmt(r.proxy_closed_kib / 1024)} | "
                     f"{fmt(r.upstream_per_connection_kib)} |")
        if r.error:
            lines.append(f"\n{r.target}: opening stopped at the first refusal: {r.error}")
    return "\n".join(lines)


def spread(values: Sequence[float | None]) -> str:
    """`` (rounds lo-hi)``: the range of a figure over a run's interleaved rounds ("" for one)."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if len(known) < 2:
        return ""
    return f" (rounds {fmt(min(known))}-{fmt(max(known))})"


def round_ratios(a: Result, b: Result, key: str) -> list[float | None]:
    """``a``/``b`` of ``key`` round by round (round n of each ran in the same rotation)."""
    return [ratio(value(x, key), value(y, key)) for x, y in zip(a.rounds, b.rounds, strict=False)]


def _line(met: bool | None, text: str) -> str:
    """One verdict line; ``met`` None means the scenarios it needs were not run."""
    if met is None:
        return f"- [n/a] {text.split(':')[0]}: not run"
    return f"- [{'met' if met else 'NOT met'}] {text}"


def _throughput_ratios(by: Mapping[tuple[str, str], Result], scenarios: Sequence[str],
                       target: str, reference: str) -> dict[str, tuple[float | None, str]]:
    """``target``'s throughput over ``reference``'s in each scenario both ran, with the
    range over the rounds (as :func:`spread` writes it)."""
    ratios: dict[str, tuple[float | None, str]] = {}
    for s in scenarios:
        if (s, target) in by and (s, reference) in by:
            _label, key = throughput_metric(s)
            ratios[s] = (ratio(value(by[s, target], key), value(by[s, reference], key)),
                         spread(round_ratios(by[s, target], by[s, reference], key)))
    return ratios


def _share_with_rounds(result: Result) -> str:
    """A result's proxy CPU over the upstream's, with its range over the rounds."""
    return f"{fmt(proxy_share(result))}x" + spread([proxy_share(r) for r in result.rounds])


def verdict(results: Sequence[Result], idle: Sequence[IdleResult], client_ack: str,
            cells: Sequence[CellResult] = (), proxy: str = "broker",
            reference: str = "chp") -> str:
    """The issue's targets for ``proxy``, each met / not met with this run's numbers."""
    by = {(r.scenario, r.target): r for r in results}
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    out = [f"Verdict for {proxy} against the issue's targets (this run only; informative):", ""]

    cpu = [(s, by[s, proxy].cpu_per_round_trip("proxy"), by[s, reference].cpu_per_round_trip(
        "proxy")) for s in CPU_SCENARIOS if (s, proxy) in by and (s, reference) in by]
    out.append(_line(
        all(a is not None and b is not None and a < b for _, a, b in cpu) if cpu else None,
        f"proxy CPU per round trip below {reference}'s in every scenario: "
        + ", ".join(f"{s} {fmt(a)} vs {fmt(b)} us" for s, a, b in cpu)))

    s = SMALL_FRAME_SCENARIO
    share = proxy_share(by[s, proxy]) if (s, proxy) in by else None
    others = ", ".join(f"{o} {fmt(proxy_share(by[o, proxy]))}x" for o in ("a", "c", "c64")
                       if (o, proxy) in by)
    out.append(_line(
        None if share is None else share <= WS_CPU_MAX,
        f"WS small frames x 64 connections proxy CPU <= {WS_CPU_MAX}x the upstream's: "
        + (f"{s} {_share_with_rounds(by[s, proxy])}" if (s, proxy) in by else f"{s} -x")
        + (f" ({others})" if others else "")
        + (f"; {reference} {fmt(proxy_share(by[s, reference]))}x" if (s, reference) in by
           else "")
        + (f"; {FLOOR} {_share_with_rounds(by[s, FLOOR])}" if (s, FLOOR) in by else "")))

    tput = _throughput_ratios(by, scenarios, proxy, reference)
    # The byte-copying relay's, where it ran: what a proxy in Python reaches with no
    # per-frame work at all (shown, never judged).
    floor = _throughput_ratios(by, scenarios, FLOOR, reference)
    known = [v for v, _rounds in tput.values() if v is not None]
    out.append(_line(
        all(v >= 1.0 for v in known) if known else None,
        f"throughput >= {reference}'s in every scenario ({proxy}/{reference}): "
        + ", ".join(f"{s} {fmt(v)}{rounds}" for s, (v, rounds) in tput.items())
        + (f"; {FLOOR}/{reference}: " + ", ".join(f"{s} {fmt(v)}" for s, (v, _r) in
                                                  floor.items()) if floor else "")))
    c64 = tput["c64"][0] if "c64" in tput else None
    out.append(_line(None if c64 is None else c64 >= C64_THROUGHPUT_MIN,
                     f"WS 1 MiB x 64 connections throughput >= {C64_THROUGHPUT_MIN}x "
                     f"{reference}'s: {fmt(c64)}x"))

    for s, what in (("d2", "execute_request"), ("d1", "kernel_info_request")):
        if (s, proxy) not in by:
            out.append(_line(None, f"kernel {what} p50 <= {KERNEL_P50_MAX_MS:g} ms: not run"))
            continue
        p50 = by[s, proxy].percentile(0.5)
        others = ", ".join(f"{n} {fmt(by[s, n].percentile(0.5))} ms" for n in ("direct", reference)
                           if (s, n) in by)
        out.append(_line(p50 <= KERNEL_P50_MAX_MS,
                         f"kernel {what} p50 <= {KERNEL_P50_MAX_MS:g} ms: {fmt(p50)} ms "
                         f"({others}; client ACKs: {client_ack})"))

    protocols = list(dict.fromkeys(c.protocol for c in cells))
    through = {c.protocol: c.percentile(0.5) for c in cells if c.target == proxy}
    ranges = {c.protocol: spread(c.round_p50_ms) for c in cells if c.target == proxy}
    direct = {c.protocol: c.percentile(0.5) for c in cells if c.target == "direct"}
    out.append(_line(
        all(p in through and through[p] <= CELL_P50_MAX_MS for p in protocols)
        if protocols else None,
        f"notebook cell p50 <= {CELL_P50_MAX_MS:g} ms (@jupyterlab/services "
        f"requestExecute('1').done, {' and '.join(protocols)}): "
        + ", ".join(f"{p} {fmt(through.get(p))} ms{ranges.get(p, '')}" for p in protocols)
        + " (direct: " + ", ".join(f"{p} {fmt(direct.get(p))} ms" for p in protocols) + ")"))

    mine = [r for r in idle if r.target == proxy]
    if mine:
        r = mine[0]
        out.append(_line(r.opened == r.requested and r.proxy_per_connection_kib <= IDLE_KIB_MAX,
                         f"idle: {r.opened} of {r.requested} kernel WebSockets open, RSS growth "
                         f"{fmt(r.proxy_per_connection_kib)} KiB per client+upstream pair "
                         f"(target <= {IDLE_KIB_MAX:g})"))
    else:
        out.append(_line(None, "idle footprint: not run"))
    return "\n".join(out)
