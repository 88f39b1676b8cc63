"""gateway.logs: one JSON object per line, as structlog's stock processors would write it."""

from __future__ import annotations

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


def emit(log: Any) -> None:
    structlog.contextvars.bind_contextvars(request_id="abc123")
    log.info("request", method="GET", path="/a", status=200, rule=None, duration_ms=1.5)
    log.warning("odd", value=Opaque(), custom=Custom(), text='é\n"')
    log.warn("old_alias")
    log.info("overrides_the_context", request_id="mine")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", reason="x")
    structlog.contextvars.clear_contextvars()
    log.error("no_context")


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


def lines(configure: Callable[[io.StringIO], None]) -> list[dict[str, Any]]:
    stream = io.StringIO()
    configure(stream)
    emit(structlog.get_logger("gateway.test"))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_are_what_the_stock_processors_write(restore_structlog: None) -> None:
    ours = lines(lambda stream: logs.configure("info", stream))
    stock = lines(stock_configure)

    assert len(ours) == len(stock) == 6
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
    log.warning("shown")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["shown"]
