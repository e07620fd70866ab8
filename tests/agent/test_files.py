"""The files API against real local sessions: through the upstream contents API, confined."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from broker.agent.files import _refusal
from tests.agent.conftest import Agent, MakeAgent
from tests.conftest import BrokerHarness

#: Every byte value, plus bytes that break naive text handling (CRLF, NUL, invalid UTF-8).
BINARY = bytes(range(256)) * 40 + b"\r\n\x00\xff\xfe" + "é".encode("latin-1")


async def _workdir(agent: Agent) -> Path:
    """The local backend's directory for the session (what the broker itself checks against)."""
    session = await agent.broker.store.get(agent.session["id"])
    return Path(session.backend_state["workdir"])


async def test_uploaded_file_is_readable_from_code(agent: Agent) -> None:
    status, info = await agent.put("data/input.bin", BINARY)  # parents are created
    assert status == 201, info
    assert info == {**info, "name": "input.bin", "path": "data/input.bin", "type": "file",
                    "size": len(BINARY)}
    out = await agent.execute(
        "import hashlib\nhashlib.sha256(open('data/input.bin', 'rb').read()).hexdigest()")
    assert out["result"] == {"text/plain": repr(hashlib.sha256(BINARY).hexdigest())}

    status, _ = await agent.put("data/input.bin", b"replaced")
    assert status == 200  # an existing file is replaced
    out = await agent.execute("open('data/input.bin', 'rb').read()")
    assert out["result"] == {"text/plain": "b'replaced'"}

    status, _ = await agent.put("with%20space%20%C3%A9.txt", b"decoded once")
    assert status == 201
    out = await agent.execute("open('with space é.txt').read()")
    assert out["result"] == {"text/plain": "'decoded once'"}


async def test_file_written_by_code_downloads_byte_for_byte(agent: Agent) -> None:
    out = await agent.execute(
        f"payload = {BINARY!r}\n"
        "open('out.bin', 'wb').write(payload)\n"
        "open('table.csv', 'w').write('a,b\\n1,2\\n')\n"
        "open('page.html', 'w').write('<script>alert(1)</script>')"
    )
    assert out["status"] == "ok", out
    resp = await agent.get("out.bin")
    assert resp.status == 200
    assert resp.body == BINARY
    assert resp.content_type == "application/octet-stream"
    assert resp.headers["Content-Disposition"] == "attachment; filename*=UTF-8''out.bin"

    csv = await agent.get("table.csv")
    assert csv.content_type == "text/csv"
    assert csv.body == b"a,b\n1,2\n"

    page = await agent.get("page.html")
    assert page.body == b"<script>alert(1)</script>"
    # A file from code never runs as a page in the broker's origin.
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Content-Security-Policy"].startswith("sandbox")
    assert page.headers["Content-Disposition"].startswith("attachment")


async def test_listing_and_delete(agent: Agent) -> None:
    await agent.put("top.txt", b"12345")
    await agent.put("sub/inner.txt", b"x")
    async with agent.http.get(agent.url("files"), headers=agent.headers) as resp:
        root = await resp.json()
    assert root["path"] == ""
    by_name = {e["name"]: e for e in root["entries"]}
    assert by_name["top.txt"]["type"] == "file" and by_name["top.txt"]["size"] == 5
    assert by_name["sub"]["type"] == "directory"
    assert not any(name.startswith(".") for name in by_name)  # .runtime is not listed

    sub = await agent.get("sub/")
    assert sub.status == 200
    assert [e["path"] for e in sub.json()["entries"]] == ["sub/inner.txt"]
    not_a_file = await agent.get("sub")
    assert not_a_file.status == 400  # a directory is listed with a trailing slash

    async with agent.http.delete(agent.url("files/top.txt"), headers=agent.headers) as resp:
        assert resp.status == 204
    assert (await agent.get("top.txt")).status == 404
    out = await agent.execute("import os\nos.path.exists('top.txt')")
    assert out["result"] == {"text/plain": "False"}
    async with agent.http.delete(agent.url("files/top.txt"), headers=agent.headers) as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "no_such_file"


async def test_a_path_through_a_file_is_named_as_such(agent: Agent) -> None:
    """Jupyter Server answers a path under a file with a 500 (read, delete) or a 400
    quoting its own directory (create): the agent gets what is wrong, in its terms."""
    await agent.put("notes.txt", b"a file")
    workdir = str(await _workdir(agent))
    got = await agent.get("notes.txt/inner/deeper.txt")
    assert got.status == 404 and got.json()["reason"] == "no_such_file"
    assert "'notes.txt' is a file" in got.json()["message"]
    async with agent.http.delete(agent.url("files/notes.txt/inner"),
                                 headers=agent.headers) as resp:
        assert resp.status == 404 and (await resp.json())["reason"] == "no_such_file"
    for path in ("notes.txt/inner.txt", "notes.txt/a/b.txt"):
        status, body = await agent.put(path, b"x")
        assert (status, body["reason"]) == (409, "not_a_directory"), body
        assert "'notes.txt' is a file" in body["message"]
    # A refusal the upstream explains itself still says what it said, minus its paths.
    listing = await agent.get("notes.txt/")
    assert listing.status == 400 and workdir not in listing.body.decode()
    assert (await agent.get("notes.txt")).body == b"a file"  # nothing was lost
    # A path through nothing at all is simply not there.
    missing = await agent.get("nowhere/inner.txt")
    assert missing.status == 404 and missing.json()["reason"] == "no_such_file"


async def test_path_escapes_are_refused(agent: Agent, tmp_path: Path) -> None:
    escapes = [
        "../outside.txt", "sub/../../outside.txt", "..%2Foutside.txt", "%2e%2e/outside.txt",
        "%2E%2E%2Foutside.txt", "%2Ftmp%2Foutside.txt", "/tmp/outside.txt", "a//b.txt",
        "./x.txt", "a%5C..%5Cb.txt", "x%00.txt", "%ff.txt", ".runtime/x", "sub/.hidden",
    ]
    for raw in escapes:
        for method in ("GET", "PUT", "DELETE"):
            async with agent.http.request(method, agent.url(f"files/{raw}"), data=b"x",
                                          headers=agent.headers) as resp:
                body = await resp.json()
                assert resp.status == 400, (method, raw, body)
                assert body["reason"] == "bad_path", (method, raw, body)
    workdir_parent = (await _workdir(agent)).parent
    assert not (workdir_parent / "outside.txt").exists()
    assert not (workdir_parent / "b.txt").exists()


async def test_symlink_escape_is_refused(agent: Agent, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    out = await agent.execute(
        "import os\n"
        f"os.symlink({str(outside / 'secret.txt')!r}, 'link.txt')\n"
        f"os.symlink({str(outside)!r}, 'dirlink')\n"
        "open('inside.txt', 'w').write('mine')\n"
        "os.symlink('inside.txt', 'inner-link.txt')"
    )
    assert out["status"] == "ok", out
    refused = [("GET", "link.txt"), ("GET", "dirlink/secret.txt"), ("GET", "dirlink/"),
               ("PUT", "dirlink/planted.txt"), ("PUT", "link.txt"),
               ("DELETE", "dirlink/secret.txt")]
    for method, path in refused:
        async with agent.http.request(method, agent.url(f"files/{path}"), data=b"planted",
                                      headers=agent.headers) as resp:
            body = await resp.json()
            assert resp.status == 403, (method, path, body)
            assert body["reason"] == "path_escape"
    assert (outside / "secret.txt").read_text() == "not yours"
    assert not (outside / "planted.txt").exists()
    # A link that stays inside the session's directory is an ordinary file.
    inner = await agent.get("inner-link.txt")
    assert inner.status == 200 and inner.body == b"mine"


async def test_size_caps(make_agent: MakeAgent) -> None:
    agent = await make_agent(max_upload_size=1024, max_download_size=2000)
    status, body = await agent.put("big.bin", b"x" * 1025)
    assert status == 413
    assert body["reason"] == "file_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for _ in range(3):
            yield b"y" * 512

    async with agent.http.put(agent.url("files/chunked.bin"), data=chunked(),
                              headers=agent.headers) as resp:
        assert resp.status == 413
    status, _ = await agent.put("fits.bin", b"x" * 1024)
    assert status == 201
    out = await agent.execute("import os\n[os.path.exists(n) for n in ('big.bin', 'chunked.bin')]")
    assert out["result"] == {"text/plain": "[False, False]"}

    await agent.execute("open('made.bin', 'wb').write(b'z' * 2001)")
    too_big = await agent.get("made.bin")
    assert too_big.status == 413
    await agent.execute("open('made.bin', 'wb').write(b'z' * 2000)")
    assert (await agent.get("made.bin")).body == b"z" * 2000


async def test_files_need_the_session_token(agent: Agent) -> None:
    await agent.put("private.txt", b"p")
    async with agent.http.get(agent.url("files/private.txt")) as resp:
        assert resp.status == 401
    async with agent.http.get(agent.url("files/private.txt"),
                              headers={"Authorization": "token nope"}) as resp:
        assert resp.status == 403
    other = await agent.broker.ready_session()
    async with agent.http.get(agent.url("files/private.txt"),
                              headers={"Authorization": f"token {other['token']}"}) as resp:
        assert resp.status == 403  # another session's token opens only that session


async def test_deleted_files_do_not_go_to_the_trash(agent_broker: BrokerHarness) -> None:
    """The local backend's servers delete for good: nothing outlives the session."""
    trash = Path.home() / ".local" / "share" / "Trash" / "files"
    before = set(trash.iterdir()) if trash.is_dir() else set()
    session = await agent_broker.ready_session()
    headers = {"Authorization": f"token {session['token']}"}
    name = f"trash-check-{session['id']}.txt"
    url = f"{agent_broker.url}/api/v1/sessions/{session['id']}/files/{name}"
    async with agent_broker.http.put(url, data=b"x", headers=headers) as resp:
        assert resp.status in (200, 201, 204), await resp.text()
    async with agent_broker.http.delete(url, headers=headers) as resp:
        assert resp.status in (200, 204), await resp.text()
    after = set(trash.iterdir()) if trash.is_dir() else set()
    assert not {p for p in after - before if session["id"] in p.name}


def test_upstream_refusals_lose_the_servers_paths_not_their_sense() -> None:
    error = _refusal(400, b'{"message": "Not a directory: /tmp/session-broker-x/abc/a.txt"}')
    assert (error.status, error.message) == (400, "Not a directory: [server path]")
    kept = _refusal(409, b'{"message": "File \'data/a.csv\' already exists"}')
    assert kept.message == "File 'data/a.csv' already exists"  # relative paths are the client's
    assert _refusal(500, b"<html>").status == 502
