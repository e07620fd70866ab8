"""docs/agents.md's Python examples run as written against a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path
from typing import Any

from tests.conftest import BrokerHarness

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"
EXAMPLE_URL = "http://127.0.0.1:8765"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


async def test_client_example_runs(agent_broker: BrokerHarness) -> None:
    example = _python_blocks()[0].replace(EXAMPLE_URL, agent_broker.url)
    printed = io.StringIO()

    def run() -> None:  # the example calls asyncio.run(): give it a thread of its own
        with contextlib.redirect_stdout(printed):
            exec(compile(example, str(DOC), "exec"), {"__name__": "example"})  # noqa: S102

    await asyncio.to_thread(run)
    lines = printed.getvalue().splitlines()
    assert lines[0] == "ok 2"
    assert lines[1] == "IndexError"
    assert lines[-1] == "b'hello'"
    assert any("OutputEvent(type='stream'" in line for line in lines)
    assert await agent_broker.store.count_live() == 0  # the block deleted its session


async def test_agent_tool_example_runs(agent_broker: BrokerHarness) -> None:
    namespace: dict[str, Any] = {"__name__": "example"}
    exec(compile(_python_blocks()[1], str(DOC), "exec"), namespace)  # noqa: S102
    assert namespace["RUN_PYTHON"]["name"] == "run_python"
    async with namespace["PythonTool"](agent_broker.url) as tool:
        assert await tool("x = 6 * 7\nprint('x is', x)") == "x is 42\n"
        assert await tool("x + 1") == "[result] 43"
        failed = await tool("x / 0")
        assert failed.startswith("[error] ZeroDivisionError: division by zero")
        shown = await tool("from IPython.display import HTML\ndisplay(HTML('<b>x</b>'))")
        assert shown.startswith("[display: text/html, text/plain]")
        assert await tool("pass") == "[no output]"
