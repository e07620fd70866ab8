"""``session-broker``: run the service, or print its configuration reference."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import textwrap

from aiohttp import web
from pydantic import ValidationError

from broker import __version__
from broker.logs import AccessLogger, configure
from broker.settings import Settings, settings_reference

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
        print(textwrap.indent(textwrap.fill(description, 76), "    "))
        print()


def _serve(settings: Settings) -> None:
    configure(settings.log_level, settings.log_format)
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
    edge = Edge(runner, settings, access_log_class=AccessLogger)
    try:
        host, port = await edge.listen(settings.host, settings.port)
        base = settings.public_url or f"http://{host}:{port}"
        store = "Redis" if settings.redis_url else "in-memory store"
        log.info("session-broker %s listening on %s:%s (%s backend, %s)", __version__, host,
                 port, settings.backend, store)
        print(
            f"Broker listening on http://{host}:{port}\n"
            f"Create a session:  curl -s -X POST '{base}/api/v1/sessions?wait=true'",
            flush=True,
        )
        if settings.backend == "local" and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the local backend runs every session's code as this broker's OS user: a "
                "kernel can read the broker's environment (its secrets) and reach other "
                "sessions' servers. Serve untrusted visitors through JupyterHub or BinderHub.")
        await stop.wait()
        log.info("shutting down: draining for up to %g s", settings.shutdown_drain)
    finally:
        await edge.close()
        await runner.cleanup()


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
    args = parser.parse_args(argv)

    if args.command == "config":
        _print_config(args.markdown)
        return 0
    if args.command == "mcp":
        return _mcp(args.broker_url, args.api_key, args.http)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"session-broker: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    _serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
