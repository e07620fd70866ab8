"""The members of ``BROKER_UPSTREAMS``: several upstreams behind one broker.

A member is one JupyterHub or BinderHub, described by the same settings a
single upstream takes, without their ``BROKER_`` prefix (``hub_url``,
``hub_api_token``, ``binder_url``, ...), plus a ``name`` (stored with each
session it serves, and the ``member`` label of the federation metrics), a
``weight`` (its share of new sessions; 0 drains it) and an optional
``max_sessions``. This module only parses and checks them; the settings
model validates ``BROKER_UPSTREAMS`` with it and
:mod:`broker.backends.federation` builds a backend per member.

The value is a JSON list, or ``@/path/to/file.json`` naming a file that holds
one (a mounted Secret: members carry API tokens). Unknown fields are refused,
so a misspelt one is an error at start-up instead of a silent default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError

from broker.models import OPERATOR_NAME

#: Members at most: their names are metric label values, so the set stays small.
MAX_MEMBERS = 32


class UpstreamMember(BaseModel):
    """One upstream of a federation (see docs/federation.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=OPERATOR_NAME)
    backend: Literal["jupyterhub", "binderhub"]
    weight: int = Field(1, ge=0, le=1000)
    #: Live sessions this member may hold (0 = unlimited); counted from the store
    #: every health interval plus the placements this replica made since.
    max_sessions: int = Field(0, ge=0)
    hub_url: str = ""
    hub_api_token: SecretStr = SecretStr("")
    hub_public_url: str = ""
    hub_user_prefix: str = Field("broker-", pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$")
    hub_named_servers: bool = False
    binder_url: str = ""
    binder_hub_url: str = ""
    binder_hub_api_token: SecretStr = SecretStr("")
    binder_connect_timeout: float = Field(10.0, gt=0)
    binder_read_timeout: float = Field(90.0, gt=0)

    def health_url(self) -> str:
        """What the federation asks every health interval: the hub API's root, or
        BinderHub's ``/versions`` (both answer 200 without a token when up; see
        docs/protocols.md#jupyterhub-rest-api and docs/protocols.md#binderhub-launch-api)."""
        if self.backend == "jupyterhub":
            return f"{self.hub_url.rstrip('/')}/hub/api/"
        return f"{self.binder_url.rstrip('/')}/versions"


_MEMBERS = TypeAdapter(list[UpstreamMember])


def parse_upstreams(value: str) -> list[UpstreamMember]:
    """The members named by a ``BROKER_UPSTREAMS`` value ([] for an empty one).

    Raises ValueError with a message naming the member and field at fault
    (never repeating a token).
    """
    text = value.strip()
    if not text:
        return []
    source = "BROKER_UPSTREAMS"
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"BROKER_UPSTREAMS names {path}, which cannot be read: "
                             f"{exc.strerror}") from None
        source = str(path)
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source} is not JSON: {exc}") from None
    try:
        members = _MEMBERS.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False))
        raise ValueError(f"{source}: {problems}") from None
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"{source}: at most {MAX_MEMBERS} members")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: member names must be unique")
    for member in members:
        if member.backend == "jupyterhub" and not (
                member.hub_url and member.hub_api_token.get_secret_value()):
            raise ValueError(f"{source}: member {member.name!r} (jupyterhub) needs hub_url "
                             "and hub_api_token")
        if member.backend == "binderhub" and not member.binder_url:
            raise ValueError(f"{source}: member {member.name!r} (binderhub) needs binder_url")
    if members and not any(m.weight for m in members):
        raise ValueError(f"{source}: at least one member needs a weight above 0")
    return members
