"""session-broker: run the service, print its configuration reference, try a running broker,
or serve its sandboxes as MCP tools."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import textwrap
from typing import Any, TextIO

from aiohttp import web
from pydantic import ValidationError

from broker import __version__, appkeys
from broker.logs import AccessLogger, configure
from broker.settings import Settings, describe_errors, settings_reference, unknown_variables

log = logging.getLogger("broker")


def _print_config(markdown: bool) -> None:
    rows = settings_reference()
    if markdown:
        print("| env | default | description |\n|---|---|---|")
        for env, default, description in rows:
            print(f"| `{env}` | `{default}` | {description} |")
        return
    for env, default, description in rows:
        print(f"{env}  (default: {default or 'empty'})")
        # Plain text for a terminal: the descriptions' Markdown `code` marks go.
        print(textwrap.indent(textwrap.fill(description.replace("`", ""), 76), "    "))
        print()


def _serve(settings: Settings) -> None:
    configure(settings.log_level, settings.log_format)
    for warning in unknown_variables(os.environ):
        log.warning("%s", warning)
    try:
        import uvloop  # optional speed-up, in the "speed" extra

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    asyncio.run(_run(settings))


async def _run(settings: Settings) -> None:
    """Listen, announce the real address, wait for SIGTERM/SIGINT, shut down gracefully."""
    from broker.app import create_app  # imported late: `config` must not need aiohttp apps
    from broker.edge import AcceptErrorLog, Edge

    runner = web.AppRunner(
        create_app(settings),
        access_log_class=AccessLogger,
        handle_signals=False,
        # Handlers get the drain period plus a little to finish after 1001.
        shutdown_timeout=settings.shutdown_drain + 5,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The edge listens instead of a web.TCPSite: header/body timeouts and the
    # connection cap live in its connection protocol (see broker.edge).
    metrics = runner.app[appkeys.METRICS]
    edge = Edge(runner, settings, on_refusal=metrics.limit_refused,
                access_log_class=AccessLogger)
    ops: web.AppRunner | None = None
    try:
        host, port = await edge.listen(settings.host, settings.port)
        if settings.metrics_port is not None:
            # Scrapes are not visitors: a plain aiohttp site, no edge limits, no access log.
            from broker.api.health import create_ops_app

            ops = web.AppRunner(create_ops_app(runner.app), access_log=None)
            await ops.setup()
            await web.TCPSite(ops, settings.host, settings.metrics_port).start()
            log.info("metrics and versions on %s:%s", settings.host, ops.addresses[0][1])
        freeze_heap()
        base = open_url(settings, host, port)
        store = "Redis" if settings.redis_url else "in-memory store"
        log.info("session-broker %s listening on %s:%s (%s backend, %s)", __version__, host,
                 port, settings.backend, store)
        where = (f"all interfaces, port {port}" if host in _WILDCARD
                 else f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        lines = [f"Broker listening on {where}"]
        if settings.page != "off":
            lines.append(f"Open the live page:  {base}/")
        lines.append(f"Create a session:    curl -s -X POST '{base}/api/v1/sessions?wait=true'")
        lines.append(f"Or try it:           session-broker try --broker-url {base}")
        print("\n".join(lines), flush=True)
        if settings.backend == "local" and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the local backend runs every session's code as this broker's OS user: a "
                "kernel can read the broker's environment (its secrets) and reach other "
                "sessions' servers. Serve untrusted visitors through JupyterHub or BinderHub.")
        await stop.wait()
        log.info("shutting down: draining for up to %g s", settings.shutdown_drain)
    finally:
        await edge.close()
        if ops is not None:
            await ops.cleanup()
        await runner.cleanup()


def freeze_heap() -> int:
    """Move everything alive after start-up out of the garbage collector's sight.

    Why: modules, classes, settings, pools and clients live as long as the
    process, yet every full collection walks them all, and a full collection
    of the started broker's heap stops the event loop for tens of milliseconds:
    every request in flight waits that long (the REST proxy's p99 under load).
    Frozen (:func:`gc.freeze`), they are never walked again; what requests
    allocate is collected as before. Garbage is collected first: a frozen
    cycle could never be freed. Returns the number of objects frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


#: Listen-everywhere addresses: not places a browser can go.
_WILDCARD = ("0.0.0.0", "::", "", "*")


def open_url(settings: Settings, host: str, port: int) -> str:
    """A URL one can open: BROKER_PUBLIC_URL, else the listen address made reachable.

    ``0.0.0.0`` / ``::`` are listen-everywhere addresses, not places a
    browser can go; loopback reaches the same listener from this machine.
    """
    if settings.public_url:
        return settings.public_url
    if host in _WILDCARD:
        host = "::1" if host == "::" else "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _mcp(broker_url: str, api_key: str | None, http_port: int | None) -> int:
    """Run the MCP server; stdout is the protocol on stdio, so logs go to stderr."""
    try:
        from broker.agent import mcp
    except ImportError:
        print("session-broker mcp needs the MCP SDK: pip install 'jupyter-session-broker[mcp]'",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mcp.run(broker_url, api_key=api_key, http_port=http_port)
    return 0


class TryFailed(Exception):
    """A step of ``session-broker try`` was refused; the message is the broker's."""


async def _refusal(response: Any) -> TryFailed:
    try:
        body = await response.json(content_type=None)
        message = body.get("message") or body.get("reason")
    except ValueError:
        message = ""
    return TryFailed(f"HTTP {response.status}: {message or response.reason}")


class Progress:
    """Spawn progress: one rewritten line with a bar on a terminal, plain lines otherwise."""

    WIDTH = 24

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.percent = 0

    def show(self, event: dict[str, Any]) -> None:
        phase = str(event.get("phase") or "")
        message = str(event.get("message") or "").strip()
        if isinstance(event.get("progress"), int | float):
            self.percent = max(self.percent, min(100, int(event["progress"])))
        if phase == "ready":
            self.percent = 100
        if not self.tty:
            print(f"[{phase}] {message}" if message else f"[{phase}]", file=self.out, flush=True)
            return
        filled = self.WIDTH * self.percent // 100
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = f"[{bar}] {self.percent:3d}% {phase}: {message}"[:100]
        end = "\n" if phase in ("ready", "failed", "stopped", "error") else ""
        self.out.write(f"\r\x1b[K{line}{end}")
        self.out.flush()


def _print_output(event_name: str, data: dict[str, Any], out: TextIO, err: TextIO) -> None:
    """One execute stream event as a terminal shows a cell's output."""
    if event_name == "stream":
        (err if data.get("name") == "stderr" else out).write(str(data.get("text", "")))
    elif event_name in ("result", "display"):
        bundle = data.get("data") or {}
        text = bundle.get("text/plain")
        other = sorted(kind for kind in bundle if kind != "text/plain")
        out.write(f"{text}\n" if text is not None else f"<{', '.join(other)}>\n")
    elif event_name == "error":
        lines = data.get("traceback") or [f"{data.get('ename')}: {data.get('evalue')}"]
        err.write("\n".join(lines) + "\n")
    out.flush()
    err.flush()


async def try_broker(broker_url: str, code: str, out: TextIO = sys.stdout,
                     err: TextIO = sys.stderr) -> int:
    """Create a session, show its spawn progress, run ``code``, print its output, delete it.

    Only the public API: the first thing a newcomer can run against a broker,
    and a check that one works end to end. Exit status 0 when the code ran
    without error, 1 when it raised or a step was refused (the broker's
    message is printed).
    """
    import aiohttp

    from broker.sse import json_events

    base = broker_url.rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None,
                                                                   sock_connect=10)) as http:
        try:
            async with http.post(f"{base}/api/v1/sessions") as resp:
                if resp.status not in (200, 201):
                    raise await _refusal(resp)
                session = await resp.json()
        except aiohttp.ClientConnectionError as exc:
            print(f"session-broker try: cannot reach {base}: {exc}", file=err)
            return 1
        except TryFailed as exc:
            print(f"session-broker try: the broker refused a session: {exc}", file=err)
            return 1
        auth = {"Authorization": f"token {session['token']}"}
        url = f"{base}/api/v1/sessions/{session['id']}"
        print(f"Session {session['id']} ({session['backend']} backend)", file=out, flush=True)
        try:
            if session["status"] != "ready":
                progress = Progress(out)
                async with http.get(f"{url}/events", headers=auth) as resp:
                    if resp.status != 200:
                        raise await _refusal(resp)
                    async for event in json_events(resp.content):
                        progress.show(event)
                        if event.get("phase") in ("failed", "stopped", "error"):
                            raise TryFailed(str(event.get("message") or event.get("phase")))
                        if event.get("phase") == "ready":
                            break
            print(f">>> {code}", file=out, flush=True)
            status = "ok"
            async with http.post(f"{url}/execute", json={"code": code},
                                 headers=auth | {"Accept": "text/event-stream"}) as resp:
                if resp.status != 200:
                    raise await _refusal(resp)
                async for data in json_events(resp.content):
                    name = str(data.get("type"))  # the execute stream names its events here too
                    if name == "failed":
                        raise TryFailed(str(data.get("message")))
                    if name == "done":
                        status = str(data.get("status"))
                        break
                    _print_output(name, data, out, err)
            return 0 if status == "ok" else 1
        except TryFailed as exc:
            print(f"session-broker try: {exc}", file=err)
            return 1
        finally:
            async with http.delete(url, headers=auth) as resp:
                if resp.status == 204:
                    print(f"Session {session['id']} deleted", file=out, flush=True)


def _refuse(problems: list[str]) -> int:
    """Print why the configuration cannot run; the exit status of a configuration error."""
    lines = "\n".join(f"  {line}" for line in problems)
    print(f"session-broker: invalid configuration:\n{lines}\n"
          "(session-broker config lists every setting and what it accepts)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="session-broker", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--host", help="listen address (BROKER_HOST)")
    serve.add_argument("--port", type=int, help="listen port (BROKER_PORT)")
    config = commands.add_parser("config", help="print every setting, its default and meaning")
    config.add_argument("--markdown", action="store_true", help="as a Markdown table")
    mcp = commands.add_parser(
        "mcp", help="serve a broker's sandboxes as MCP tools (stdio, or HTTP with --http)")
    mcp.add_argument("--broker-url", default="http://127.0.0.1:8765",
                     help="the broker to use (default: %(default)s)")
    mcp.add_argument("--api-key", help="an API key of the broker's BROKER_API_KEYS")
    mcp.add_argument("--http", type=int, metavar="PORT",
                     help="serve streamable HTTP on 127.0.0.1:PORT/mcp instead of stdio")
    try_ = commands.add_parser(
        "try", help="create a session on a running broker, show its progress, run a snippet "
        "and print its output, then delete the session")
    try_.add_argument("--broker-url", default="http://127.0.0.1:8765",
                      help="the broker to use (default: %(default)s)")
    try_.add_argument("code", nargs="?", default="print(6*7)",
                      help="Python code to run (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.command == "config":
        _print_config(args.markdown)
        return 0
    if args.command == "mcp":
        return _mcp(args.broker_url, args.api_key, args.http)
    if args.command == "try":
        return asyncio.run(try_broker(args.broker_url, args.code))
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        return _refuse(describe_errors(exc) + unknown_variables(os.environ))
    from broker.backends.registry import backend_factory

    try:
        backend_factory(settings)  # an unknown name, or an installed one that does not import
    except ValueError as exc:
        return _refuse([str(exc), *unknown_variables(os.environ)])
    if settings.backend == "local":
        from broker.backends.local import missing_packages, missing_packages_message

        missing = missing_packages()
        if missing:
            print(f"session-broker: {missing_packages_message(missing)}", file=sys.stderr)
            return 2
    _serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
