"""The BinderHub stand-in against docs/protocols.md#binderhub-launch-api, so the broker's tests
test something real.

Each test quotes the protocol fact it checks. A client here is a plain
aiohttp reader of the event stream (:mod:`tests.binder.eventsource`), not
the broker, so a bug shared by stand-in and broker cannot hide.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.binder.eventsource import event_source
from tests.binderstandin import BinderStandin
from tests.conftest import pid_alive

READY_FIELDS = {"phase", "message", "url", "token", "image", "repo_url", "binder_ref_url",
                "binder_launch_host", "binder_request", "binder_persistent_request",
                "binder_client_ip"}
EVENT_OR_COMMENT = re.compile(rb"(data: \{[^\n]*\}\n\n|:keepalive\n\n)")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_build_stream_format_phases_and_a_working_server(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """Unnamed data events, messages ending in newlines, phases in order, every ready field."""
    launch = await event_source(http, f"{standin.url}/build/gh/org/repo/HEAD", eof_wait=0)
    assert launch.status == 200
    assert launch.headers["Content-Type"].startswith("text/event-stream")
    assert launch.headers["x-ratelimit-limit"] == "10"
    assert launch.headers["x-ratelimit-remaining"] == "9"
    assert not launch.named_events
    # Nothing but whole events and keepalive comments on the wire.
    assert EVENT_OR_COMMENT.sub(b"", launch.raw) == b""
    phases = [str(e.get("phase", "")) for e in launch.events]
    # Raw log lines: a capitalised phase, no phase at all, an unknown phase.
    assert phases[:5] == ["waiting", "fetching", "Building", "", "Unknown"]
    assert phases[5:7] == ["pushing", "built"]
    assert set(phases[7:-1]) == {"launching"}
    assert phases[-1] == "ready"
    assert launch.events[6]["imageName"].startswith("standin-registry/")
    assert all(e["message"].endswith("\n") for e in launch.events if "message" in e)

    ready = launch.ready
    assert set(ready) == READY_FIELDS
    assert ready["url"].startswith("http://127.0.0.1:") and ready["url"].endswith("/")
    assert "/user/" in ready["url"]
    assert ready["binder_request"] == "v2/gh/org/repo/HEAD"
    assert re.fullmatch(r"v2/gh/org/repo/[0-9a-f]{40}", ready["binder_persistent_request"])
    assert ready["repo_url"] == "https://github.com/org/repo"
    assert ready["binder_launch_host"] == f"{standin.url}/"
    assert ready["binder_client_ip"] == "127.0.0.1"
    async with http.get(f"{ready['url']}api/status",
                        headers={"Authorization": f"token {ready['token']}"}) as resp:
        assert resp.status == 200
    async with http.get(f"{ready['url']}api/status") as resp:
        assert resp.status == 403


async def test_stream_is_held_open_after_a_build_and_a_closing_client_is_noticed(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'after a build the server may hold the connection open ~60 s', sending keepalives."""
    standin.keepalive = 0.05
    after_ready: list[bytes] = []
    async with http.get(f"{standin.url}/build/gh/org/held/HEAD",
                        headers={"Accept": "text/event-stream"}) as resp:
        async for line in resp.content:
            if line.startswith(b"data:") and json.loads(line[5:]).get("phase") == "ready":
                break
        # Still open: what follows is a keepalive comment, not the end of the stream.
        while not after_ready or after_ready[-1] == b"\n":
            after_ready.append(await asyncio.wait_for(resp.content.readline(), 10))
        assert not standin.launches[-1].client_left.is_set()
        resp.close()
    assert after_ready == [b"\n", b":keepalive\n"]
    await asyncio.wait_for(standin.launches[-1].client_left.wait(), 10)


async def test_a_cached_image_starts_at_built_and_the_stream_ends_after_ready(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'A cached image starts at built ("Found built image, launching...")'."""
    first = await event_source(http, f"{standin.url}/build/gh/org/cached/HEAD", eof_wait=0)
    assert first.phases[0] == "waiting"
    again = await event_source(http, f"{standin.url}/build/gh/org/cached/HEAD", eof_wait=10)
    assert again.events[0] == {"phase": "built", "imageName": first.events[6]["imageName"],
                               "message": "Found built image, launching...\n"}
    assert again.phases[-1] == "ready"
    assert again.ready["token"] != first.ready["token"]
    assert again.server_closed_after_final  # no hold without a build


@pytest.mark.parametrize(
    ("path", "accept", "message", "status_code"),
    [
        ("gh/org/repo/HEAD", None, "Bad Request\n", 400),
        ("nope/org/repo/HEAD", "text/event-stream", "No provider found for prefix nope\n", None),
        ("gh/org/repo", "text/event-stream",
         "Spec is not of the form 'user/repo/ref', provided: org/repo\n", None),
        ("gh/org/repo/does-not-exist", "text/event-stream",
         "Could not resolve ref for gh:org/repo/does-not-exist. Double check your URL.\n", None),
    ],
)
async def test_errors_arrive_as_http_200_failed_events(
    standin: BinderStandin, http: aiohttp.ClientSession, path: str, accept: str | None,
    message: str, status_code: int | None,
) -> None:
    """'Errors arrive as HTTP 200 with {"phase": "failed", "message", "status_code"}'."""
    launch = await event_source(http, f"{standin.url}/build/{path}", accept=accept, eof_wait=10)
    assert launch.status == 200
    assert launch.events == [launch.final]
    expected: dict[str, Any] = {"phase": "failed", "message": message}
    if status_code is not None:
        expected["status_code"] = status_code
    assert launch.final == expected
    assert launch.server_closed_after_final
    assert not standin.servers


async def test_rate_limit_is_a_429_failed_event_with_ratelimit_headers(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'Rate limit: failed with status_code 429, "Rate limit exceeded. Try again in N seconds."'"""
    standin.rate_limit = 0
    launch = await event_source(http, f"{standin.url}/build/gh/org/repo/HEAD", eof_wait=10)
    assert launch.status == 200
    assert launch.headers["x-ratelimit-remaining"] == "0"
    assert int(launch.headers["x-ratelimit-reset"]) > 0
    assert launch.final is not None and launch.final["status_code"] == 429
    match = re.fullmatch(r"Rate limit exceeded\. Try again in (\d+) seconds\.\n",
                         launch.final["message"])
    assert match and 0 < int(match.group(1)) <= 3600
    assert not standin.servers


async def test_quotas_are_failed_events_without_status_code(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'Too many users running {repo_url}! Try again soon.' / '... on this BinderHub! ...'"""
    standin.repo_quota = 1
    first = await event_source(http, f"{standin.url}/build/gh/org/popular/HEAD", eof_wait=0)
    assert first.phases[-1] == "ready"
    per_repo = await event_source(http, f"{standin.url}/build/gh/org/popular/v2", eof_wait=0)
    assert per_repo.final == {
        "phase": "failed",
        "message": "Too many users running https://github.com/org/popular! Try again soon.\n",
    }
    standin.total_quota = 1
    total = await event_source(http, f"{standin.url}/build/gh/org/other/HEAD", eof_wait=0)
    assert total.final == {"phase": "failed",
                           "message": "Too many users on this BinderHub! Try again soon.\n"}
    assert len(standin.servers) == 1


async def test_launch_retries_and_a_last_failed_attempt(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'"Launch attempt N failed, retrying..."' then ready; the last failure escapes as 500."""
    standin.launch_failures = 1
    retried = await event_source(http, f"{standin.url}/build/gh/org/flaky/HEAD", eof_wait=0)
    messages = [e.get("message") for e in retried.events]
    assert "Launch attempt 1 failed, retrying...\n" in messages
    assert retried.phases[-1] == "ready"
    standin.launch_failures = 3
    failed = await event_source(http, f"{standin.url}/build/gh/org/broken/HEAD", eof_wait=0)
    assert failed.final == {"phase": "failed", "message": "Internal Server Error\n",
                            "status_code": 500}


async def test_spec_is_taken_from_the_raw_path(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'The spec is taken from the raw path, so %2F stays escaped.'"""
    launch = await event_source(http, f"{standin.url}/build/gl/group%2Fproject/main",
                                eof_wait=0)
    assert standin.launches[-1].spec == "gl/group%2Fproject/main"
    assert launch.ready["repo_url"] == "https://gitlab.com/group/project"
    assert launch.ready["binder_request"] == "v2/gl/group%2Fproject/main"


async def test_hub_api_stops_a_server_only_with_the_hub_token(
    standin: BinderStandin, http: aiohttp.ClientSession
) -> None:
    """'A broker that also holds the hub's API token can stop them itself.'"""
    launch = await event_source(http, f"{standin.url}/build/gh/org/stop-me/HEAD", eof_wait=0)
    (name,) = standin.servers
    assert f"/user/{name}/" in launch.ready["url"]
    pid = standin.servers[name].proc.pid
    api = f"{standin.url}/hub/api/users/{name}/server"
    async with http.delete(api, headers={"Authorization": "token wrong"}) as resp:
        assert resp.status == 403
    assert pid_alive(pid)
    async with http.delete(api, headers={"Authorization": f"token {standin.hub_token}"}) as resp:
        assert resp.status == 204
    assert not pid_alive(pid)
    assert standin.stopped == [name]
    async with http.delete(api, headers={"Authorization": f"token {standin.hub_token}"}) as resp:
        assert resp.status == 404


async def test_health_and_versions(standin: BinderStandin, http: aiohttp.ClientSession) -> None:
    """'GET /health → {"ok", "checks": [...]}', 'GET /versions → {builder_info, binderhub}'."""
    async with http.get(f"{standin.url}/health") as resp:
        health = await resp.json()
    assert resp.status == 200
    assert health["ok"] is True and all({"service", "ok"} <= set(c) for c in health["checks"])
    async with http.get(f"{standin.url}/versions") as resp:
        versions = await resp.json()
    assert set(versions) == {"builder_info", "binderhub"}
