"""Every Prometheus metric the broker exports, in one place.

Each app owns a :class:`Metrics` on its own registry (so several apps in one
process, as in tests, do not collide), served at ``/metrics``. Rules:

* names are ``broker_<noun>_<unit>``;
* label values come from the enums below and are pre-created at zero, so a
  dashboard sees every series before the first event; there is never a label
  per IP, repo, session, path or kernel;
* the hot path (kernel WebSocket messages) does not touch these objects per
  message: connections count into plain integers and flush them here in
  batches (see :class:`broker.proxy._wire_py.Tap`).

Labels:

``backend``
    local, jupyterhub, binderhub, federation (BROKER_UPSTREAMS).
``member`` (federation)
    the names of the BROKER_UPSTREAMS members, as configured (at most 32).
    ``broker_upstream_up`` is this replica's view; ``broker_upstream_sessions``
    is cluster-wide (aggregate with ``max``).
``status`` (sessions)
    pending, ready, failed, stopped. ``broker_sessions`` is cluster-wide (read
    from the store), so aggregate it across replicas with ``max``, not ``sum``.
``outcome`` / ``reason`` (creations)
    outcome ``created``/``reused`` with reason ``none``; ``refused`` with the
    refusal's reason (capacity, owner_sessions, rate_limited, ...); ``failed``
    with the spawn failure's reason (upstream_failed, spawn_timeout, ...).
``outcome`` (spawns)
    success, failure, timeout, cancelled.
``direction`` / ``channel`` (WebSocket traffic)
    ``to_kernel`` or ``to_client``; shell, iopub, stdin, control, or other.
``route`` / ``status_class`` (HTTP)
    the named route (sessions_create, jupyter_rest, ...) and 2xx..5xx.
``reason`` (limit refusals)
    creation_rate, owner_sessions, spec_capacity, capacity, spawn_concurrency
    (session creations), kernels_per_session (kernel starts), ws_rate (kernel
    WebSockets closed with 1008 after sustained throttling), denied (deny list).
    docs/limits.md describes each limit.
``kind`` (upstream errors)
    unreachable, refused, bad_response, exited, spawn.
``op`` (store)
    the store method (get, save, create, ...; ``pool`` for a warm pool's queue).
``pool`` (warm pools)
    the pool's name as configured in BROKER_POOL (``default`` or a spec): a
    bounded set chosen by the operator. ``broker_pool_entries`` counts a
    pool's live entries in the store, set by the replica that checks the pool
    (a shared pool's count is the same on every replica: aggregate with ``max``).
``outcome`` (pool claims)
    hit (a ready entry was handed out), miss (none: an ordinary spawn
    follows), dead (an entry found dead at claim time, discarded; the claim
    goes on to the next one).
``reason`` (pool refill failures)
    refused (the backend or a limit said no: hub 429/503, BinderHub quota,
    BROKER_MAX_SESSIONS; refills back off), failed (the spawn or the kernel
    warm-up failed), timeout.
``kind`` (spawn queue)
    ``visitor`` (a session someone asked for) or ``pool`` (a warm-pool refill);
    ``outcome`` (queue wait) ``granted``, ``timeout`` (waited
    BROKER_SPAWN_QUEUE_TIMEOUT in vain) or ``left`` (its client went away).
    The queue is per replica (:mod:`broker.spawnqueue`): sum across replicas.
``outcome`` (federation spawns)
    ready, refused (429/503: passed to the next member), failed (passed on,
    or the session's failure when it was the last member).
``dependency``
    store (the session store: Redis or memory) or upstream (the backend's hub,
    BinderHub or local working directory), as /ready checks them.
"""

from __future__ import annotations

import enum

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from broker import __version__


class Direction(enum.StrEnum):
    """Which way a kernel WebSocket message travelled."""

    TO_KERNEL = "to_kernel"
    TO_CLIENT = "to_client"


CHANNELS = ("shell", "iopub", "stdin", "control", "other")
BACKENDS = ("local", "jupyterhub", "binderhub", "federation")
STATUSES = ("pending", "ready", "failed", "stopped")
SPAWN_OUTCOMES = ("success", "failure", "timeout", "cancelled")
REFUSAL_REASONS = ("capacity", "owner_sessions", "rate_limited", "origin", "bad_request",
                   "forbidden", "unauthorized", "creation_rate", "spec_capacity",
                   "spawn_concurrency", "kernels_per_session", "ws_rate", "denied")
#: Reasons of ``broker_limit_refusals_total``: every limit of :mod:`broker.policy`.
LIMIT_REASONS = ("creation_rate", "owner_sessions", "spec_capacity", "capacity",
                 "spawn_concurrency", "kernels_per_session", "ws_rate", "denied",
                 # The HTTP edge (broker.edge): connection cap and read timeouts.
                 "too_many_connections", "header_timeout", "body_timeout")
FAILURE_REASONS = ("upstream_failed", "spawn_timeout", "upstream_unreachable", "capacity",
                   "rate_limited", "internal", "spawn_queue_timeout")
QUEUE_KINDS = ("visitor", "pool")
QUEUE_OUTCOMES = ("granted", "timeout", "left")
ROUTES = ("sessions_create", "session_get", "session_delete", "session_events",
          "jupyter_rest", "jupyter_ws", "build", "execute", "files", "admin", "health", "ready",
          "versions", "metrics", "openapi", "other")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
UPSTREAM_SPAWN_OUTCOMES = ("ready", "refused", "failed")
UPSTREAM_ERROR_KINDS = ("unreachable", "refused", "bad_response", "exited", "spawn")
STORE_OPS = ("create", "get", "save", "touch", "delete", "find_reusable", "list_live",
             "list_owner", "count_live", "publish", "announce_end", "ping", "pool")
#: Outcomes of a claim on a warm pool.
POOL_CLAIM_OUTCOMES = ("hit", "miss", "dead")
#: Why a pool refill failed.
POOL_REFILL_FAILURES = ("refused", "failed", "timeout")

DEPENDENCIES = ("store", "upstream")

_SPAWN_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300, 600)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_EXEC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: HTTP requests: REST calls are fast, but POST ?wait=true, /build and the events stream
#: last as long as a spawn, so the buckets go on past the spawn timeout's default (120 s).
_HTTP_BUCKETS = (*_FAST_BUCKETS, 30, 60, 120, 300, 600)
_QUEUE_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def label_or_other(value: str, allowed: tuple[str, ...], other: str = "other") -> str:
    """Keep label values inside their enum, whatever a caller passes."""
    return value if value in allowed else other


class Metrics:
    """The broker's metrics, registered on one registry."""

    def __init__(self, backend: str, registry: CollectorRegistry | None = None,
                 relay: str = "unknown") -> None:
        """``relay``: which build of the relay runs (``proxy.wire.mode()``), told by the
        application factory: metrics sit below the proxy and do not look it up."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Info("broker", "Broker version, configured backend, and which build of the "
                         "kernel WebSocket relay runs (compiled or python).", registry=r)
        self.info.info({"version": __version__, "backend": backend,
                        "relay": relay})
        self.sessions = Gauge(
            "broker_sessions", "Sessions in the store by backend and status (cluster-wide).",
            ["backend", "status"], registry=r)
        self.creations = Counter(
            "broker_session_creations_total",
            "Session creation requests by outcome (created, reused, refused, failed) and reason.",
            ["outcome", "reason"], registry=r)
        self.spawn_duration = Histogram(
            "broker_spawn_duration_seconds", "Time from spawn start to ready or failure.",
            ["backend", "outcome"], buckets=_SPAWN_BUCKETS, registry=r)
        self.spawns_in_progress = Gauge(
            "broker_spawns_in_progress", "Spawns running on this replica.", ["backend"],
            registry=r)
        self.ws_open = Gauge(
            "broker_websocket_connections", "Kernel WebSocket connections open on this replica.",
            registry=r)
        self.ws_messages = Counter(
            "broker_websocket_messages_total", "Kernel WebSocket messages relayed.",
            ["direction", "channel"], registry=r)
        self.ws_bytes = Counter(
            "broker_websocket_bytes_total", "Kernel WebSocket payload bytes relayed.",
            ["direction", "channel"], registry=r)
        self.executions = Counter(
            "broker_kernel_executions_total", "execute_request messages sent to kernels.",
            registry=r)
        self.execution_duration = Histogram(
            "broker_kernel_execution_duration_seconds",
            "Time from an execute_request to its execute_reply, seen on the WebSocket.",
            buckets=_EXEC_BUCKETS, registry=r)
        self.http_duration = Histogram(
            "broker_http_request_duration_seconds",
            "HTTP request handling time by route and status class (WebSockets: until upgrade); "
            "timed with time.perf_counter(), not the event loop's clock, which counts whole "
            "milliseconds under uvloop.",
            ["route", "status_class"], buckets=_HTTP_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "broker_upstream_errors_total", "Failures talking to upstream servers.",
            ["backend", "kind"], registry=r)
        self.store_duration = Histogram(
            "broker_store_operation_duration_seconds", "Session store operation latency.",
            ["op"], buckets=_FAST_BUCKETS, registry=r)
        self.store_errors = Counter(
            "broker_store_errors_total", "Session store operations that raised.", ["op"],
            registry=r)
        self.loop_lag = Gauge(
            "broker_event_loop_lag_seconds",
            "How late a 1 s timer fired on the event loop, last measurement.", registry=r)
        self.loop_delay = Histogram(
            "broker_event_loop_delay_seconds",
            "How late a 1 s timer fired on the event loop, every measurement (a scrape "
            "interval's spikes stay visible, unlike the last-value gauge).",
            buckets=_LAG_BUCKETS, registry=r)
        # CPU, memory and file descriptors of this process, as broker_process_* (the
        # registry is the app's own, so prometheus_client's default collector is not on it).
        ProcessCollector(namespace="broker", registry=r)
        self.sessions_ended = Counter(
            "broker_sessions_ended_total", "Sessions ended, by reason.", ["reason"], registry=r)
        self.limit_refusals = Counter(
            "broker_limit_refusals_total",
            "Requests refused by a rate limit, quota or the deny list, by reason (creations, "
            "kernel starts, WebSocket closes with 1008).", ["reason"], registry=r)
        self.ws_throttled = Counter(
            "broker_websocket_throttled_total",
            "Client kernel WebSocket messages after which reading paused (rate limit "
            "backpressure).", registry=r)
        self.spawn_slots = Gauge(
            "broker_spawn_slots", "Spawns this replica runs at once (BROKER_SPAWN_SLOTS, or "
            "the number it stands for); more wait in the spawn queue.", registry=r)
        self.spawn_slots_in_use = Gauge(
            "broker_spawn_slots_in_use", "Spawn slots held on this replica, by kind (visitor "
            "or pool).", ["kind"], registry=r)
        self.spawn_queue_length = Gauge(
            "broker_spawn_queue_length", "Spawns waiting for a slot on this replica, by kind.",
            ["kind"], registry=r)
        self.spawn_queue_wait = Histogram(
            "broker_spawn_queue_wait_seconds", "Time a spawn waited for its slot, by kind and "
            "outcome (granted, timeout, left).", ["kind", "outcome"], buckets=_QUEUE_BUCKETS,
            registry=r)
        self.upstream_up = Gauge(
            "broker_upstream_up", "Federation: 1 when the member passed its last health check "
            "on this replica, else 0.", ["member"], registry=r)
        self.upstream_sessions = Gauge(
            "broker_upstream_sessions", "Federation: live sessions held by each member "
            "(cluster-wide, counted from the store every health interval).", ["member"],
            registry=r)
        self.upstream_spawns = Counter(
            "broker_upstream_spawns_total", "Federation: spawn attempts on each member by "
            "outcome (ready, refused, failed); ready attempts are the member's share of new "
            "sessions.", ["member", "outcome"], registry=r)
        self.pool_entries = Gauge(
            "broker_pool_entries", "Warm pool entries by pool and state (ready, starting).",
            ["pool", "state"], registry=r)
        self.pool_claims = Counter(
            "broker_pool_claims_total",
            "Claims on a warm pool by outcome (hit, miss, dead).", ["pool", "outcome"],
            registry=r)
        self.pool_refill_failures = Counter(
            "broker_pool_refill_failures_total",
            "Pool entries that could not be started, by reason (refused, failed, timeout).",
            ["pool", "reason"], registry=r)
        self.dependency_up = Gauge(
            "broker_dependency_up",
            "1 while a dependency answered its latest check (every 5 s), 0 while it did not; "
            "requests that need a down dependency get a 503 with Retry-After meanwhile.",
            ["dependency"], registry=r)
        self.first_reply = Histogram(
            "broker_session_first_reply_seconds",
            "Time from a session's creation request (or its claim from a warm pool) to the "
            "first execute_reply of its kernel, seen on a kernel WebSocket or by the execute "
            "API: what a new visitor waits for their first cell. Once per session and replica.",
            buckets=_QUEUE_BUCKETS, registry=r)
        self._precreate()

    def add_members(self, names: list[str]) -> None:
        """Pre-create the federation series of the configured members."""
        for name in names:
            self.upstream_up.labels(name)
            self.upstream_sessions.labels(name)
            for outcome in UPSTREAM_SPAWN_OUTCOMES:
                self.upstream_spawns.labels(name, outcome)

    def pools(self, names: list[str]) -> None:
        """Pre-create the series of the configured pools (BROKER_POOL's names)."""
        for name in names:
            for state in ("ready", "starting"):
                self.pool_entries.labels(name, state)
            for outcome in POOL_CLAIM_OUTCOMES:
                self.pool_claims.labels(name, outcome)
            for reason in POOL_REFILL_FAILURES:
                self.pool_refill_failures.labels(name, reason)

    def _precreate(self) -> None:
        for backend in BACKENDS:
            for status in STATUSES:
                self.sessions.labels(backend, status)
            for outcome in SPAWN_OUTCOMES:
                self.spawn_duration.labels(backend, outcome)
            self.spawns_in_progress.labels(backend)
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(backend, kind)
        for outcome in ("created", "reused"):
            self.creations.labels(outcome, "none")
        for reason in REFUSAL_REASONS:
            self.creations.labels("refused", reason)
        for reason in FAILURE_REASONS:
            self.creations.labels("failed", reason)
        for direction in Direction:
            for channel in CHANNELS:
                self.ws_messages.labels(direction.value, channel)
                self.ws_bytes.labels(direction.value, channel)
        #: The histogram child per (route, status class): one dict lookup per request
        #: instead of prometheus_client's locked labels() call.
        self._http_children = {(route, cls): self.http_duration.labels(route, cls)
                               for route in ROUTES for cls in STATUS_CLASSES}
        for op in STORE_OPS:
            self.store_duration.labels(op)
            self.store_errors.labels(op)
        for reason in ENDED_REASONS:
            self.sessions_ended.labels(reason)
        for reason in LIMIT_REASONS:
            self.limit_refusals.labels(reason)
        for kind in QUEUE_KINDS:
            self.spawn_slots_in_use.labels(kind)
            self.spawn_queue_length.labels(kind)
            for outcome in QUEUE_OUTCOMES:
                self.spawn_queue_wait.labels(kind, outcome)
        for dependency in DEPENDENCIES:
            self.dependency_up.labels(dependency)

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request's duration (route kept inside ROUTES)."""
        cls = STATUS_CLASSES[min(max(status // 100, 2), 5) - 2]
        child = self._http_children.get((route, cls))
        if child is None:
            child = self._http_children[("other", cls)]
        child.observe(seconds)

    def upstream_error(self, backend: str, kind: str) -> None:
        """Count one upstream failure (kind kept inside its enum)."""
        self.upstream_errors.labels(
            label_or_other(backend, BACKENDS, "local"),
            label_or_other(kind, UPSTREAM_ERROR_KINDS, "bad_response"),
        ).inc()

    def limit_refused(self, reason: str) -> None:
        """Count one refusal by a limit (reason kept inside LIMIT_REASONS)."""
        self.limit_refusals.labels(label_or_other(reason, LIMIT_REASONS, "capacity")).inc()

    def ended(self, reason: str) -> None:
        """Count one session end."""
        self.sessions_ended.labels(label_or_other(reason, ENDED_REASONS)).inc()


ENDED_REASONS = ("deleted", "max_age", "idle", "upstream_exited", "upstream_gone",
                 "upstream_down", "spawn_lost", "admin", "failed", "abandoned", "pool_surplus",
                 "other")
