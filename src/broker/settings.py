"""The broker's one configuration model.

Every setting comes from the environment (prefix ``BROKER_``) or an optional
``.env`` file. Each field's description is the documentation: ``session-broker
config`` prints it, and ``docs/configuration.md`` is generated from it, so a
setting is described exactly once, here.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broker.models import OPERATOR_NAME
from broker.store.connect import check_redis_url
from broker.upstreams import parse_upstreams

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    """Accept ``a,b , c`` from the environment as well as a real list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


#: The pool of sessions created without a spec (BROKER_POOL).
DEFAULT_POOL = "default"


def parse_pools(entries: list[str]) -> dict[str, tuple[int, int]]:
    """BROKER_POOL entries as {pool name: (min, max)}; ValueError naming a bad entry.

    The name is the spec the pool serves (``default``: no spec). ``SPEC=N``
    is a fixed size (min = max = N).
    """
    pools: dict[str, tuple[int, int]] = {}
    for entry in entries:
        name, sep, size = entry.rpartition("=")
        low, _, high = size.partition(":")
        try:
            bounds = (int(low), int(high or low))
        except ValueError:
            bounds = (-1, -1)
        if not sep or not name.strip() or bounds[0] < 0 or bounds[1] < bounds[0] \
                or name in pools:
            raise ValueError(f"BROKER_POOL entry {entry!r} is not SPEC=MIN or SPEC=MIN:MAX "
                             "(0 <= MIN <= MAX, each spec once)")
        pools[name.strip()] = bounds
    return pools


def parse_spec_quotas(pairs: list[str]) -> list[tuple[str, int]]:
    """(pattern, cap) from ``pattern=N`` entries; raises ValueError naming a bad one."""
    quotas = []
    for pair in pairs:
        pattern, sep, number = pair.rpartition("=")
        if not sep or not pattern.strip() or not number.strip().isdigit():
            raise ValueError(f"BROKER_SPEC_QUOTAS entry {pair!r} is not pattern=N (N >= 0)")
        quotas.append((pattern.strip(), int(number)))
    return quotas


#: API keys (BROKER_API_KEYS) are parsed here, where the setting is validated; the lookup
#: by presented key or owner, and what the keys mean, is :mod:`broker.policy.apikeys`.
#: Prefix of every owner identity that is an API key (an IP address never has it).
OWNER_PREFIX = "key:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_LIMITS = ("max_sessions", "max_creations", "creation_window")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its name (the owner identity) and its own limits (None = default)."""

    name: str
    digest: str
    max_sessions: int | None = None
    max_creations: int | None = None
    creation_window: float | None = None

    @property
    def owner(self) -> str:
        """The owner identity of sessions created with this key."""
        return OWNER_PREFIX + self.name


def key_digest(key: str) -> str:
    """SHA-256 hex of an API key, as ``key_sha256`` holds it."""
    # surrogatepass: a presented key with undecodable header bytes matches nothing.
    return hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()


def _entry(name: str, raw: Any) -> ApiKey:
    if not _NAME.match(name):
        raise ValueError(f"API key name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(raw, dict):
        raise ValueError(f"API key {name!r}: the entry must be a JSON object")
    unknown = set(raw) - {"key", "key_sha256", *_LIMITS}
    if unknown:
        raise ValueError(f"API key {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    if ("key" in raw) == ("key_sha256" in raw):
        raise ValueError(f"API key {name!r}: give exactly one of 'key' and 'key_sha256'")
    if "key" in raw:
        if not isinstance(raw["key"], str) or len(raw["key"]) < 16:
            raise ValueError(f"API key {name!r}: 'key' must be a string of 16+ characters")
        digest = key_digest(raw["key"])
    else:
        digest = str(raw["key_sha256"]).lower()
        if not _HEX.match(digest):
            raise ValueError(f"API key {name!r}: 'key_sha256' must be 64 hex digits")
    limits: dict[str, Any] = {}
    for field in _LIMITS:
        value = raw.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"API key {name!r}: {field!r} must be a number >= 0")
        if field == "creation_window" and value <= 0:
            raise ValueError(f"API key {name!r}: 'creation_window' must be > 0")
        limits[field] = float(value) if field == "creation_window" else int(value)
    return ApiKey(name=name, digest=digest, **limits)


def parse_api_keys(text: str) -> dict[str, ApiKey]:
    """Keys by digest from ``BROKER_API_KEYS``; raises ValueError with a usable message."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"BROKER_API_KEYS is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("BROKER_API_KEYS must be a JSON object of name -> entry")
    keys: dict[str, ApiKey] = {}
    for name, raw in data.items():
        key = _entry(str(name), raw)
        if key.digest in keys:
            raise ValueError(f"API keys {keys[key.digest].name!r} and {name!r} are the same key")
        keys[key.digest] = key
    return keys


class Settings(BaseSettings):
    """Runtime configuration of one broker replica (all replicas should share it)."""

    model_config = SettingsConfigDict(
        env_prefix="BROKER_", env_file=".env", extra="ignore", validate_default=True
    )

    host: str = Field(
        "127.0.0.1",
        description="Interface to listen on. Use 0.0.0.0 in a container; the default only "
        "accepts connections from this machine.",
    )
    port: int = Field(8765, ge=0, le=65535, description="TCP port to listen on (0 = any free).")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="A second port, on BROKER_HOST, that serves /metrics and /versions only; "
        "with it set, the public BROKER_PORT answers those two with 404, so an ingress in "
        "front of the public port never exposes them (the chart sets 9090). 0 = any free "
        "port. Empty: /metrics and /versions are served on BROKER_PORT with everything else.",
    )
    public_url: str = Field(
        "",
        description="External base URL of the broker (e.g. https://broker.example.org), used in "
        "the base_url/ws_url handed to clients. Empty: derived from each request's Host and "
        "scheme (X-Forwarded-Proto/Host only from BROKER_TRUSTED_PROXIES).",
    )
    redis_url: str = Field(
        "",
        description="Redis (or Valkey) URL for sessions and cluster-wide limits: "
        "redis://[:password@]host:port/db; rediss://... for TLS (a private CA as "
        "?ssl_ca_certs=/path/ca.pem); or a primary watched by Sentinel as "
        "redis+sentinel://[:password@]host:port[,host:port...]/SERVICE_NAME[/db] "
        "(rediss+sentinel:// for TLS; ?sentinel_password= if the sentinels have their own). "
        "With Sentinel the broker follows a failover without a restart; requests during "
        "it get 503 store_unavailable with Retry-After. Empty: an in-process memory store, "
        "correct for a single replica only; sessions are lost on restart. Several replicas "
        "must share one Redis and one BROKER_SECRET_KEY.",
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Replicas of the Redis primary that must acknowledge each session write "
        "(create, status change, delete, new token) before the broker answers (Redis WAIT), "
        "so a session a client was told about survives a failover to one of them. 0: no "
        "wait (a failover may lose the last writes, up to the replication lag). Writes "
        "still stand when fewer replicas answer within BROKER_REDIS_WAIT_TIMEOUT (a warning "
        "is logged); set it no higher than the replicas you run.",
    )
    redis_wait_timeout: float = Field(
        1.0,
        gt=0,
        le=5,
        description="Longest wait, in seconds, for BROKER_REDIS_WAIT_REPLICAS acknowledgements "
        "of one session write; past it the write stands unreplicated and the request goes "
        "on (a warning is logged once, until replicas acknowledge again). The first write "
        "after a replica is lost waits this long; later ones wait 10 ms until replicas "
        "acknowledge again.",
    )
    redis_prefix: str = Field(
        "broker:", description="Prefix of every Redis key, so one Redis can serve several brokers."
    )
    secret_key: SecretStr = Field(
        SecretStr(""),
        description="Key that encrypts upstream tokens at rest (any string; a long random one). "
        "Required with BROKER_REDIS_URL so every replica can read every session. Empty with "
        "the memory store: a random key per process.",
    )
    backend: str = Field(
        "local",
        # The name's shape only: which names exist is the backend registry's to say
        # (broker.backends.registry; built-ins plus installed packages), checked when
        # the app is built, since the settings import nothing of the backends.
        pattern=OPERATOR_NAME,
        description="Where sessions run, by backend name: 'local' starts one `jupyter "
        "server` process per session on this machine (single replica, development and small "
        "sites); 'jupyterhub' and 'binderhub' spawn through BROKER_HUB_URL / "
        "BROKER_BINDER_URL. An installed package may add more (entry-point group "
        "jupyter_session_broker.backends, see docs/architecture.md); an unknown name stops "
        "the broker at start-up with the list of known ones.",
    )
    hub_url: str = Field("", description="JupyterHub base URL (jupyterhub backend).")
    hub_api_token: SecretStr = Field(
        SecretStr(""), description="JupyterHub service API token (jupyterhub backend)."
    )
    binder_url: str = Field("", description="BinderHub base URL (binderhub backend).")
    binder_hub_url: str = Field(
        "",
        description="BinderHub backend: base URL of the JupyterHub behind the BinderHub, as the "
        "broker reaches it, used only to stop servers (with BROKER_BINDER_HUB_API_TOKEN). "
        "Empty: the part of each server URL before /user/.",
    )
    binder_hub_api_token: SecretStr = Field(
        SecretStr(""),
        description="BinderHub backend: a token of the BinderHub's JupyterHub allowed to stop "
        "user servers (scope admin:servers), so an ended session's server stops at once. "
        "Empty: BinderHub has no stop call, so the server runs until the hub's idle culler "
        "removes it; the session still ends for its clients immediately.",
    )
    binder_connect_timeout: float = Field(
        10.0,
        gt=0,
        description="BinderHub backend: seconds to connect to BROKER_BINDER_URL before the "
        "launch fails (502).",
    )
    binder_read_timeout: float = Field(
        90.0,
        gt=0,
        description="BinderHub backend: longest silence, in seconds, on a /build stream before "
        "the launch fails (502). BinderHub sends a keepalive every ~25 s, so silence beyond "
        "that means a dead connection. The whole build and launch is bounded by "
        "BROKER_SPAWN_TIMEOUT; raise that for repositories whose images are not built yet.",
    )
    upstreams: SecretStr = Field(
        SecretStr(""),
        description="Federation: several upstreams behind this broker, as a JSON list or "
        "@/path/to/file.json, e.g. [{\"name\": \"a\", \"backend\": \"jupyterhub\", "
        "\"hub_url\": \"...\", \"hub_api_token\": \"...\", \"weight\": 3}, ...]. Each "
        "member takes the single-upstream settings without their BROKER_ prefix (hub_url, "
        "hub_api_token, hub_public_url, hub_user_prefix, hub_named_servers, binder_url, "
        "binder_hub_url, binder_hub_api_token, binder_connect_timeout, binder_read_timeout), "
        "a name (lower-case, at most 32 characters; at most 32 members), a weight (its share "
        "of new sessions; 0 drains it) and max_sessions (0 = unlimited; a full member gets no "
        "new session, and when every member is full creation fails with 503 'capacity'). A "
        "member that refuses (429/503) or fails a spawn passes it to the next one within "
        "BROKER_SPAWN_TIMEOUT. When set, BROKER_BACKEND and the single-upstream settings are "
        "not used. Empty: one upstream, as BROKER_BACKEND says. See docs/federation.md.",
    )
    upstreams_health_interval: float = Field(
        10.0,
        gt=0,
        description="Federation: seconds between health checks of each member (GET /hub/api/ "
        "of a hub, /versions of a BinderHub; each may take the interval or 5 s, whichever is "
        "longer, at most BROKER_UPSTREAM_TIMEOUT). One failed "
        "check takes the member out of the rotation until a check passes; while it is down, "
        "its sessions whose servers no longer answer end at once as 'upstream_down'. A "
        "shorter interval notices an outage sooner at the cost of one request per member "
        "per interval from every replica.",
    )
    upstreams_affinity: Literal["weight", "spec"] = Field(
        "weight",
        description="Federation: how a new session picks its member. 'weight': smooth weighted "
        "round robin over the healthy members. 'spec': rendezvous hashing of the session's "
        "spec (weighted), so a repository keeps launching where its image was built and stays "
        "warm; sessions without a spec fall back to 'weight'. Either way a refusal passes the "
        "spawn on to the next member.",
    )
    build_keepalive: float = Field(
        25.0,
        gt=0,
        description="Seconds between ':keepalive' comments on the broker's own /build event "
        "streams (BinderHub's interval), so proxies do not drop a launch that is waiting.",
    )
    build_reuse: bool = Field(
        True,
        description="/build: hand a visitor their live session for the same spec again (checked "
        "alive upstream first) when the launch proves who it is: a broker token of that session "
        "presented (Authorization header or ?token=; the same token comes back, none is "
        "minted), or the visitor cookie of BROKER_BUILD_VISITOR_COOKIE (a fresh token is "
        "minted, at most 10 per session; after that the visitor gets a new session). Without "
        "proof every launch is a new session: an address or Origin is never proof, people "
        "behind one NAT share it. Off: every launch is a new session.",
    )
    build_visitor_cookie: bool = Field(
        False,
        description="/build: set a secret visitor cookie (HttpOnly, path /build) and accept it "
        "back as proof for BROKER_BUILD_REUSE, so a browser relaunching a spec gets its own "
        "session again. Only pages served from the broker's own origin send it: thebe opens "
        "its EventSource without credentials, so a book on another origin never does (it "
        "reuses its session from localStorage instead).",
    )
    build_profiles: CommaList = Field(
        default_factory=list,
        description="/build: comma-separated pattern=profile pairs (shell-style patterns on "
        "provider/spec, e.g. gh/my-org/*=python,gh/my-org/gpu-*=gpu); the first match gives the "
        "session's profile (the jupyterhub backend passes it, with the spec, as user_options). "
        "A spec matching nothing launches without a profile.",
    )
    hub_public_url: str = Field(
        "",
        description="JupyterHub backend: where the hub's proxy serves user servers "
        "(/user/<name>/), as the broker reaches it, e.g. http://proxy-public when "
        "BROKER_HUB_URL is the hub's internal API address. The broker joins the server paths "
        "the hub reports (which include the hub's base_url) to this URL's scheme and host. "
        "Empty: BROKER_HUB_URL.",
    )
    hub_user_prefix: str = Field(
        "broker-",
        description="JupyterHub backend: prefix of the hub users the broker creates "
        "(<prefix><session id>, or <prefix>owner-<hash> with BROKER_HUB_NAMED_SERVERS), "
        "lower-case letters, digits, '-', '_' and '.'. The broker deletes these users when "
        "their sessions end, so give it a prefix no real user has.",
    )
    hub_named_servers: bool = Field(
        False,
        description="JupyterHub backend: false gives every session its own hub user (the "
        "strongest isolation on the hub). True gives every owner one hub user and every "
        "session a named server of it (needs c.JupyterHub.allow_named_servers; counts "
        "against named_server_limit_per_user, beyond which spawns fail with 502). Either way "
        "a session's token opens only its own server; see BROKER_HUB_USER_PREFIX.",
    )

    session_max_age: int = Field(
        86400,
        ge=10,
        description="Seconds a session may live at most, counted from creation. At this age the "
        "session expires: its token stops working and its server is stopped. Matches thebe's "
        "saved-session max age.",
    )
    session_idle_timeout: int = Field(
        600,
        ge=0,
        description="Seconds without kernel activity (execute requests, kernel output) after "
        "which a session is culled; 0 disables idle culling. See also BROKER_SESSION_MAX_AGE.",
    )
    spawn_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds a spawn may take before it is abandoned, cleaned up and reported "
        "as failed (504). Counted from the moment the spawn leaves the spawn queue "
        "(BROKER_SPAWN_SLOTS); the wait in line has its own bound, BROKER_SPAWN_QUEUE_TIMEOUT.",
    )
    spawn_slots: int = Field(
        0,
        ge=0,
        description="Spawns this replica runs at once; more wait in a first-come, first-served "
        "queue and hear their place in line and an estimated wait as 'waiting' progress "
        "events. 0 picks per backend: local, twice the CPUs the broker may use (a server start "
        "is half CPU, half waiting; more at once only slows every one); jupyterhub and "
        "binderhub, 20 "
        "per replica (JupyterHub's concurrent_spawn_limit defaults to 100; 5 replicas stay "
        "below it). With R replicas the upstream sees up to R times this many.",
    )
    spawn_queue_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds a spawn may wait in the spawn queue for a slot. Beyond it the "
        "session fails with 503 'spawn_queue_timeout' and Retry-After; its spawn never "
        "started. A request whose client goes away (POST ?wait=true, /build or the events "
        "stream closed) leaves the queue at once and its session ends as 'abandoned'.",
    )
    pool_spawn_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of BROKER_SPAWN_SLOTS that warm-pool refills may hold at once "
        "(rounded down, and never the last slot: with one slot the pool does not refill). "
        "Refills only take a slot while no visitor waits for one, so they never delay a "
        "visitor's spawn by more than the refills already running.",
    )
    admin_token: SecretStr = Field(
        SecretStr(""), description="Token for /api/v1/admin/...; empty disables the admin API."
    )
    allowed_origins: CommaList = Field(
        default_factory=list,
        description="Comma-separated browser origins allowed to call the broker (CORS and "
        "WebSocket Origin check), e.g. https://book.example.org. '*' allows any origin (safe "
        "enough: tokens travel in headers, never cookies). The broker's own origin is always "
        "allowed: BROKER_PUBLIC_URL's when set; otherwise the request's own scheme and host "
        "when that host is an IP address or localhost, or was passed on by a trusted proxy "
        "(a domain name sent directly never counts: DNS rebinding). Any other Origin is "
        "refused with 403 'origin' naming this setting. Requests without an Origin header "
        "(curl, agents, servers) are not affected.",
    )
    max_sessions: int = Field(
        0,
        ge=0,
        description="Live sessions in total across all replicas (capacity); 0 = unlimited. "
        "Beyond it, creation is refused with 503 'capacity' and a jittered Retry-After "
        "(/build: a failed event with status_code 503). See BROKER_MAX_SESSIONS_PER_SPEC.",
    )
    max_sessions_per_owner: int = Field(
        3,
        ge=0,
        description="Live sessions per owner (client IP, IPv6 /64, or API key); 0 = unlimited. "
        "Beyond it, creation is refused with 429 'owner_sessions' and Retry-After. Reusing a "
        "session does not count. API keys may set their own (BROKER_API_KEYS).",
    )
    max_sessions_per_spec: int = Field(
        0,
        ge=0,
        description="Live sessions per repository (the spec without its ref: gh/<owner>/<repo>, "
        "gl/<namespace>, git/<url>, gist/<user>/<id>; other specs as a whole), like "
        "BinderHub's per-repo quota; 0 = unlimited. Beyond it, creation is refused with 503 "
        "'spec_capacity' ('Too many users running ...') and Retry-After. Sessions without a "
        "spec are not counted. BROKER_SPEC_QUOTAS overrides it per pattern.",
    )
    spec_quotas: CommaList = Field(
        default_factory=list,
        description="Comma-separated pattern=N pairs (shell-style patterns on the spec, e.g. "
        "gh/my-org/*=50,gh/big/course/*=200): the first pattern matching a spec replaces "
        "BROKER_MAX_SESSIONS_PER_SPEC for it (BinderHub's higher quota for listed repos); each "
        "matching repository is counted on its own; N=0 means unlimited.",
    )
    max_creations_per_owner: int = Field(
        0,
        ge=0,
        description="Sessions one owner may create per BROKER_CREATION_WINDOW, as a token "
        "bucket (up to N at once, then one every window/N seconds); 0 = unlimited. Beyond "
        "it, creation is refused with 429 'creation_rate', an exact Retry-After and "
        "X-RateLimit-Limit/-Remaining/-Reset (also sent on successful creations). Reusing a "
        "live session does not count. BinderHub's default is 10 per hour.",
    )
    creation_window: float = Field(
        3600.0,
        gt=0,
        description="Seconds over which BROKER_MAX_CREATIONS_PER_OWNER creations are allowed.",
    )
    max_concurrent_spawns: int = Field(
        0,
        ge=0,
        description="Spawns admitted at once across all replicas, queued or running (the "
        "spawn queue, BROKER_SPAWN_SLOTS, already bounds what runs at once per replica; this "
        "bounds how many may wait); 0 = unlimited. Beyond it, creation is refused with 429 "
        "'spawn_concurrency' and a short Retry-After. A spawn holds its place until its "
        "server is ready or failed (at most BROKER_SPAWN_QUEUE_TIMEOUT + "
        "BROKER_SPAWN_TIMEOUT).",
    )
    pool: CommaList = Field(
        default_factory=list,
        description="Warm pools of ready servers, comma-separated SPEC=MIN or SPEC=MIN:MAX "
        "(e.g. default=2,gh/org/book/HEAD=4:20); 'default' is the pool for sessions created "
        "without a spec. A new session whose spec has a pool (and no profile) takes a ready "
        "entry at once instead of waiting for a spawn; an empty pool falls through to the "
        "ordinary spawn. The size moves between MIN and MAX with the recent claim rate "
        "(docs/pool.md). Entries count toward BROKER_MAX_SESSIONS (and per-spec caps), not "
        "toward any owner. Empty: no pool.",
    )
    pool_warm_kernel: bool = Field(
        True,
        description="Start a kernel in every pool entry (the execute API's default kernel, "
        "Jupyter session 'broker-execute') and wait until it is idle before the entry counts "
        "as ready, so a claimed session's first execute does not wait for a kernel start. "
        "False: entries are bare servers (less memory, slower first output).",
    )
    pool_max_age: int = Field(
        3600,
        ge=60,
        description="Seconds a pool entry may wait unclaimed; older entries are stopped and "
        "replaced (a fresh server, e.g. after an image update). Once claimed, a session's "
        "own BROKER_SESSION_MAX_AGE counts from the claim.",
    )
    pool_adapt_window: float = Field(
        600.0,
        gt=0,
        description="Seconds of claims the pool size looks back on: a pool holds MIN plus the "
        "claims of this window, at most MAX. A burst grows the pool for this long.",
    )
    pool_refill_concurrency: int = Field(
        1,
        ge=1,
        description="Pool entries one replica starts at once; each also waits for a spawn "
        "slot within BROKER_POOL_SPAWN_SHARE, behind every visitor. Refills back off when the "
        "backend refuses (hub 429/503, BinderHub quota, BROKER_MAX_SESSIONS), from "
        "BROKER_POOL_CHECK_INTERVAL up to 5 minutes (or the upstream's Retry-After).",
    )
    pool_check_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between pool checks (refill, too-old and dead entries, shrinking); "
        "a claim on this replica triggers a check at once.",
    )
    max_kernels_per_session: int = Field(
        0,
        ge=0,
        description="Kernels one session may run, counted on its server; 0 = unlimited. A "
        "POST api/kernels, or a POST api/sessions that would start a kernel, beyond it is "
        "refused with 429 'kernels_per_session' (checks of one session are serialised across "
        "replicas, so concurrent POSTs cannot overshoot).",
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description='API keys for agent platforms, as JSON: {"name": {"key_sha256": "<hex>" '
        '(or "key": "<key>"), "max_sessions": N, "max_creations": N, "creation_window": S}}. '
        "A session creation with Authorization: Bearer <key> belongs to the owner key:<name> "
        "and gets that key's limits instead of BROKER_MAX_SESSIONS_PER_OWNER / "
        "BROKER_MAX_CREATIONS_PER_OWNER / BROKER_CREATION_WINDOW (left out: those apply). "
        "Empty: no keys; owners are client addresses.",
    )
    deny_networks: CommaList = Field(
        default_factory=list,
        description="Comma-separated networks (CIDR) or addresses whose requests are refused "
        "with 403 'denied' (/build: a failed event with status_code 403). The client address "
        "is resolved as for BROKER_TRUSTED_PROXIES. Probes and /metrics are never refused. "
        "See BROKER_DENY_LIST_FILE for a list that changes without a restart.",
    )
    deny_list_file: str = Field(
        "",
        description="A file of networks to refuse (one CIDR or address per line, # comments), "
        "added to BROKER_DENY_NETWORKS and re-read when it changes (checked every "
        "BROKER_DENY_LIST_RELOAD seconds), e.g. a mounted ConfigMap. A file that does not parse "
        "keeps the previous list and logs an error.",
    )
    deny_list_reload: float = Field(
        10.0,
        gt=0,
        description="Seconds between checks of BROKER_DENY_LIST_FILE for changes.",
    )
    trusted_proxies: CommaList = Field(
        default_factory=list,
        description="Comma-separated networks (CIDR) whose X-Forwarded-For/-Proto/-Host are "
        "believed, e.g. the ingress controller's pod network. Empty: the TCP peer is the client.",
    )
    ws_max_message_size: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest kernel WebSocket message, in bytes, either direction. A larger "
        "one closes the connection with 1009. Kernel outputs (images, data frames) can be "
        "large, so this is well above aiohttp's 4 MiB default.",
    )
    ws_client_max_message_size: int = Field(
        0,
        ge=0,
        description="Largest message a client may send on a kernel WebSocket, in bytes; a "
        "larger one closes the connection with 1009 before it reaches the kernel. 0: "
        "BROKER_WS_MAX_MESSAGE_SIZE (which also bounds kernel output).",
    )
    ws_client_messages_per_second: float = Field(
        0.0,
        ge=0,
        description="Messages per second a client may send on one kernel WebSocket (token "
        "bucket of BROKER_WS_CLIENT_MESSAGE_BURST); 0 = unlimited. Above it the broker stops "
        "reading the client until the bucket refills (backpressure: the client's sends slow "
        "down, nothing is dropped); after BROKER_WS_CLIENT_THROTTLE_LIMIT seconds of unbroken "
        "throttling it closes the connection with 1008.",
    )
    ws_client_message_burst: int = Field(
        200,
        ge=1,
        description="Messages a client may send at once before BROKER_WS_CLIENT_MESSAGES_PER_"
        "SECOND applies (the bucket's size).",
    )
    ws_client_bytes_per_second: float = Field(
        0.0,
        ge=0,
        description="Bytes per second a client may send on one kernel WebSocket (token bucket "
        "of BROKER_WS_CLIENT_BYTE_BURST); 0 = unlimited. Same backpressure and 1008 close as "
        "BROKER_WS_CLIENT_MESSAGES_PER_SECOND.",
    )
    ws_client_byte_burst: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Bytes a client may send at once before BROKER_WS_CLIENT_BYTES_PER_SECOND "
        "applies. Keep it at least BROKER_WS_CLIENT_MAX_MESSAGE_SIZE: one message larger than "
        "the bucket waits until the debt is repaid, and is closed with 1008 if that takes "
        "longer than BROKER_WS_CLIENT_THROTTLE_LIMIT.",
    )
    ws_client_throttle_limit: float = Field(
        10.0,
        gt=0,
        description="Seconds a kernel WebSocket may stay throttled without a break (every "
        "message had to wait) before it is closed with 1008 'message rate limit exceeded'. A "
        "client that bursts and then pauses is only slowed, never closed.",
    )
    ws_session_max_connections: int = Field(
        10,
        ge=0,
        description="Kernel WebSockets one session may hold open at once on one replica; one "
        "more is refused before the upgrade with 429 'too_many_websockets' and Retry-After. "
        "0 = no cap. Per replica: behind N replicas a session may hold up to N times this.",
    )
    ws_session_messages_per_second: float = Field(
        0.0,
        ge=0,
        description="Messages per second all kernel WebSockets of one session may send "
        "together on one replica (a token bucket holding one second's worth, shared by the "
        "session's connections); 0 = unlimited. Above it those connections are throttled as "
        "by BROKER_WS_CLIENT_MESSAGES_PER_SECOND, and closed with 1008 after "
        "BROKER_WS_CLIENT_THROTTLE_LIMIT seconds of unbroken throttling.",
    )
    ws_session_bytes_per_second: float = Field(
        0.0,
        ge=0,
        description="Payload bytes per second all kernel WebSockets of one session may send "
        "together on one replica (bucket: one second's worth, at least "
        "BROKER_WS_CLIENT_MAX_MESSAGE_SIZE or BROKER_WS_MAX_MESSAGE_SIZE); 0 = unlimited. Same "
        "throttling and 1008 close as BROKER_WS_SESSION_MESSAGES_PER_SECOND.",
    )
    ws_relay_compiled: bool = Field(
        True,
        description="Run the kernel WebSocket relay's per-frame code compiled (Cython), when "
        "the installed package has it. false, or a package built without a C compiler, runs "
        "the same code as Python: the same behaviour, more CPU per frame. /versions and the "
        "broker_info metric say which one runs.",
    )
    ws_heartbeat: float = Field(
        30.0,
        ge=0,
        description="Seconds between WebSocket pings on both legs of a kernel connection; a "
        "leg that misses its pong is closed. Keeps idle connections alive through load "
        "balancers. 0 disables.",
    )
    max_request_body: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest HTTP request body accepted (413 beyond).",
    )
    header_timeout: float = Field(
        20.0,
        gt=0,
        description="Seconds a client has to send a request line and headers, counted from "
        "the connection's start (or, on a kept-alive connection, from the request's first "
        "byte). At the limit the broker answers 408 'header_timeout' and closes the "
        "connection: a client dribbling headers byte by byte cannot hold it open.",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may stall (no byte received) while the broker "
        "waits for the rest of it. At the limit the connection is closed. A body declared "
        "larger than the route accepts is refused with 413 at once, without waiting for it.",
    )
    keepalive_timeout: float = Field(
        75.0,
        gt=0,
        description="Seconds an idle kept-alive client connection stays open between "
        "requests; then the broker closes it. Keep it above the idle timeout of a proxy or "
        "load balancer in front of the broker (they reuse connections).",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Client HTTP connections one replica keeps open at once (a kernel "
        "WebSocket counts until its upgrade; then the relay owns it, bounded per session by "
        "BROKER_WS_SESSION_MAX_CONNECTIONS). "
        "Beyond it a new connection is answered 503 'too_many_connections' with Retry-After "
        "and closed. 0 = derived from the open-file limit (half of what is left after a "
        "reserve of 100, since a proxied connection also holds an upstream one); a larger "
        "value is lowered to that, so the broker refuses cleanly instead of running out of "
        "file descriptors.",
    )
    upstream_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for an upstream REST reply."
    )
    execute_timeout_default: float = Field(
        30.0,
        gt=0,
        description="Execute API: seconds a call may run when it names no timeout. At the "
        "limit the kernel is interrupted (not restarted: its state survives) and the call "
        "answers status 'timeout' with the output so far. See BROKER_EXECUTE_TIMEOUT_MAX.",
    )
    execute_timeout_max: float = Field(
        300.0,
        gt=0,
        description="Execute API: the largest timeout a call may ask for; larger requests are "
        "lowered to this. Keep it below the idle timeout of any proxy in front of the broker "
        "for non-streaming calls (streaming calls send keep-alive comments).",
    )
    execute_max_output: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Execute API: bytes of output (stdout, stderr, result and display "
        "bundles) one call collects. Beyond it further output is dropped, the call keeps "
        "running, and its answer says truncated=true.",
    )
    max_upload_size: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Files API: largest file, in bytes, an upload may carry; a larger one is "
        "refused with 413 before anything reaches the session's server. Independent of "
        "BROKER_MAX_REQUEST_BODY.",
    )
    max_download_size: int = Field(
        32 * 1024 * 1024,
        ge=1,
        description="Files API: largest file, in bytes, a download may return; a larger one is "
        "refused with 413 (the session's server sends files base64-encoded in one JSON "
        "document, which the broker holds in memory while it decodes it).",
    )
    local_root_dir: str = Field(
        "",
        description="Local backend: directory under which each session gets its own working "
        "directory (removed when the session ends). Empty: a temporary directory.",
    )
    local_server_args: CommaList = Field(
        default_factory=list,
        description="Local backend: extra comma-separated arguments for each `jupyter server` "
        "(e.g. --ServerApp.shutdown_no_activity_timeout=3600).",
    )
    reap_interval: float = Field(
        30.0,
        gt=0,
        description="Seconds between sweeps that stop expired sessions and mark dead ones.",
    )
    reap_probe_failures: int = Field(
        3,
        ge=1,
        description="Consecutive failed liveness probes (one per reaper sweep) before a ready "
        "session whose server does not answer is stopped as upstream_gone; see also "
        "BROKER_REAP_PROBE_WINDOW. Probes this replica could not make (out of file "
        "descriptors, its own loop starved) never count.",
    )
    reap_probe_window: float = Field(
        60.0,
        ge=0,
        description="Seconds the failed probes (BROKER_REAP_PROBE_FAILURES) must span, from "
        "the first to the last, before the session is stopped: a server busy or paused for "
        "less than this keeps its session.",
    )
    cleanup_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds one backend cleanup (stopping a session's server) may take. At "
        "the limit it is abandoned for now and retried on every reaper interval until it "
        "succeeds; the session's outcome was recorded before it started.",
    )
    page: str = Field(
        "on",
        description="The live page at / (a code cell with a Run button, spawn progress and "
        "the visitor's limits, using only the public API): 'on', 'off' (/ answers 404 JSON), "
        "or a directory holding an index.html (and its files) to serve instead.",
    )
    jupyter_ui: bool = Field(
        False,
        description="Proxy each session's own Jupyter UI (JupyterLab at /s/{id}/lab, which "
        "MyST's \"Launch Jupyter Server Window\" opens, with the static files, settings, "
        "workspaces and contents APIs it needs). The visitor's broker token, on the first "
        "link as ?token=, becomes an HttpOnly cookie for /s/{id}/; the server's own token "
        "never reaches the browser. The UI runs in the broker's origin: give the broker an "
        "origin of its own. Needs JupyterLab in the session's server (the local backend: "
        "the 'ui' extra). Off: /s/{id}/lab and /s/{id}/tree answer a page saying the UI "
        "is not offered, and the local backend starts its servers without the UI's "
        "extensions (JupyterLab, jupyter-lsp, terminals), which would cost each server "
        "memory and start-up CPU for nothing.",
    )
    jupyter_ui_terminals: bool = Field(
        False,
        description="With BROKER_JUPYTER_UI on, also proxy terminals (a shell on the "
        "session's server, its WebSocket counted like a kernel's against "
        "BROKER_WS_SESSION_MAX_CONNECTIONS); the local backend starts its servers with "
        "terminals enabled. Off: terminal paths are not forwarded and local servers have "
        "no terminals.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the broker's own loggers."
    )
    log_format: Literal["auto", "json", "plain"] = Field(
        "auto",
        description="'json': one JSON object per line (time, level, logger, message, "
        "request_id, fields), for log collectors; 'plain': human-readable lines; 'auto': plain "
        "when stderr is a terminal (make run), JSON otherwise (containers, CI). Tokens are "
        "scrubbed from both.",
    )
    shutdown_drain: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM, seconds to let open kernel WebSockets finish before they are "
        "closed with 1001 (going away) so clients reconnect to another replica. Sessions stay "
        "in the store. Keep it below the pod's terminationGracePeriodSeconds.",
    )

    @field_validator("allowed_origins", "trusted_proxies", "local_server_args", mode="before")
    @classmethod
    def _comma_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("allowed_origins")
    @classmethod
    def _normalise_origins(cls, value: list[str]) -> list[str]:
        return [origin.rstrip("/").lower() for origin in value]

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @field_validator("hub_user_prefix")
    @classmethod
    def _hub_prefix(cls, value: str) -> str:
        # JupyterHub lower-cases user names; a prefix it would change would break clean-up.
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,31}", value):
            raise ValueError("BROKER_HUB_USER_PREFIX must be 1-32 lower-case letters, digits, "
                             "'-', '_' or '.', starting with a letter or digit")
        return value

    @field_validator("public_url", "hub_url", "hub_public_url", "binder_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("binder_hub_url")
    @classmethod
    def _strip_binder_hub_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("build_profiles", mode="before")
    @classmethod
    def _profile_pairs(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("build_profiles")
    @classmethod
    def _valid_profile_pairs(cls, value: list[str]) -> list[str]:
        for pair in value:
            pattern, sep, profile = pair.partition("=")
            name = profile.strip()
            name_ok = 0 < len(name) <= 100 and name[0].isalnum() and all(
                c.isascii() and (c.isalnum() or c in "._-") for c in name
            )
            if not sep or not pattern.strip() or not name_ok:
                raise ValueError(f"BROKER_BUILD_PROFILES entry {pair!r} is not pattern=profile "
                                 "(profile: letters, digits, '.', '_', '-')")
        return value

    @field_validator("spec_quotas", "deny_networks", "pool", mode="before")
    @classmethod
    def _limit_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("spec_quotas")
    @classmethod
    def _valid_spec_quotas(cls, value: list[str]) -> list[str]:
        parse_spec_quotas(value)
        return value

    @field_validator("pool")
    @classmethod
    def _valid_pool(cls, value: list[str]) -> list[str]:
        parse_pools(value)
        return value

    @field_validator("deny_networks")
    @classmethod
    def _valid_deny_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"BROKER_DENY_NETWORKS entry {net!r} is not a network") from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _valid_api_keys(cls, value: SecretStr) -> SecretStr:
        parse_api_keys(value.get_secret_value())
        return value

    @field_validator("upstreams")
    @classmethod
    def _valid_upstreams(cls, value: SecretStr) -> SecretStr:
        parse_upstreams(value.get_secret_value())
        return value

    @field_validator("page")
    @classmethod
    def _page(cls, value: str) -> str:
        word = value.strip().lower()
        if word in ("on", "true", "1", "yes"):
            return "on"
        if word in ("off", "false", "0", "no"):
            return "off"
        if not (Path(value) / "index.html").is_file():
            raise ValueError(f"BROKER_PAGE must be on, off or a directory holding an "
                             f"index.html; {value!r} is none of these")
        return value

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str) -> str:
        check_redis_url(value)
        return value

    @property
    def spawn_deadline(self) -> float:
        """Longest a session may stay pending: its wait in the spawn queue, then its spawn."""
        return self.spawn_queue_timeout + self.spawn_timeout

    @model_validator(mode="after")
    def _backend_needs(self) -> Settings:
        if self.backend == "jupyterhub" and not self.hub_url:
            raise ValueError("BROKER_BACKEND=jupyterhub needs BROKER_HUB_URL")
        if self.backend == "jupyterhub" and not self.hub_api_token.get_secret_value():
            raise ValueError("BROKER_BACKEND=jupyterhub needs BROKER_HUB_API_TOKEN")
        if self.backend == "binderhub" and not self.binder_url:
            raise ValueError("BROKER_BACKEND=binderhub needs BROKER_BINDER_URL")
        if self.jupyter_ui_terminals and not self.jupyter_ui:
            raise ValueError("BROKER_JUPYTER_UI_TERMINALS needs BROKER_JUPYTER_UI=true (terminals "
                             "are part of the proxied Jupyter UI)")
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError("BROKER_METRICS_PORT must differ from BROKER_PORT")
        if self.redis_url and not self.secret_key.get_secret_value():
            raise ValueError(
                "BROKER_REDIS_URL needs BROKER_SECRET_KEY: every replica must decrypt the "
                "upstream tokens stored in Redis"
            )
        return self


def settings_reference() -> list[tuple[str, str, str]]:
    """Rows of (env name, default, description) for every setting, in model order."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            shown = "(secret, empty)" if not default.get_secret_value() else "(secret)"
        elif isinstance(default, list):
            shown = ",".join(default)
        else:
            shown = str(default)
        rows.append((f"BROKER_{name.upper()}", shown, field.description or ""))
    return rows


#: Plain-text settings whose value may carry a password (never echoed in an error).
_MAY_HOLD_SECRETS = frozenset({"redis_url"})


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per configuration error, naming the BROKER_* variable and what it accepts.

    pydantic names the field (``backend``); the operator set ``BROKER_BACKEND``.
    A secret's value is never repeated.
    """
    lines = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "literal_error":
            message = f"accepted values are {error.get('ctx', {}).get('expected', '')}"
        elif error["type"] == "bool_parsing":
            message = "accepted values are true or false"
        if not error["loc"]:  # a model-level check: its message names its variables
            lines.append(message)
            continue
        name = str(error["loc"][0])
        field = Settings.model_fields.get(name)
        hidden = field is None or field.annotation is SecretStr or name in _MAY_HOLD_SECRETS
        value = "" if hidden else f"={error['input']}"
        lines.append(f"BROKER_{name.upper()}{value}: {message}")
    return lines


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warnings for BROKER_* variables that are no setting (a typo is otherwise silent)."""
    known = [f"BROKER_{name.upper()}" for name in Settings.model_fields]
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith("BROKER_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see session-broker config"
        warnings.append(f"{variable} is not a setting of session-broker and is ignored{hint}")
    return warnings
