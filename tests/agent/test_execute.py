"""POST /api/v1/sessions/{id}/execute against real local sessions (jupyter server + ipykernel)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.agent.conftest import Agent, MakeAgent
from tests.conftest import MakeBroker, ManualClock


async def test_state_persists_across_calls(agent: Agent) -> None:
    first = await agent.execute("import math\nradius = 2")
    assert first["status"] == "ok", first
    assert first["result"] is None
    second = await agent.execute("round(math.pi * radius ** 2, 3)")
    assert second["status"] == "ok", second
    assert second["result"] == {"text/plain": "12.566"}
    assert second["execution_count"] == first["execution_count"] + 1
    assert isinstance(second["duration_ms"], int)


async def test_each_output_lands_in_its_field(agent: Agent) -> None:
    code = (
        "import sys\n"
        "from IPython.display import HTML, display\n"
        "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "display(HTML('<b>bold</b>'))\n"
        "{'answer': 42}\n"
    )
    out = await agent.execute(code)
    assert out["status"] == "ok", out
    assert out["stdout"] == "to stdout\n"
    assert out["stderr"] == "to stderr\n"
    assert len(out["display"]) == 1
    assert out["display"][0]["text/html"] == "<b>bold</b>"
    assert out["result"] == {"text/plain": "{'answer': 42}"}
    assert out["error"] is None

    failed = await agent.execute("print('before')\nraise ValueError('bad value')")
    assert failed["status"] == "error"
    assert failed["stdout"] == "before\n"
    assert failed["result"] is None
    assert failed["error"]["ename"] == "ValueError"
    assert failed["error"]["evalue"] == "bad value"
    traceback = "\n".join(failed["error"]["traceback"])
    assert "raise ValueError('bad value')" in traceback
    assert "\x1b[" not in traceback  # ANSI colours are stripped for agents


async def test_timeout_interrupts_and_the_kernel_survives(agent: Agent) -> None:
    await agent.execute("kept = 'state'")
    out = await agent.execute("print('spinning', flush=True)\nwhile True: pass", timeout=2)
    assert out["status"] == "timeout", out
    assert out["stdout"] == "spinning\n"  # what arrived before the interrupt is kept
    assert out["error"]["ename"] == "TimeoutError"
    assert out["error"]["evalue"].startswith("Execution exceeded 2 s and was interrupted")
    # The loop never ends by itself: it was interrupted, so the kernel's own traceback
    # (KeyboardInterrupt in the loop) is what the answer carries.
    assert "KeyboardInterrupt" in "\n".join(out["error"]["traceback"]), out["error"]
    after = await agent.execute("kept")
    assert after["status"] == "ok", after
    assert after["result"] == {"text/plain": "'state'"}  # interrupted, not restarted


async def test_timeout_is_capped_by_the_setting(make_agent: MakeAgent) -> None:
    agent = await make_agent(execute_timeout_max=1.0)
    out = await agent.execute("while True: pass", timeout=3600)
    assert out["status"] == "timeout", out
    # The answer names the limit it applied: the setting's 1 s, not the asked-for hour
    # (and the test's own 120 s timeout would end a call that waited for the hour).
    assert out["error"]["evalue"].startswith("Execution exceeded 1 s and was interrupted"), out
    assert "KeyboardInterrupt" in "\n".join(out["error"]["traceback"]), out["error"]
    after = await agent.execute("'alive'")
    assert after["result"] == {"text/plain": "'alive'"}  # interrupted, the kernel kept


async def test_concurrent_calls_are_serialised(agent: Agent) -> None:
    # A holds the kernel; B arrives meanwhile with a time limit shorter than A's
    # remaining run. Serialised, B's clock starts only when A is done; were the
    # calls interleaved on the kernel, B would time out and interrupt A.
    slow = "import time\nprint('A start', flush=True)\ntime.sleep(1.5)\nprint('A end')"
    events = agent.events(slow)
    name, first = await anext(events)
    assert (name, first["text"]) == ("stream", "A start\n")
    b_call = asyncio.create_task(agent.execute("print('B')", timeout=1))
    rest = [event async for event in events]
    summary_a = rest[-1][1]
    summary_b = await b_call
    assert summary_a["status"] == "ok" and summary_a["stdout"] == "A start\nA end\n"
    assert summary_b["status"] == "ok" and summary_b["stdout"] == "B\n", summary_b
    assert summary_b["execution_count"] == summary_a["execution_count"] + 1

    # Two chatty calls at once: each answer holds only its own lines, in order.
    def chatty(tag: str) -> str:
        return f"import time\nfor i in range(50):\n    print('{tag}', i, flush=True)\n" \
               "    time.sleep(0.002)"

    one, two = await asyncio.gather(agent.execute(chatty("one")), agent.execute(chatty("two")))
    assert one["stdout"] == "".join(f"one {i}\n" for i in range(50))
    assert two["stdout"] == "".join(f"two {i}\n" for i in range(50))


async def test_stream_delivers_outputs_as_they_arrive(agent: Agent) -> None:
    # The code waits for a file that the test uploads only after the first
    # event arrived: output must be streamed before the execution ends.
    code = (
        "import os, time\n"
        "from IPython.display import HTML, display\n"
        "print('first', flush=True)\n"
        "deadline = time.monotonic() + 30\n"
        "while not os.path.exists('go.txt') and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "display(HTML('<i>shown</i>'))\n"
        "print('gate open:', os.path.exists('go.txt'))\n"
        "7 * 6\n"
    )
    events = agent.events(code)
    assert await anext(events) == ("stream", {"type": "stream", "name": "stdout",
                                              "text": "first\n"})
    status, _ = await agent.put("go.txt", b"go")
    assert status == 201
    rest = [event async for event in events]
    names = [name for name, _ in rest]
    assert names == ["display", "stream", "result", "done"], rest
    assert rest[0][1]["data"]["text/html"] == "<i>shown</i>"
    assert rest[1][1]["text"] == "gate open: True\n"
    assert rest[2][1]["data"] == {"text/plain": "42"}
    done = rest[-1][1]
    assert done["status"] == "ok"
    assert done["stdout"] == "first\ngate open: True\n"
    assert done["result"] == {"text/plain": "42"}


async def test_output_beyond_the_cap_is_dropped(make_agent: MakeAgent) -> None:
    agent = await make_agent(execute_max_output=2048)
    out = await agent.execute("print('x' * 10000)\nprint('more')")
    assert out["status"] == "ok"
    assert out["truncated"] is True
    assert 0 < len(out["stdout"]) <= 2048
    assert "more" not in out["stdout"]
    assert (await agent.execute("print('fine')"))["stdout"] == "fine\n"


async def test_clears_and_errors_count_against_the_cap(make_agent: MakeAgent) -> None:
    """A kernel flooding clear_output cannot make the broker stream without bound."""
    agent = await make_agent(execute_max_output=2048)
    events = [name async for name, _data in agent.events(
        "from IPython.display import clear_output\nfor _ in range(2000): clear_output()")]
    assert events.count("clear_output") <= 2048 // 64
    assert events[-1] == "done"
    out = await agent.execute("raise ValueError('v' * 5000)")
    assert out["status"] == "error" and out["truncated"] is True


async def test_kernel_death_ends_the_call_and_the_next_one_works(agent: Agent) -> None:
    await agent.execute("lost = 1")
    died = await agent.execute("import os\nos._exit(1)", timeout=60)
    assert died["status"] == "error", died
    assert died["error"]["ename"] in ("KernelRestarted", "KernelDied")
    after = await agent.execute("'lost' in globals()")
    assert after["result"] == {"text/plain": "False"}  # a fresh kernel state


async def test_a_call_after_a_restart_waits_for_the_new_kernel(agent: Agent) -> None:
    # Jupyter Server announces a restart before the new kernel runs and re-attaches its
    # sockets without checking them; iopub drops what the kernel publishes before the
    # server's subscription reaches it. A call sent too early would run, but lose its
    # outputs and final idle (and end as a timeout). Here the kernel dies between calls,
    # so only the connection itself can remember the restart.
    base = agent.session["base_url"]
    await agent.execute("1")
    async with agent.http.get(f"{base}api/sessions", headers=agent.headers) as resp:
        (jupyter_session,) = await resp.json()
    kernel_id = jupyter_session["kernel"]["id"]
    async with agent.http.ws_connect(f"{base}api/kernels/{kernel_id}/channels",
                                     headers=agent.headers) as watcher:
        for round_ in range(3):
            assert (await agent.execute(f"mark = {round_}"))["status"] == "ok"
            out = await agent.execute("import os, threading\n"
                                      "threading.Timer(0.2, os._exit, (1,)).start()")
            assert out["status"] == "ok", out
            async for frame in watcher:  # the server's notice, also sent to the broker
                msg = frame.json()
                if msg["header"]["msg_type"] == "status" and not msg["parent_header"] \
                        and msg["content"]["execution_state"] == "restarting":
                    break
            after = await agent.execute("print('up')\n'mark' in globals()", timeout=20)
            assert after["status"] == "ok", after  # ran on the restarted kernel, no time-out
            assert after["stdout"] == "up\n"
            assert after["result"] == {"text/plain": "False"}


async def test_a_call_right_after_a_rest_restart_runs_on_the_new_kernel(agent: Agent) -> None:
    # A restart asked for over the proxied REST API returns once the new kernel answers,
    # but the server's notice may reach the execute API's socket later: a call sent at
    # once must still wait for the new kernel rather than lose its outputs (time-out).
    base = agent.session["base_url"]
    await agent.execute("1")
    async with agent.http.get(f"{base}api/sessions", headers=agent.headers) as resp:
        (jupyter_session,) = await resp.json()
    kernel_id = jupyter_session["kernel"]["id"]
    for round_ in range(3):
        assert (await agent.execute(f"mark = {round_}"))["status"] == "ok"
        async with agent.http.post(f"{base}api/kernels/{kernel_id}/restart",
                                   headers=agent.headers) as resp:
            assert resp.status == 200, await resp.text()
        after = await agent.execute("print('up')\n'mark' in globals()", timeout=20)
        assert after["status"] == "ok", after  # no time-out: it waited for the new kernel
        assert after["stdout"] == "up\n"
        assert after["result"] == {"text/plain": "False"}


async def test_kernel_names(agent: Agent) -> None:
    async with agent.http.post(agent.url("execute"), headers=agent.headers,
                               json={"code": "1", "kernel_name": "no-such-kernel"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["reason"] == "unknown_kernel_name"
    # Streaming: the stream has started, so the same refusal is its last event.
    events = [event async for event in agent.events("1", kernel_name="no-such-kernel")]
    assert [name for name, _ in events] == ["failed"]
    assert events[0][1]["status_code"] == 400
    assert events[0][1]["reason"] == "unknown_kernel_name"
    assert (await agent.execute("1", kernel_name="python"))["status"] == "ok"  # alias
    assert (await agent.execute("2", kernel_name="python3"))["result"] == {"text/plain": "2"}
    async with agent.http.post(agent.url("execute"), headers=agent.headers,
                               json={"code": "1", "kernel_name": "other"}) as resp:
        assert resp.status == 409
        assert (await resp.json())["reason"] == "kernel_name_mismatch"


async def test_refusals(agent: Agent) -> None:
    bad_bodies: list[Any] = [
        {}, {"code": 1}, {"code": "1", "timeout": -1}, {"code": "1", "timeout": True},
        {"code": "1", "extra": 1}, {"code": "1", "kernel_name": "../x"}, [1],
    ]
    for body in bad_bodies:
        async with agent.http.post(agent.url("execute"), json=body,
                                   headers=agent.headers) as resp:
            assert resp.status == 400, body
            assert (await resp.json())["error"] == "bad_request"
    async with agent.http.post(agent.url("execute"), json={"code": "1"}) as resp:
        assert resp.status == 401
    async with agent.http.post(agent.url("execute"), json={"code": "1"},
                               headers={"Authorization": "token wrong"}) as resp:
        assert resp.status == 403
    async with agent.http.delete(f"{agent.broker.url}/api/v1/sessions/{agent.session['id']}",
                                 headers=agent.headers) as resp:
        assert resp.status == 204
    async with agent.http.post(agent.url("execute"), json={"code": "1"},
                               headers=agent.headers) as resp:
        assert resp.status == 404


async def test_execute_counts_as_activity(make_broker: MakeBroker) -> None:
    clock = ManualClock()
    broker = await make_broker(clock=clock, session_idle_timeout=60)
    agent = Agent(broker, await broker.ready_session())
    clock.advance(50)
    await agent.execute("1")
    clock.advance(50)  # 100 s after creation, 50 s after the execute call
    assert await broker.manager.reap_once() == 0
    async with broker.http.get(f"{broker.url}/api/v1/sessions/{agent.session['id']}",
                               headers=agent.headers) as resp:
        assert (await resp.json())["status"] == "ready"
    clock.advance(61)
    assert await broker.manager.reap_once() == 1


async def test_a_kernel_shut_down_elsewhere_is_replaced(agent: Agent) -> None:
    # The default kernel is visible on the Jupyter surface; shutting it down there
    # leaves the broker's socket open but deaf. The next call must notice.
    await agent.execute("before = 1")
    base = agent.session["base_url"]
    async with agent.http.get(f"{base}api/sessions", headers=agent.headers) as resp:
        (jupyter_session,) = await resp.json()
    kernel_id = jupyter_session["kernel"]["id"]
    async with agent.http.delete(f"{base}api/kernels/{kernel_id}",
                                 headers=agent.headers) as resp:
        assert resp.status == 204
    out = await agent.execute("'before' in globals()", timeout=20)
    assert out["status"] == "ok", out  # a new kernel answered; the deaf socket was dropped
    assert out["result"] == {"text/plain": "False"}
    async with agent.http.get(f"{base}api/kernels", headers=agent.headers) as resp:
        assert [k["id"] for k in await resp.json()] != [kernel_id]


async def test_execute_is_counted_like_kernel_traffic(agent: Agent) -> None:
    registry = agent.broker.manager.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = sample("broker_kernel_executions_total")
    await agent.execute("1")
    await agent.execute("2")
    assert sample("broker_kernel_executions_total") == before + 2
    assert sample("broker_kernel_execution_duration_seconds_count") >= 2
