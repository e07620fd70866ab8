"""Typed application keys: every shared object an aiohttp handler may reach."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from broker.backends.base import Backend
from broker.backends.registry import BackendFactory
from broker.metrics import Metrics
from broker.models import Clock, Readiness
from broker.policy.denylist import DenyList
from broker.policy.identity import Network
from broker.policy.kernels import KernelGate
from broker.policy.wsrate import SessionWsBudgets
from broker.pool import WarmPool
from broker.sessions import SessionManager
from broker.settings import Settings
from broker.store.base import SessionStore
from broker.upstream.session import UpstreamAccess

SETTINGS = web.AppKey("settings", Settings)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
TRUSTED = web.AppKey("trusted_networks", list[Network])
HTTP = web.AppKey("http_client", aiohttp.ClientSession)
#: Every request and WebSocket to a session's own server (see broker/upstream/).
UPSTREAM = web.AppKey("upstream", UpstreamAccess)
STORE = web.AppKey("store", SessionStore)
BACKEND = web.AppKey("backend", Backend)
MANAGER = web.AppKey("manager", SessionManager)
#: Builds the backend: create_app(backend=...), else the one the settings name in the
#: backend registry (broker.backends.registry).
BACKEND_FACTORY: web.AppKey[BackendFactory] = web.AppKey("backend_factory")
DENY = web.AppKey("deny_list", DenyList)
#: Set only when BROKER_MAX_KERNELS_PER_SESSION is on.
KERNEL_GATE = web.AppKey("kernel_gate", KernelGate)
METRICS = web.AppKey("metrics", Metrics)
#: Per-session kernel WebSocket cap and aggregate budget, on this replica.
WS_BUDGETS = web.AppKey("ws_budgets", SessionWsBudgets)
#: Told (session id, kernel id) when a client restarts a kernel through the proxy; set by the
#: agent package (broker.agent.execute), whose kernel client must then wait for the new process.
KERNEL_RESTARTING: web.AppKey[Callable[[str, str], None]] = web.AppKey("kernel_restarting")
#: The warm pools (without BROKER_POOL: none, but the admin drain still works).
POOL = web.AppKey("warm_pool", WarmPool)
#: What /ready reports (draining, dependency checks); see broker.api.health.
READINESS = web.AppKey("readiness", Readiness)
