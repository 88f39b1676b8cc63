"""Structured JSON logs through structlog, with the request id bound per request.

Never pass a token, cookie or secret to a log call: log names, reasons and ids.
"""

from __future__ import annotations

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


def configure(level: str = "info", stream: Any = None) -> None:
    """JSON lines on stdout (or ``stream``): one object per event."""
    pid = os.getpid()  # configure() runs in each worker process

    def add_pid(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
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
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library; keep their lines JSON-free
    # but on stderr, at warning and above, so a stack trace never reaches a client.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
