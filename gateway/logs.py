"""Structured JSON logs through structlog, with the request id bound per request.

Never pass a token, cookie or secret to a log call: log names, reasons and ids.

Every request writes an access-log line, so the chain that renders one is kept
short: one processor adds the request id, the pid, the level and the time, and
renders JSON with an encoder built once; :func:`access` writes the access line
itself without structlog's logger machinery, in exactly the form it would take.
The access lines of one turn of the event loop go out in one write when the turn
ends (before the loop waits again): stdout is unbuffered in the image, so a write
per line was a system call per request. Any other line writes them first.

The request id lives in one context variable (:func:`bind_request_id`): each
request runs in its own task, so each has its own.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

from gateway.memo import Memo

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
_REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)


def bind_request_id(value: str | None) -> None:
    """Every line logged from here on in this task (and tasks it starts) carries it."""
    _REQUEST_ID.set(value)


def request_id() -> str:
    """The current request's id, or ``""`` outside a request."""
    return _REQUEST_ID.get() or ""


class _Access:
    """Where :func:`access` writes, set by :func:`configure`."""

    logger: structlog.WriteLogger | None = None
    pid = 0
    # The stream's write and flush, and the lock structlog's loggers share for it.
    write: Any = None
    flush: Any = None
    lock: Any = None
    # Access lines not yet written, and the loop whose turn ends by writing them.
    pending: list[str] = []
    due: asyncio.AbstractEventLoop | None = None


# At most this many access lines wait for the end of a turn (a long one writes on).
ACCESS_BATCH_LINES = 256


# An inbound X-Request-Id the gateway keeps (else it makes one: new_request_id).
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_for(inbound: str | None) -> str:
    """The request's id: the one it brought when it is well-formed, else a new one."""
    return own_request_id(inbound) or new_request_id()


def own_request_id(inbound: str | None) -> str | None:
    """The id a request brought (its X-Request-Id), when it is well-formed."""
    return inbound if inbound is not None and REQUEST_ID_RE.fullmatch(inbound) else None


def new_request_id() -> str:
    """16 hex digits for a request that brought no id of its own.

    An id only correlates log lines and answers: it needs to be unique, not
    secret, so it comes from ``random`` (reseeded in every forked worker), not
    from the operating system's generator, which costs a system call each.
    """
    return f"{random.getrandbits(64):016x}"


def access(method: str, path: str, status: int, rule: str | None, duration_ms: float) -> None:
    """The access-log line: what ``log.info("request", ...)`` would write, faster.

    One line per request, so it is put together by hand from JSON-escaped parts
    (the same C escaping ``json`` uses) and a timestamp whose date and time are
    formatted once per second.
    """
    if _Access.logger is None:
        return
    key = (method, path, status, rule)
    head = _heads.get(key)
    if head is None:
        head = (
            f'{{"method": {_str(method)}, "path": {_str(path)}, "status": {status!r}, '
            f'"rule": {"null" if rule is None else _str(rule)}, "duration_ms": '
        )
        _heads.put(key, head, 2 * len(head))
    request_id = _REQUEST_ID.get()
    line = (
        f'{head}{duration_ms!r}, "event": "request", '
        + ("" if request_id is None else f'"request_id": {_str(request_id)}, ')
        + f'"pid": {_Access.pid}, "level": "info", "timestamp": "{_timestamp()}"}}\n'
    )
    pending = _Access.pending
    pending.append(line)
    due = _Access.due
    if due is None or not due.is_running() or len(pending) >= ACCESS_BATCH_LINES:
        _write_soon(pending)


def _write_soon(pending: list[str]) -> None:
    """Have the pending access lines written when this turn of the event loop ends.

    One write for every line of a turn (under load a turn answers many requests),
    in order, before the loop next waits for anything. Written at once: outside a
    running loop, and when a turn has piled up ``ACCESS_BATCH_LINES``.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None or len(pending) >= ACCESS_BATCH_LINES:
        write_pending()
    elif _Access.due is not loop:
        _Access.due = loop
        loop.call_soon(write_pending)


def write_pending() -> None:
    """Write the access lines not yet written (every other line does this first)."""
    _Access.due = None
    if not _Access.pending:
        return
    with _Access.lock:  # what structlog.WriteLogger.msg does, without its calls
        lines, _Access.pending = _Access.pending, []
        _Access.write("".join(lines))
        _Access.flush()


_str = json.encoder.encode_basestring_ascii
# The start of recent access lines, up to the duration: requests repeat these four.
_heads: Memo[tuple[str, str, int, str | None], str] = Memo(max_entries=4096, max_bytes=1 << 20)


class _Second:
    """The last whole second formatted, as ``TimeStamper(fmt="iso", utc=True)`` would."""

    at = -1
    text = ""


def _timestamp() -> str:
    now_us = time.time_ns() // 1000
    second, micros = divmod(now_us, 1_000_000)
    if second != _Second.at:
        _Second.text = datetime.datetime.fromtimestamp(second, tz=_UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
        _Second.at = second
    return f"{_Second.text}.{micros:06d}Z"


def configure(level: str = "info", stream: Any = None) -> None:
    """JSON lines on stdout (or ``stream``): one object per event."""
    pid = os.getpid()  # configure() runs in each worker process
    format_exc_info = structlog.processors.format_exc_info

    def render(logger: Any, method_name: str, event: MutableMapping[str, Any]) -> str:
        # The same keys, in the same order, as merge_contextvars (with the request id
        # bound), a pid, add_log_level, TimeStamper(fmt="iso", utc=True),
        # format_exc_info and JSONRenderer would add.
        if _Access.pending:
            write_pending()  # the lines stay in the order they were logged
        request_id = _REQUEST_ID.get()
        if request_id is not None:
            event.setdefault("request_id", request_id)
        event["pid"] = pid
        event["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event["timestamp"] = datetime.datetime.now(tz=_UTC).isoformat().replace("+00:00", "Z")
        if "exc_info" in event:
            event = format_exc_info(logger, method_name, event)
        return _JSON.encode(event)

    threshold = _LEVELS.get(level, logging.INFO)
    file = stream or sys.stdout
    _Access.logger = structlog.WriteLogger(file=file) if threshold <= logging.INFO else None
    _Access.pid = pid
    write_pending()  # to the stream they were meant for
    if _Access.logger is not None:
        _Access.write, _Access.flush = file.write, file.flush
        _Access.lock = _Access.logger._lock
    structlog.configure(
        processors=[render],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.WriteLoggerFactory(file=file),
        cache_logger_on_first_use=True,
    )
    # aiohttp and asyncio log through the standard library; keep their lines JSON-free
    # but on stderr, at warning and above, so a stack trace never reaches a client.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
