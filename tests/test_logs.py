"""Log lines: scrubbing, request ids, and the handler that batches a loop turn's lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from pathlib import Path

import aiohttp

from broker.logs import JsonFormatter, LoopBatchingHandler, ScrubFilter, new_request_id, scrub
from tests.brokerproc import broker_process

#: Requests timed by the duration test.
REQUESTS = 20


def _logger(stream: io.StringIO) -> tuple[logging.Logger, LoopBatchingHandler]:
    handler = LoopBatchingHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger(f"test.batching.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler


def test_scrub_only_touches_secrets() -> None:
    assert scrub("GET /s/abc/api/kernels?x=1") == "GET /s/abc/api/kernels?x=1"
    assert scrub("GET /x?token=abc123&y=2") == "GET /x?token=[secret]&y=2"
    assert "abcdefabcdefabcdefab" not in scrub("Authorization: Bearer abcdefabcdefabcdefab")
    assert "abcdefabcdefabcdef12" not in scrub("header TOKEN abcdefabcdefabcdef12")


def test_generated_request_ids_are_unique_and_sane() -> None:
    ids = {new_request_id(None) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert new_request_id("trace-1.2_3") == "trace-1.2_3"
    assert new_request_id("bad id\r\n") != "bad id\r\n"


async def test_lines_of_one_loop_turn_are_written_together_in_order() -> None:
    stream = io.StringIO()
    logger, _ = _logger(stream)
    logger.info("one")
    logger.info("two ?token=secretsecret")
    assert stream.getvalue() == ""  # queued until the end of this loop turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    lines = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert lines == ["one", "two ?token=[secret]"]


async def test_errors_are_written_at_once_after_what_is_queued() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream)
    logger.info("queued")
    logger.error("failure")
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
        "queued", "failure"]
    logger.info("later")
    handler.flush()  # what logging.shutdown() does at exit
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "later"


def test_outside_a_loop_lines_are_written_at_once() -> None:
    stream = io.StringIO()
    logger, _ = _logger(stream)
    logger.info("no loop here")
    assert json.loads(stream.getvalue())["message"] == "no loop here"


async def test_access_line_is_the_same_with_or_without_the_direct_path() -> None:
    """configure()'s JSON handler gets the access line without a LogRecord; any other
    set-up gets an ordinary record with the same fields."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from broker.logs import AccessLogger, configure

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure("INFO", "json")
        handler = root.handlers[0]
        assert isinstance(handler, LoopBatchingHandler)
        handler.setStream(stream)
        access = AccessLogger(logging.getLogger("aiohttp.access"), "")
        request = make_mocked_request("GET", "/s/abc/api/kernels?token=abcdefabcdef&x=1")
        response = web.Response(text="[]", headers={"X-Request-Id": "rid-1"})
        access.log(request, response, 0.0123)
        handler.flush()
        direct = json.loads(stream.getvalue())
        extra = logging.StreamHandler(io.StringIO())  # a second handler: the normal path
        root.addHandler(extra)
        access.log(request, response, 0.0123)
        handler.flush()
        normal = json.loads(stream.getvalue().splitlines()[-1])
    finally:
        root.handlers[:], root.level = saved
    assert direct["path"] == "/s/abc/api/kernels?token=[secret]&x=1"
    assert "abcdefabcdef" not in stream.getvalue()
    direct.pop("time")
    normal.pop("time")
    assert direct == normal
    assert direct["request_id"] == "rid-1" and direct["status"] == 200


async def test_request_durations_are_measured_finer_than_the_loop_clock(tmp_path: Path) -> None:
    """The CLI runs on uvloop, whose loop clock counts whole milliseconds: a request
    answered within one loop turn took 0 ms by it. The access log's ``duration_ms``
    and ``broker_http_request_duration_seconds`` are taken on a fine clock."""
    async with broker_process(tmp_path) as broker, aiohttp.ClientSession() as http:
        for _ in range(REQUESTS):
            async with http.get(f"{broker.url}/s/0123456789abcdef/api/kernels") as resp:
                assert resp.status == 401  # no token: answered without any I/O
        async with http.get(f"{broker.url}/metrics") as resp:
            metrics = await resp.text()
    lines = [json.loads(line) for line in broker.log_lines() if '"event": "request"' in line]
    durations = [line["duration_ms"] for line in lines if line["path"].startswith("/s/")]
    assert len(durations) == REQUESTS
    assert all(duration > 0 for duration in durations), durations
    total = re.search(r'broker_http_request_duration_seconds_sum\{route="jupyter_rest",'
                      r'status_class="4xx"\} (\S+)', metrics)
    assert total is not None, metrics
    assert float(total.group(1)) > 0
