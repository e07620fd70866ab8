"""The broker's own BinderHub-compatible ``GET /build/{provider}/{spec}``.

Streams are read the way thebe reads them (:mod:`tests.binder.eventsource`:
an EventSource GET with the page's Origin, unnamed events, lower-cased
phases, closed on ready/failed), and the ready event is then used exactly
as thebe-core uses it: ``GET api/kernels?token=`` to check a saved session,
``api/status``, ``POST api/sessions`` as text/plain JSON with kernel name
``python``, and the kernel WebSocket with the token only in ``?token=``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest

from broker import appkeys
from broker.backends.local import LocalBackend
from broker.models import MAX_EXTRA_TOKENS
from tests.binder.conftest import BOOK, OTHER_BOOK, BinderBroker
from tests.binder.eventsource import Launch, event_source
from tests.binderstandin import BinderStandin
from tests.conftest import BrokerHarness, MakeBroker
from tests.kernelproto import V1, execute

SPEC = "gh/owner/repo/HEAD"


async def launch(broker: BrokerHarness, spec: str = SPEC, *, origin: str | None = BOOK,
                 **kwargs: Any) -> Launch:
    return await event_source(broker.http, f"{broker.url}/build/{spec}", origin=origin, **kwargs)


def local_pids(broker: BrokerHarness) -> dict[str, int]:
    """Server processes of the local backend, by session id."""
    backend = broker.app[appkeys.BACKEND]
    assert isinstance(backend, LocalBackend)
    return backend.pids()


async def status_with(broker: BrokerHarness, ready: dict[str, Any], path: str,
                      token: str) -> int:
    """thebe's saved-session check: ``GET {baseUrl}{path}?token=...``."""
    async with broker.http.get(f"{ready['url']}{path}", params={"token": token}) as resp:
        return resp.status


async def test_thebe_launches_and_uses_a_session_through_build(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(allowed_origins=[BOOK])
    result = await launch(broker)

    assert result.status == 200
    assert result.headers["Content-Type"].startswith("text/event-stream")
    assert result.headers["Access-Control-Allow-Origin"] == BOOK
    assert not result.named_events
    assert result.phases[0] == "waiting"
    assert "launching" in result.phases
    assert result.phases[-1] == "ready"
    assert all(e["message"].endswith("\n") for e in result.events)
    assert result.server_closed_after_final and result.after_final == b""

    ready = result.ready
    session_id = ready["url"].rstrip("/").rsplit("/", 1)[-1]
    assert ready["url"] == f"{broker.url}/s/{session_id}/"
    assert ready["message"] == f"server running at {ready['url']}\n"
    assert ready["binder_request"] == f"v2/{SPEC}"
    assert ready["binder_launch_host"] == f"{broker.url}/"
    assert ready["repo_url"] == "https://github.com/owner/repo"
    assert ready["binder_client_ip"] == "127.0.0.1"
    stored = await broker.store.get(session_id)
    assert stored.spec == SPEC and stored.status.value == "ready"
    assert stored.upstream_token not in result.raw.decode()

    # thebe-core after ready: baseUrl = url, wsUrl = 'ws' + url[4:], token = token.
    base_url, token = ready["url"], ready["token"]
    ws_url = "ws" + base_url[4:]
    assert await status_with(broker, ready, "api/kernels", token) == 200
    auth = {"Authorization": f"token {token}", "Origin": BOOK}
    async with broker.http.get(f"{base_url}api/status", headers=auth) as resp:
        assert resp.status == 200
    async with broker.http.post(
        f"{base_url}api/sessions",
        data=b'{"name":"thebe.ipynb","path":"/","type":"notebook","kernel":{"name":"python"}}',
        headers=auth | {"Content-Type": "text/plain;charset=UTF-8"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        kernel_id = (await resp.json())["kernel"]["id"]
    async with broker.http.ws_connect(
        f"{ws_url}api/kernels/{kernel_id}/channels",
        params={"session_id": uuid.uuid4().hex, "token": token},
        protocols=[V1], headers={"Origin": BOOK},
    ) as ws:
        assert ws.protocol == V1
        result_42 = await execute(ws, "print(6*7)")
    assert result_42.stdout == "42\n"
    # A wrong token opens nothing.
    assert await status_with(broker, ready, "api/kernels", "not-the-token") == 403


def session_id_of(ready: dict[str, Any]) -> str:
    return str(ready["url"]).rstrip("/").rsplit("/", 1)[-1]


async def test_a_relaunch_is_a_new_session_unless_it_presents_a_token(
    make_broker: MakeBroker,
) -> None:
    """Address and Origin prove nothing (a classroom shares them); a token does."""
    broker = await make_broker(allowed_origins=[BOOK, OTHER_BOOK])
    first = (await launch(broker)).ready
    second = (await launch(broker)).ready
    assert second["url"] != first["url"]
    assert await status_with(broker, second, "api/kernels", first["token"]) == 403
    assert len(local_pids(broker)) == 2

    # The token of the first launch, as a header or in the query, brings that session back
    # with that same token: nothing is minted, so nothing can ever be pushed out.
    for extra in ({"headers": {"Authorization": f"token {first['token']}"}},
                  {"query": f"?token={first['token']}"}):
        spec = SPEC + str(extra.get("query", ""))
        again_launch = await launch(broker, spec, headers=extra.get("headers"))
        again = again_launch.ready
        assert (again["url"], again["token"]) == (first["url"], first["token"])
        assert "Found your running session, reconnecting...\n" in [
            e["message"] for e in again_launch.events]
    stored = await broker.store.get(session_id_of(first))
    assert stored is not None and stored.extra_token_hashes == []
    assert len(local_pids(broker)) == 2
    # A token opens only its own spec's session; a token that opens nothing is a new launch.
    other_spec = (await launch(broker, "gh/owner/repo/main",
                               headers={"Authorization": f"token {first['token']}"})).ready
    assert other_spec["url"] not in (first["url"], second["url"])
    assert other_spec["token"] != first["token"]


async def recovered_natively(broker: BrokerHarness, ready: dict[str, Any]) -> None:
    """POST /api/v1/sessions with a /build token answers 200 with that session."""
    async with broker.http.post(f"{broker.url}/api/v1/sessions", json={"spec": SPEC},
                                headers={"Authorization": f"token {ready['token']}"}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["id"] == session_id_of(ready)
    assert body["token"] == ready["token"]
    assert len(local_pids(broker)) == 1


async def test_a_build_token_recovers_its_session_through_the_native_api(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(allowed_origins=[BOOK])
    await recovered_natively(broker, (await launch(broker)).ready)


async def test_a_cookie_launched_session_is_recovered_by_its_token_too(
    make_broker: MakeBroker,
) -> None:
    """With the cookie the session carries its visitor: another reuse key than the POST's."""
    broker = await make_broker(allowed_origins=[BOOK], build_visitor_cookie=True)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        ready = (await event_source(jar, f"{broker.url}/build/{SPEC}", origin=BOOK)).ready
    stored = await broker.store.get(session_id_of(ready))
    assert stored is not None and stored.visitor
    await recovered_natively(broker, ready)


async def test_concurrent_launches_without_proof_get_their_own_sessions(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(allowed_origins=[BOOK])
    one, two = await asyncio.gather(launch(broker), launch(broker))
    assert one.ready["url"] != two.ready["url"]
    assert await status_with(broker, one.ready, "api/kernels", two.ready["token"]) == 403
    assert await status_with(broker, two.ready, "api/kernels", one.ready["token"]) == 403
    assert len(local_pids(broker)) == 2


async def test_reuse_checks_the_upstream_is_alive_first(make_broker: MakeBroker) -> None:
    broker = await make_broker(allowed_origins=[BOOK])
    first = (await launch(broker)).ready
    session_id = session_id_of(first)
    session = await broker.store.get(session_id)
    # The server goes away without the broker noticing (no exit report).
    await broker.app[appkeys.BACKEND].stop(session)
    assert (await broker.store.get(session_id)).status.value == "ready"

    fresh = (await launch(broker, headers={"Authorization": f"token {first['token']}"})).ready
    assert fresh["url"] != first["url"]
    old = await broker.store.get(session_id)
    assert (old.status.value, old.ended_reason) == ("stopped", "upstream_gone")
    assert await status_with(broker, fresh, "api/kernels", fresh["token"]) == 200


async def test_reuse_can_be_switched_off(make_broker: MakeBroker) -> None:
    broker = await make_broker(allowed_origins=[BOOK], build_reuse=False)
    first = (await launch(broker)).ready
    second = (await launch(broker, headers={"Authorization": f"token {first['token']}"})).ready
    assert first["url"] != second["url"]


async def test_a_visitor_cookie_separates_people_behind_one_address(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(build_visitor_cookie=True)
    # Same-origin page: no Origin header, the cookie comes back by itself.
    # unsafe=True: aiohttp's jar otherwise ignores cookies from IP-address hosts.
    jar_a = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    jar_b = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        a1 = await event_source(jar_a, f"{broker.url}/build/{SPEC}")
        cookie = a1.headers["Set-Cookie"]
        assert "broker_visitor=" in cookie and "HttpOnly" in cookie and "Path=/build" in cookie
        a2 = await event_source(jar_a, f"{broker.url}/build/{SPEC}")
        b1 = await event_source(jar_b, f"{broker.url}/build/{SPEC}")
    finally:
        await jar_a.close()
        await jar_b.close()
    assert a2.ready["url"] == a1.ready["url"]
    assert a2.ready["token"] != a1.ready["token"]
    assert "Set-Cookie" not in a2.headers
    assert b1.ready["url"] != a1.ready["url"]


async def test_every_token_a_session_issued_keeps_opening_it(make_broker: MakeBroker) -> None:
    """Cookie-proven reloads mint tokens up to the bound, then start a new session:
    no reload ever invalidates a token an open page still holds."""
    broker = await make_broker(build_visitor_cookie=True)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as jar:
        loads = [(await event_source(jar, f"{broker.url}/build/{SPEC}")).ready
                 for _ in range(MAX_EXTRA_TOKENS + 3)]
    first_url = loads[0]["url"]
    # The first load and MAX_EXTRA_TOKENS reloads share a session; later reloads do not.
    assert [r["url"] == first_url for r in loads] == (
        [True] * (MAX_EXTRA_TOKENS + 1) + [False, False])
    assert loads[-1]["url"] == loads[-2]["url"]  # the new session is reused in turn
    assert len({r["token"] for r in loads}) == len(loads)
    for ready in loads:
        assert await status_with(broker, ready, "api/kernels", ready["token"]) == 200
    stored = await broker.store.get(session_id_of(loads[0]))
    assert stored is not None and len(stored.extra_token_hashes) == MAX_EXTRA_TOKENS


@pytest.mark.parametrize(
    "spec",
    [
        "gh/owner/repo",  # no ref
        "gh/owner/repo/a..b",  # not a git ref
        "gh/-owner/repo/HEAD",
        "nope/owner/repo/HEAD",  # unknown provider
        "gl/project-only/main",  # namespace needs group%2Fproject
        "git/file%3A%2F%2F%2Fetc%2Fpasswd/HEAD",  # local clone URL
        "git/https%3A%2F%2Fuser%3Apw%40example.org%2Fr.git/HEAD",  # credentials
        "zenodo/not-a-doi",
        "hydroshare/xyz",
        "gh/owner/repo/HEAD%00",
    ],
)
async def test_a_malformed_spec_gets_a_failed_event_and_no_spawn(
    make_broker: MakeBroker, spec: str
) -> None:
    broker = await make_broker(allowed_origins=[BOOK])
    result = await launch(broker, spec)
    assert result.status == 200
    assert result.headers["Access-Control-Allow-Origin"] == BOOK
    assert result.events == [result.final]
    assert result.final is not None
    assert result.final["phase"] == "failed" and result.final["status_code"] == 400
    assert result.server_closed_after_final
    assert await broker.store.count_live() == 0
    assert local_pids(broker) == {}


async def test_without_accept_event_stream_the_answer_is_a_failed_400_event(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker()
    result = await launch(broker, accept=None, origin=None)
    assert result.status == 200
    assert result.final == {"phase": "failed", "status_code": 400, "reason": "bad_request",
                            "message": "The launch endpoint answers Accept: text/event-stream "
                                       "only\n"}
    assert await broker.store.count_live() == 0


async def test_broker_refusals_are_failed_events_with_their_status(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(allowed_origins=[BOOK], max_sessions_per_owner=1)
    first = (await launch(broker)).ready
    refused = await launch(broker, "gh/owner/another/HEAD")
    assert refused.status == 200
    assert refused.final is not None and refused.final["status_code"] == 429
    assert refused.final["reason"] and refused.final["retry_after"] >= 1
    assert "live sessions" in refused.final["message"]
    # Reuse (proven by the session's token) does not count against the owner's limit.
    assert (await launch(broker, headers={"Authorization": f"token {first['token']}"})).ready

    capped = await make_broker(allowed_origins=[BOOK], max_sessions=1)
    assert (await launch(capped)).ready
    full = await launch(capped, "gh/owner/another/HEAD")
    assert full.final is not None and full.final["status_code"] == 503


async def test_a_foreign_origin_or_a_head_request_gets_no_launch(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(allowed_origins=[BOOK])
    async with broker.http.head(f"{broker.url}/build/{SPEC}",
                                headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 405
    # A foreign page's EventSource can read why (one failed event), and nothing starts.
    async with broker.http.get(f"{broker.url}/build/{SPEC}",
                               headers={"Accept": "text/event-stream",
                                        "Origin": "https://evil.example"}) as resp:
        assert resp.status == 200
        events = [json.loads(line[6:]) for line in (await resp.text()).splitlines()
                  if line.startswith("data: ")]
        assert [(e["phase"], e["status_code"], e["reason"]) for e in events] == [
            ("failed", 403, "origin")]
        assert "BROKER_ALLOWED_ORIGINS" in events[0]["message"]
    assert await broker.store.count_live() == 0


async def test_spec_profiles_follow_the_patterns(make_broker: MakeBroker) -> None:
    broker = await make_broker(allowed_origins=[BOOK],
                               build_profiles=["gh/other/*=nope", "gh/owner/*=small"])
    ready = (await launch(broker)).ready
    stored = await broker.store.get(ready["url"].rstrip("/").rsplit("/", 1)[-1])
    assert stored.profile == "small"


# -- /build over the binderhub backend ---------------------------------------------------


async def test_keepalives_flow_while_binderhub_is_busy(
    standin: BinderStandin, binder_broker: BinderBroker
) -> None:
    standin.gate = asyncio.Event()
    broker = await binder_broker(build_keepalive=0.05)
    comments = 0

    async def watch(item: dict[str, Any] | str) -> None:
        nonlocal comments
        if item == ":keepalive":
            comments += 1
            if comments == 2:  # proven twice while BinderHub was holding the launch
                assert standin.gate is not None
                standin.gate.set()

    result = await launch(broker, on_event=watch)
    assert comments >= 2
    assert result.phases[-1] == "ready"
    assert result.ready["url"].startswith(f"{broker.url}/s/")
    # BinderHub's own fields where known: the image and the resolved ref.
    assert result.ready["image"].startswith("standin-registry/")
    assert result.ready["binder_persistent_request"].startswith("v2/gh/owner/repo/")
    assert result.ready["binder_persistent_request"] != "v2/gh/owner/repo/HEAD"
    # BinderHub's phases pass through as progress.
    for phase in ("fetching", "building", "pushing", "built", "launching"):
        assert phase in result.phases


@pytest.mark.parametrize(
    ("knob", "status_code", "message"),
    [
        ("rate_limit", 429, "Rate limit exceeded. Try again in "),
        ("total_quota", 503, "Too many users on this BinderHub! Try again soon."),
        ("repo_quota", 503, "Too many users running https://github.com/owner/repo! Try again"),
    ],
)
async def test_binderhub_refusals_surface_as_failed_events(
    standin: BinderStandin, binder_broker: BinderBroker, knob: str, status_code: int,
    message: str,
) -> None:
    broker = await binder_broker()
    if knob == "rate_limit":
        standin.rate_limit = 0
    else:
        # Another visitor's server of the same repo fills the quota of 1.
        assert (await launch(broker, "gh/owner/repo/v1", origin=OTHER_BOOK)).ready
        setattr(standin, knob, 1)
    result = await launch(broker)
    assert result.status == 200
    assert result.final is not None
    assert result.final["phase"] == "failed"
    assert result.final["status_code"] == status_code
    assert result.final["message"].startswith(message)
