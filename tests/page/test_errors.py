"""Errors that name the fix: origins, /build refusals, configuration, the banner.

Messages are checked verbatim where a newcomer reads them: they are the
documentation at the moment of the first mistake.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker.cli import open_url
from broker.settings import Settings
from tests.brokerproc import broker_process
from tests.conftest import BrokerHarness, MakeBroker

FOREIGN = "https://book.example.org"
REFUSAL = ("Origin https://book.example.org is not allowed: add it to BROKER_ALLOWED_ORIGINS "
           "(comma-separated, e.g. BROKER_ALLOWED_ORIGINS=https://book.example.org) to let its "
           "pages use this broker")


async def _get(broker: BrokerHarness, path: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with broker.http.get(f"{broker.url}{path}", headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_the_brokers_own_origin_is_allowed_without_a_public_url(
        broker: BrokerHarness) -> None:
    """The page at / calls the API from the broker's own origin (was: 403 origin)."""
    status, headers, body = await _get(broker, "/api/v1/sessions/nosuchsession",
                                       {"Origin": broker.url})
    assert status == 401, body  # reached the handler: not refused as a foreign origin
    assert json.loads(body)["reason"] == "unauthorized"
    assert headers["Access-Control-Allow-Origin"] == broker.url
    port = broker.url.rsplit(":", 1)[1]
    status, headers, body = await _get(broker, "/api/v1/sessions/nosuchsession",
                                       {"Origin": f"http://localhost:{port}",
                                        "Host": f"localhost:{port}"})
    assert status == 401, body


async def test_a_domain_name_counts_only_through_a_trusted_proxy(
        make_broker: MakeBroker) -> None:
    """DNS rebinding: a name sent straight is refused; one a trusted proxy passes is own."""
    direct = await make_broker()
    port = direct.url.rsplit(":", 1)[1]
    status, _, body = await _get(direct, "/api/v1/sessions/x",
                                 {"Origin": f"http://evil.example:{port}",
                                  "Host": f"evil.example:{port}"})
    assert status == 403 and json.loads(body)["reason"] == "origin"
    proxied = await make_broker(trusted_proxies=["127.0.0.0/8"])
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "broker.example.org"}
    status, headers, body = await _get(proxied, "/api/v1/sessions/x",
                                       forwarded | {"Origin": "https://broker.example.org"})
    assert status == 401, body
    assert headers["Access-Control-Allow-Origin"] == "https://broker.example.org"
    status, _, body = await _get(proxied, "/api/v1/sessions/x",
                                 forwarded | {"Origin": "http://broker.example.org"})
    assert status == 403, body  # another scheme is another origin


async def test_an_origin_refusal_names_the_setting(broker: BrokerHarness) -> None:
    status, headers, body = await _get(broker, "/api/v1/sessions/x", {"Origin": FOREIGN})
    assert status == 403
    assert json.loads(body) == {"error": "origin", "reason": "origin", "message": REFUSAL}
    assert "Access-Control-Allow-Origin" not in headers


async def test_a_build_refused_for_its_origin_is_a_readable_failed_event(
        broker: BrokerHarness) -> None:
    """An EventSource reads only 200 event streams with CORS headers (was: a plain 403)."""
    status, headers, body = await _get(broker, "/build/gh/org/repo/main",
                                       {"Origin": FOREIGN, "Accept": "text/event-stream"})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Access-Control-Allow-Origin"] == FOREIGN
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert events == [{"phase": "failed", "message": REFUSAL + "\n", "status_code": 403,
                       "reason": "origin"}]


async def test_a_build_refused_by_the_deny_list_is_readable_by_an_allowed_page(
        make_broker: MakeBroker) -> None:
    broker = await make_broker(deny_networks=["127.0.0.1"], allowed_origins=[FOREIGN])
    status, headers, body = await _get(broker, "/build/gh/org/repo/main",
                                       {"Origin": FOREIGN, "Accept": "text/event-stream"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == FOREIGN
    event = json.loads(body.decode().split("data: ", 1)[1])
    assert event["phase"] == "failed" and event["status_code"] == 403


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--port", "0"],
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=30)


def test_a_bad_value_names_the_variable_and_the_accepted_values() -> None:
    proc = _serve({"BROKER_BACKEND": "nonsense"})
    assert proc.returncode == 2
    assert proc.stderr == (
        "session-broker: invalid configuration:\n"
        "  BROKER_BACKEND='nonsense' is not a known backend; known: binderhub, jupyterhub, "
        "local\n"
        "(session-broker config lists every setting and what it accepts)\n")
    proc = _serve({"BROKER_PAGE": "/no/such/dir", "BROKER_HUB_API_TOKEN": "s3cr3t",
                   "BROKER_SESSION_MAX_AGE": "x"})
    assert "  BROKER_PAGE=/no/such/dir: BROKER_PAGE must be on, off or a directory holding an " \
           "index.html; '/no/such/dir' is none of these\n" in proc.stderr
    assert "BROKER_SESSION_MAX_AGE=x: Input should be a valid integer" in proc.stderr
    assert "s3cr3t" not in proc.stderr


def test_a_misspelled_variable_is_named_with_the_closest_setting() -> None:
    proc = _serve({"BROKER_BACKEND": "nonsense", "BROKER_MAX_SESION": "5"})
    assert ("  BROKER_MAX_SESION is not a setting of session-broker and is ignored; did you "
            "mean BROKER_MAX_SESSIONS?\n") in proc.stderr


async def test_a_running_broker_warns_about_a_misspelled_variable(tmp_path: Path) -> None:
    async with broker_process(tmp_path, {"BROKER_MAX_SESION": "5"}) as proc:
        pass
    warnings = [json.loads(line) for line in proc.log_lines() if "\"warning\"" in line]
    assert any(w["message"] == "BROKER_MAX_SESION is not a setting of session-broker and is "
               "ignored; did you mean BROKER_MAX_SESSIONS?" for w in warnings), warnings


def test_help_and_config_are_plain_text() -> None:
    for args in (["--help"], ["config"], ["try", "--help"]):
        out = subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True,
                             text=True, check=True).stdout
        assert "`" not in out, args


def test_the_banner_address_can_be_opened() -> None:
    settings = Settings()
    assert open_url(settings, "0.0.0.0", 8765) == "http://127.0.0.1:8765"
    assert open_url(settings, "::", 8765) == "http://[::1]:8765"
    assert open_url(settings, "127.0.0.1", 9) == "http://127.0.0.1:9"
    public = Settings(public_url="https://broker.example.org/")
    assert open_url(public, "0.0.0.0", 8765) == "https://broker.example.org"


async def test_the_banner_names_the_page_and_the_try_command(tmp_path: Path) -> None:
    async with broker_process(tmp_path) as proc:
        assert proc.proc.stdout is not None
        rest = [(await proc.proc.stdout.readline()).decode() for _ in range(3)]
    create = f"curl -s -X POST '{proc.url}/api/v1/sessions?wait=true'"
    assert rest == [f"Open the live page:  {proc.url}/\n",
                    f"Create a session:    {create}\n",
                    f"Or try it:           session-broker try --broker-url {proc.url}\n"]


async def test_a_websocket_client_sending_the_brokers_own_origin_is_served(
        broker: BrokerHarness) -> None:
    """websocket-client and browsers send Origin; the broker's own must pass (was: 403)."""
    session = await broker.ready_session()
    kernel = await broker.start_kernel(session)
    async with broker.http.ws_connect(f"{session['ws_url']}api/kernels/{kernel}/channels",
                                      params={"token": session["token"]},
                                      headers={"Origin": broker.url}) as ws:
        assert not ws.closed
    async with broker.http.delete(f"{broker.url}/api/v1/sessions/{session['id']}",
                                  headers={"Authorization": f"token {session['token']}"}) as resp:
        assert resp.status == 204
