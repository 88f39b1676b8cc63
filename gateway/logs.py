"""Structured JSON logs through structlog, with the request id bound per request.

Never pass a token, cookie or secret to a log call: log names, reasons and ids.

Every request writes an access-log line, so the chain that renders one is kept
short: one processor adds the context variables, the pid, the level and the time,
and renders JSON with an encoder built once.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# structlog's add_log_level: "warn" is the stdlib's alias, "exception" logs at error.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}
_UTC = datetime.UTC


def _json_default(value: Any) -> Any:
    # As structlog's JSONRenderer: an object's own __structlog__, else its repr.
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


_JSON = json.JSONEncoder(default=_json_default)


def configure(level: str = "info", stream: Any = None) -> None:
    """JSON lines on stdout (or ``stream``): one object per event."""
    pid = os.getpid()  # configure() runs in each worker process
    merge_contextvars = structlog.contextvars.merge_contextvars
    format_exc_info = structlog.processors.format_exc_info

    def render(logger: Any, method_name: str, event: MutableMapping[str, Any]) -> str:
        # The same keys, in the same order, as merge_contextvars, a pid, add_log_level,
        # TimeStamper(fmt="iso", utc=True), format_exc_info and JSONRenderer would add.
        event = merge_contextvars(logger, method_name, event)
        event["pid"] = pid
        event["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event["timestamp"] = datetime.datetime.now(tz=_UTC).isoformat().replace("+00:00", "Z")
        if "exc_info" in event:
            event = format_exc_info(logger, method_name, event)
        return _JSON.encode(event)

    structlog.configure(
        processors=[render],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library; keep their lines JSON-free
    # but on stderr, at warning and above, so a stack trace never reaches a client.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
