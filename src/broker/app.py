"""The application factory: one aiohttp app per broker replica.

Every resource the app owns (HTTP client, store, backend, session manager
and its reaper) is created and closed in a ``cleanup_ctx`` step, in that
order, so shutdown releases them in reverse: sessions' spawns are cancelled
before the backend stops its servers, and the store closes last.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from broker import appkeys
from broker.agent import execute, files
from broker.agent.kernel_client import warm_kernel
from broker.api import admin, gauges, health, openapi, sessions
from broker.api.build import routes as build_routes
from broker.api.middleware import errors_and_origin, observe, prepare_response
from broker.api.page import add_page
from broker.backends.base import BackendContext
from broker.backends.registry import BackendFactory, backend_factory
from broker.metrics import Metrics
from broker.models import Clock, Readiness, system_clock
from broker.policy.denylist import DenyList, deny_middleware
from broker.policy.identity import parse_networks
from broker.policy.kernels import KernelGate, kernels_busy
from broker.policy.wsrate import SessionWsBudgets
from broker.pool import WarmPool
from broker.proxy import routes as proxy_routes
from broker.proxy import wire
from broker.sessions import SessionManager
from broker.settings import Settings
from broker.store.base import SessionStore
from broker.store.crypto import TokenCipher
from broker.store.instrumented import InstrumentedStore
from broker.store.locks import ClusterLocks
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore
from broker.upstream.session import UpstreamAccess


def make_store(settings: Settings, clock: Clock) -> SessionStore:
    """Redis when configured, otherwise the single-replica memory store."""
    cipher = TokenCipher(settings.secret_key.get_secret_value())
    if settings.redis_url:
        return RedisStore(settings.redis_url, cipher, prefix=settings.redis_prefix, clock=clock,
                          wait_replicas=settings.redis_wait_replicas,
                          wait_timeout=settings.redis_wait_timeout)
    return MemoryStore(cipher, clock=clock)


async def _http_client(app: web.Application) -> AsyncIterator[None]:
    app[appkeys.HTTP] = aiohttp.ClientSession(
        # Upstream cookies must never be replayed to another session's server
        # (local servers share 127.0.0.1, and cookies ignore ports).
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )
    # Every request and WebSocket to a session's own server (see broker/upstream/).
    app[appkeys.UPSTREAM] = UpstreamAccess(
        connect_timeout=10.0, read_timeout=app[appkeys.SETTINGS].upstream_timeout)
    yield
    await app[appkeys.UPSTREAM].close()
    await app[appkeys.HTTP].close()


async def _store(app: web.Application) -> AsyncIterator[None]:
    if appkeys.STORE not in app:
        inner = make_store(app[appkeys.SETTINGS], app[appkeys.CLOCK])
        app[appkeys.STORE] = InstrumentedStore(inner, app[appkeys.METRICS])
    yield
    await app[appkeys.STORE].close()


async def _sessions(app: web.Application) -> AsyncIterator[None]:
    settings = app[appkeys.SETTINGS]
    store = app[appkeys.STORE]
    backend = app[appkeys.BACKEND_FACTORY](BackendContext(
        settings, app[appkeys.HTTP], app[appkeys.UPSTREAM], app[appkeys.CLOCK],
        # Per-user creation on a hub, one at a time across replicas.
        locks=ClusterLocks(store), metrics=app[appkeys.METRICS], live_sessions=store.list_live))
    manager = SessionManager(settings, store, backend, clock=app[appkeys.CLOCK],
                             metrics=app[appkeys.METRICS])
    backend.on_lost = manager.on_upstream_lost
    manager.busy_check = functools.partial(kernels_busy, app[appkeys.UPSTREAM])
    app[appkeys.BACKEND] = backend
    app[appkeys.MANAGER] = manager
    tasks = [
        asyncio.create_task(manager.run_reaper(), name="session-reaper"),
        asyncio.create_task(manager.follow_ends(), name="session-ends"),
        asyncio.create_task(gauges.track_sessions(manager), name="session-gauge"),
        asyncio.create_task(gauges.track_loop_lag(app[appkeys.METRICS]), name="loop-lag"),
    ]
    run: Callable[[], Coroutine[Any, Any, None]] | None = getattr(backend, "run", None)
    if run is not None:  # a backend's own background work (the federation's health checks)
        tasks.append(asyncio.create_task(run(), name=f"backend-{backend.name}"))
    # A local server lives beside its broker: with a shared store, each replica keeps a
    # pool of its own; other backends' pools are shared by all replicas. Without pools
    # it only serves the admin API's drain (entries left by an earlier BROKER_POOL).
    pool = app[appkeys.POOL] = WarmPool(
        manager, per_replica=backend.name == "local" and bool(settings.redis_url),
        warm_kernel=functools.partial(warm_kernel, app[appkeys.UPSTREAM], settings,
                                      app[appkeys.METRICS]))
    if pool.pools:
        manager.pool = pool
        tasks.append(asyncio.create_task(pool.run(), name="warm-pool"))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()
    await manager.close()
    await backend.close()


async def _drain(app: web.Application) -> None:
    """on_shutdown (after the listener closed): drain kernel WebSockets."""
    if appkeys.MANAGER in app:
        await app[appkeys.MANAGER].drain(app[appkeys.SETTINGS].shutdown_drain)


async def _limits(app: web.Application) -> AsyncIterator[None]:
    """The kernels-per-session gate and the deny list's reload loop."""
    settings = app[appkeys.SETTINGS]
    if settings.max_kernels_per_session:
        app[appkeys.KERNEL_GATE] = KernelGate(
            settings.max_kernels_per_session, app[appkeys.STORE], app[appkeys.UPSTREAM],
            timeout=settings.upstream_timeout,
            on_refusal=lambda: app[appkeys.MANAGER].metrics.limit_refused("kernels_per_session"))
    watcher = None
    if settings.deny_list_file:
        watcher = asyncio.create_task(app[appkeys.DENY].watch(settings.deny_list_reload),
                                      name="deny-list-reload")
    yield
    if watcher is not None:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = system_clock,
    store: SessionStore | None = None,
    backend: BackendFactory | None = None,
) -> web.Application:
    """Build the broker application; resources are created when it starts.

    ``store`` and ``backend`` (a factory, see :mod:`broker.backends.registry`)
    replace the configured ones, for tests and embedding. The configured backend
    is looked up here, so an unknown BROKER_BACKEND fails before anything starts
    (:class:`~broker.backends.registry.UnknownBackend`, naming the known ones).
    """
    settings = settings or Settings()
    app = web.Application(
        middlewares=[observe, errors_and_origin], client_max_size=settings.max_request_body
    )
    app[appkeys.SETTINGS] = settings
    app[appkeys.METRICS] = Metrics("federation" if settings.upstreams.get_secret_value()
                                else settings.backend,
                                relay=wire.mode(settings.ws_relay_compiled))
    app[appkeys.WS_BUDGETS] = SessionWsBudgets.from_settings(
        settings, on_throttle=app[appkeys.METRICS].ws_throttled.inc,
        on_close=functools.partial(app[appkeys.METRICS].limit_refused, "ws_rate"))
    app[appkeys.CLOCK] = clock
    app[appkeys.READINESS] = Readiness()
    app[appkeys.TRUSTED] = parse_networks(settings.trusted_proxies)
    if store is not None:
        app[appkeys.STORE] = store
    app[appkeys.BACKEND_FACTORY] = backend or backend_factory(settings)
    app[appkeys.DENY] = DenyList(settings.deny_networks, settings.deny_list_file)
    # Inside errors_and_origin, so a refusal is the usual JSON error with CORS headers.
    app.middlewares.append(deny_middleware(
        app[appkeys.DENY], app[appkeys.TRUSTED],
        lambda request: request.app[appkeys.MANAGER].metrics.limit_refused("denied")))
    app.cleanup_ctx.extend([_http_client, _store, _sessions, health.dependencies_ctx,
                            execute.kernels_ctx])
    app.on_shutdown.extend([health.start_draining, _drain])
    app.cleanup_ctx.append(_limits)
    app.on_response_prepare.append(prepare_response)
    app.add_routes(health.routes)
    if settings.metrics_port is None:  # else only on their own port (cli, create_ops_app)
        app.add_routes(health.ops_routes)
    app.add_routes(sessions.routes)
    app.add_routes(build_routes)
    app.add_routes(execute.routes)
    app.add_routes(files.routes)
    app.add_routes(openapi.routes)
    app.add_routes(admin.routes)
    app.add_routes(proxy_routes.routes)
    add_page(app, settings)
    return app
