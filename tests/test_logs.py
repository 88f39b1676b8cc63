"""gateway.logs: one JSON object per line, as structlog's stock processors would write it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from gateway import logs


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


class Custom:
    def __structlog__(self) -> str:
        return "custom-form"


def emit(log: Any, bind: Callable[[str | None], None]) -> None:
    bind("abc123")
    log.info("request", method="GET", path="/a", status=200, rule=None, duration_ms=1.5)
    log.warning("odd", value=Opaque(), custom=Custom(), text='é\n"')
    log.warn("old_alias")
    log.info("overrides_the_context", request_id="mine")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", reason="x")
    bind(None)
    log.error("no_context")
    log.info("request", method="HEAD", path="/b", status=404, rule="r", duration_ms=0.25)


def stock_bind(value: str | None) -> None:
    structlog.contextvars.clear_contextvars()
    if value is not None:
        structlog.contextvars.bind_contextvars(request_id=value)


def stock_configure(stream: io.StringIO) -> None:
    """What gateway.logs configured before its processors were folded into one."""
    pid = os.getpid()

    def add_pid(_: Any, __: str, event: Any) -> Any:
        event["pid"] = pid
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_pid,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()
    logs.bind_request_id(None)


def lines(
    configure: Callable[[io.StringIO], None], bind: Callable[[str | None], None]
) -> list[dict[str, Any]]:
    stream = io.StringIO()
    configure(stream)
    emit(structlog.get_logger("gateway.test"), bind)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_are_what_the_stock_processors_write(restore_structlog: None) -> None:
    ours = lines(lambda stream: logs.configure("info", stream), logs.bind_request_id)
    stock = lines(stock_configure, stock_bind)

    assert len(ours) == len(stock) == 7
    for mine, theirs in zip(ours, stock, strict=True):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", mine["timestamp"])
        assert list(mine) == list(theirs)  # the same keys, in the same order
        assert {**mine, "timestamp": ""} == {**theirs, "timestamp": ""}
    assert ours[1]["value"] == "<opaque>" and ours[1]["custom"] == "custom-form"
    assert ours[2]["level"] == "warning" and ours[4]["level"] == "error"
    assert "ValueError: boom" in ours[4]["exception"]


def test_the_level_filters(restore_structlog: None) -> None:
    stream = io.StringIO()
    logs.configure("warning", stream)
    log = structlog.get_logger("gateway.test")
    log.info("hidden")
    logs.access("GET", "/", 200, None, 1.0)  # the access line is at info: hidden too
    log.warning("shown")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["shown"]


@pytest.mark.parametrize(
    ("request_id", "path", "rule", "duration_ms"),
    [
        ("abc123", "/a b", None, 1.5),
        (None, '/q"uo\\te/\u00e9/\u2603/\x7f', "r\u00e9gle", 0.1),
        ("x", "/", "app", 1234567.25),
    ],
)
def test_the_access_line_is_what_log_info_writes(
    restore_structlog: None,
    request_id: str | None,
    path: str,
    rule: str | None,
    duration_ms: float,
) -> None:
    stream = io.StringIO()
    logs.configure("info", stream)
    # Twice: the second line reuses the remembered start, with its own duration and id.
    for took, request in ((duration_ms, request_id), (duration_ms * 3 + 0.01, "second")):
        logs.bind_request_id(request)
        structlog.get_logger("gateway").info(
            "request", method="GET", path=path, status=200, rule=rule, duration_ms=took
        )
        logs.access("GET", path, 200, rule, took)
        slow_line, fast_line = stream.getvalue().splitlines()[-2:]
        # Byte for byte, but for the time.
        assert slow_line.rsplit('"timestamp"', 1)[0] == fast_line.rsplit('"timestamp"', 1)[0]
        slow, fast = json.loads(slow_line), json.loads(fast_line)
        assert list(fast) == list(slow)
        assert {**fast, "timestamp": ""} == {**slow, "timestamp": ""}
        assert fast.get("request_id") == request and fast["duration_ms"] == took


class CountedWrites(io.StringIO):
    """A stream that counts its writes (each one a system call on an unbuffered stdout)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def events(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def test_the_access_lines_of_one_turn_go_out_in_one_write(restore_structlog: None) -> None:
    stream = CountedWrites()
    logs.configure("info", stream)

    async def serve() -> None:
        for path in ("/a", "/b", "/c"):
            logs.access("GET", path, 200, None, 1.0)
        assert stream.getvalue() == ""  # held for the end of the turn
        await asyncio.sleep(0)  # the turn ends: written before the loop waits on
        assert stream.writes == 1
        assert [json.loads(line)["path"] for line in stream.getvalue().splitlines()] == [
            "/a",
            "/b",
            "/c",
        ]
        logs.access("GET", "/d", 200, None, 1.0)  # the next turn: written at its end
        await asyncio.sleep(0)
        assert stream.writes == 2

    asyncio.run(serve())


def test_a_turn_writes_on_after_a_batch_of_access_lines(restore_structlog: None) -> None:
    stream = CountedWrites()
    logs.configure("info", stream)

    async def serve() -> None:
        for _ in range(logs.ACCESS_BATCH_LINES):
            logs.access("GET", "/", 200, None, 1.0)
        assert stream.writes == 1  # not held for however long the turn takes
        assert len(stream.getvalue().splitlines()) == logs.ACCESS_BATCH_LINES

    asyncio.run(serve())


def test_every_other_line_comes_after_the_access_lines_before_it(
    restore_structlog: None,
) -> None:
    stream = io.StringIO()
    logs.configure("info", stream)
    log = structlog.get_logger("gateway.test")

    async def serve() -> None:
        log.info("first")
        logs.access("GET", "/", 200, None, 1.0)
        log.warning("after_the_request")
        await asyncio.sleep(0)

    asyncio.run(serve())
    assert events(stream) == ["first", "request", "after_the_request"]


def test_an_access_line_outside_a_loop_is_written_at_once(restore_structlog: None) -> None:
    stream = io.StringIO()
    logs.configure("info", stream)
    logs.access("GET", "/", 200, None, 1.0)
    assert events(stream) == ["request"]
    # A line left by a loop that stopped before its turn ended is not held either.
    loop = asyncio.new_event_loop()
    loop.call_soon(logs.access, "GET", "/held", 200, None, 1.0)
    loop.call_soon(loop.stop)
    loop.run_forever()
    logs.access("GET", "/later", 200, None, 1.0)
    loop.close()
    assert [json.loads(line)["path"] for line in stream.getvalue().splitlines()] == [
        "/",
        "/held",
        "/later",
    ]
