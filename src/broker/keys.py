"""Typed application keys: every shared object an aiohttp handler may reach."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from broker.backends.base import Backend
from broker.metrics import Metrics
from broker.models import Clock
from broker.policy.identity import Network
from broker.proxy.kernel_client import AgentKernels
from broker.sessions import SessionManager
from broker.settings import Settings
from broker.store.base import SessionStore

SETTINGS = web.AppKey("settings", Settings)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
TRUSTED = web.AppKey("trusted_networks", list[Network])
HTTP = web.AppKey("http_client", aiohttp.ClientSession)
STORE = web.AppKey("store", SessionStore)
BACKEND = web.AppKey("backend", Backend)
MANAGER = web.AppKey("manager", SessionManager)
METRICS = web.AppKey("metrics", Metrics)
KERNELS = web.AppKey("agent_kernels", AgentKernels)
