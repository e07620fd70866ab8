"""A real kernel through a real broker, with the relay compiled and as Python.

The unit tests in this folder run both builds of the relay module on
recorded streams; this runs each in the broker itself (setting
``ws_relay_compiled``), in both kernel wire formats, and checks that
``/versions`` and the ``broker_info`` metric name the one that runs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker.proxy import wire
from tests.conftest import MakeBroker
from tests.kernelproto import V1, execute


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
async def test_a_cell_runs_through_either_build(make_broker: MakeBroker, compiled: bool) -> None:
    broker = await make_broker(ws_relay_compiled=compiled)
    expected = "compiled" if compiled and wire.COMPILED is not None else "python"
    async with broker.http.get(f"{broker.url}/versions") as resp:
        assert (await resp.json())["relay"] == expected
    registry = broker.manager.metrics.registry
    assert registry.get_sample_value("broker_info", {
        "relay": expected, "backend": "local",
        "version": (await (await broker.http.get(f"{broker.url}/versions")).json())["broker"],
    }) == 1
    session = await broker.ready_session()
    kernel_id = await broker.start_kernel(session)
    url = f"{session['ws_url']}api/kernels/{kernel_id}/channels"
    for protocols in ((V1,), ()):
        async with broker.http.ws_connect(url, params={"token": session["token"]},
                                          protocols=protocols) as ws:
            result = await execute(ws, "print('é' * 3); 6 * 7")
            assert result.stdout == "ééé\n"
            assert result.reply["status"] == "ok"
            assert any(m["content"].get("data", {}).get("text/plain") == "42"
                       for m in result.messages)


#: An interpreter where ``broker.proxy._wire_c`` is found as its Python source only, as in
#: a package installed without a C compiler (the name is a link to ``_wire_py.py``).
_WITHOUT_EXTENSION = """
import importlib.abc, importlib.util, os, sys

class SourceOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "broker.proxy._wire_c":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(list(path)[0], "_wire_c.py"))

sys.meta_path.insert(0, SourceOnly())
from broker.proxy import wire
import broker.proxy._wire_c as source
assert wire.COMPILED is None and wire.select() is wire.PYTHON and wire.mode() == "python"
assert source._COMPILED is False  # the interpreted branch of mask, not the C loop's
assert source.mask(b"abc", bytes([1, 2, 3, 4])) == b"```"
print("python")
"""


def test_without_the_extension_the_python_build_runs() -> None:
    """Where nothing was compiled, ``_wire_c`` is found as a ``.py`` file: the relay must
    then pick the Python module, and that file run as Python takes the interpreted code."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "python\n", done.stderr
    assert wire.PYTHON._COMPILED is False
    if wire.COMPILED is not None:  # and the extension knows it is one (mask's C loop)
        assert wire.COMPILED._COMPILED is True


async def test_a_malformed_upgrade_is_a_json_400(make_broker: MakeBroker) -> None:
    """The broker answers the client's upgrade itself, so it checks it as RFC 6455 asks
    (version 13, a 16-byte base64 key) before anything reaches the upstream."""
    broker = await make_broker()
    session = await broker.ready_session()
    url = f"{session['base_url']}api/kernels/any/channels"
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    for headers in ({"Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
                    {"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "not a key"},
                    {"Sec-WebSocket-Version": "13"}):
        async with broker.http.get(url, params={"token": session["token"]},
                                   headers={**upgrade, **headers}) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert resp.headers["Sec-WebSocket-Version"] == "13"
        assert body["error"] == body["reason"] == "bad_websocket_upgrade"
