"""The broker's one configuration model.

Every setting comes from the environment (prefix ``BROKER_``) or an optional
``.env`` file. Each field's description is the documentation: ``session-broker
config`` prints it, and ``docs/configuration.md`` is generated from it, so a
setting is described exactly once, here.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    """Accept ``a,b , c`` from the environment as well as a real list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


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
    public_url: str = Field(
        "",
        description="External base URL of the broker (e.g. https://broker.example.org), used in "
        "the base_url/ws_url handed to clients. Empty: derived from each request's Host and "
        "scheme (X-Forwarded-Proto/Host only from BROKER_TRUSTED_PROXIES).",
    )
    redis_url: str = Field(
        "",
        description="Redis URL for sessions (and, later, limits). Empty: an in-process memory "
        "store, correct for a single replica only; sessions are lost on restart. Several "
        "replicas must share one Redis and one BROKER_SECRET_KEY.",
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
    backend: Literal["local", "jupyterhub", "binderhub"] = Field(
        "local",
        description="Where sessions run: 'local' starts one `jupyter server` process per "
        "session on this machine (single replica, development and small sites); "
        "'jupyterhub' and 'binderhub' spawn through BROKER_HUB_URL / BROKER_BINDER_URL.",
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
    build_keepalive: float = Field(
        25.0,
        gt=0,
        description="Seconds between ':keepalive' comments on the broker's own /build event "
        "streams (BinderHub's interval), so proxies do not drop a launch that is waiting.",
    )
    build_reuse: bool = Field(
        True,
        description="/build: hand a visitor who launches the same spec again their live session "
        "(checked alive upstream first) with a freshly minted token, instead of a new session. "
        "The visitor is the client address (BROKER_TRUSTED_PROXIES) plus the page's Origin, "
        "plus BROKER_BUILD_VISITOR_COOKIE when on; people behind one NAT on the same page "
        "therefore share a session. Turn off where that is unacceptable (then every launch is "
        "a new session, limited by BROKER_MAX_SESSIONS_PER_OWNER).",
    )
    build_visitor_cookie: bool = Field(
        False,
        description="/build: also identify visitors by a first-party cookie the broker sets, so "
        "people behind one NAT get separate sessions. Only works for pages served from the "
        "broker's own origin (a cross-origin EventSource sends no cookies); on other pages "
        "leave it off, or every launch would start a new session.",
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
        "as failed (504).",
    )
    admin_token: SecretStr = Field(
        SecretStr(""), description="Token for /api/v1/admin/...; empty disables the admin API."
    )
    allowed_origins: CommaList = Field(
        default_factory=list,
        description="Comma-separated browser origins allowed to call the broker (CORS and "
        "WebSocket Origin check), e.g. https://book.example.org. '*' allows any origin (safe "
        "enough: tokens travel in headers, never cookies). Empty: same-origin only.",
    )
    max_sessions: int = Field(
        0,
        ge=0,
        description="Live sessions in total across all replicas (capacity); 0 = unlimited. "
        "Beyond it, creation is refused with 503 and Retry-After.",
    )
    max_sessions_per_owner: int = Field(
        3,
        ge=0,
        description="Live sessions per owner (client IP, IPv6 /64); 0 = unlimited. Beyond it, "
        "creation is refused with 429. Reusing a session does not count.",
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the broker's own loggers."
    )
    log_format: Literal["json", "plain"] = Field(
        "json",
        description="'json': one JSON object per line (time, level, logger, message, "
        "request_id, fields), for log collectors; 'plain': human-readable lines. Tokens are "
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

    @model_validator(mode="after")
    def _backend_needs(self) -> Settings:
        if self.backend == "jupyterhub" and not self.hub_url:
            raise ValueError("BROKER_BACKEND=jupyterhub needs BROKER_HUB_URL")
        if self.backend == "jupyterhub" and not self.hub_api_token.get_secret_value():
            raise ValueError("BROKER_BACKEND=jupyterhub needs BROKER_HUB_API_TOKEN")
        if self.backend == "binderhub" and not self.binder_url:
            raise ValueError("BROKER_BACKEND=binderhub needs BROKER_BINDER_URL")
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
