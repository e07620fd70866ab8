"""BROKER_UPSTREAMS parsing and the federation's choice of member (no upstream needed:
choosing is pure; the hub tests in tests/hub/test_federation.py spawn for real)."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from broker.backends import federation as federation_backend
from broker.backends.base import BackendContext
from broker.backends.federation import FederationBackend
from broker.errors import Unavailable
from broker.models import Session
from broker.settings import Settings
from broker.upstream.session import UpstreamAccess
from broker.upstreams import parse_upstreams


def hub(name: str, weight: int = 1, **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "jupyterhub", "hub_url": f"http://{name}.invalid",
            "hub_api_token": "secret-token", "weight": weight, **extra}


def session(spec: str = "") -> Session:
    return Session(id="s1", token_hash="", owner="o", backend="federation", created_at=0,
                   expires_at=1, spec=spec)


async def federation(members: list[dict[str, Any]], **settings: Any) -> FederationBackend:
    values = Settings(upstreams=json.dumps(members), **settings)
    async with aiohttp.ClientSession() as http:  # nothing is sent: choosing is local
        backend = federation_backend.create(BackendContext(values, http, UpstreamAccess()))
    assert isinstance(backend, FederationBackend)
    return backend


def test_parse_rejects_what_would_misroute() -> None:
    assert parse_upstreams("") == []
    with pytest.raises(ValueError, match="unique"):
        parse_upstreams(json.dumps([hub("a"), hub("a")]))
    with pytest.raises(ValueError, match="needs hub_url"):
        parse_upstreams(json.dumps([{"name": "a", "backend": "jupyterhub"}]))
    with pytest.raises(ValueError, match="weight above 0"):
        parse_upstreams(json.dumps([hub("a", 0)]))
    with pytest.raises(ValueError, match=r"0\.hub_ur: Extra inputs"):
        parse_upstreams(json.dumps([hub("a", hub_ur="typo")]))
    with pytest.raises(ValidationError) as caught:  # through the settings, token not echoed
        Settings(upstreams=json.dumps([hub("A b")]))
    assert "secret-token" not in str(caught.value)


def test_parse_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.json"
    path.write_text(json.dumps([hub("a"), {"name": "b", "backend": "binderhub",
                                           "binder_url": "http://b.invalid"}]))
    members = parse_upstreams(f"@{path}")
    assert [m.name for m in members] == ["a", "b"]
    assert members[1].health_url() == "http://b.invalid/versions"
    assert members[0].health_url() == "http://a.invalid/hub/api/"
    with pytest.raises(ValueError, match="cannot be read"):
        parse_upstreams(f"@{tmp_path / 'missing.json'}")


async def test_weighted_round_robin_is_smooth_and_exact() -> None:
    backend = await federation([hub("a", 3), hub("b", 1)])
    firsts = [backend.order(session())[0].name for _ in range(40)]
    assert firsts[:4] == ["a", "a", "b", "a"]  # smooth: b is not left to the end
    assert collections.Counter(firsts) == {"a": 30, "b": 10}
    assert [m.name for m in backend.order(session())][1:] == ["b"]  # the fallback follows


async def test_down_full_and_drained_members_get_nothing() -> None:
    backend = await federation([hub("a", 1, max_sessions=2), hub("b", 1), hub("c", 0)])
    a, b, _ = backend.members
    b.up = False
    assert [m.name for m in backend.order(session())] == ["a"]
    a.live = 2
    with pytest.raises(Unavailable) as full:
        backend.order(session())
    assert full.value.reason == "capacity" and full.value.status == 503
    a.up = False
    with pytest.raises(Unavailable) as down:
        backend.order(session())
    assert down.value.reason == "upstream_unreachable"


async def test_spec_affinity_is_stable_and_weighted() -> None:
    backend = await federation([hub("a", 3), hub("b", 1)], upstreams_affinity="spec")
    specs = [f"gh/org/repo-{i}/HEAD" for i in range(400)]
    picks = {spec: backend.order(session(spec))[0].name for spec in specs}
    assert picks == {spec: backend.order(session(spec))[0].name for spec in specs}
    share = collections.Counter(picks.values())
    assert 0.65 <= share["a"] / len(specs) <= 0.85, share  # weight 3 of 4
    # A member leaving moves only its own specs.
    backend.members[1].up = False
    assert all(backend.order(session(s))[0].name == "a" for s, m in picks.items() if m == "a")
