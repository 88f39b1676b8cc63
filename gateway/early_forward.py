"""A remembered forward, relayed before aiohttp parses the request (gateway.early).

The same bytes from the same peer were decided, allowed and forwarded a moment ago
(:class:`gateway.decision_memo.Prepared`), and may be forwarded so again. Here the
request goes over the upstream's pool with the headers prepared for it (a fresh
``X-Request-Id``), and the upstream's answer is written to the client as aiohttp's
``web.Response`` would write it (the same head, ``Date`` and ``Server`` added the
same way), when it is whole: a ``Content-Length`` of at most
:data:`gateway.proxy.BUFFERED_BODY_MAX_BYTES` with the body read. Anything else —
a streamed or large body, a status or method whose answer has no body, a head the
client may not get, an upstream that failed, a connection that must close after
the answer — is a :class:`Handover`: aiohttp parses the request after all and
:meth:`gateway.forward.Forwarder.forward_prepared` finishes it as usual, with what
the relay got, so every such answer is the one the usual path gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import _serialize_headers
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

from gateway import logs
from gateway.context import Context
from gateway.decision_memo import Prepared
from gateway.early import EarlyHandler, Relay
from gateway.errors import GatewayError
from gateway.proxy import BUFFERED_BODY_MAX_BYTES
from gateway.request_stream import translate_upstream_error
from gateway.upstream_pool import PooledResponse, UpstreamPool

# Statuses whose answer never has a body (RFC 9110 6.4.1): aiohttp's own rules.
_BODILESS = frozenset({204, 304})


@dataclass(slots=True)
class Handover:
    """What a relay leaves to the usual handling of the same request: the upstream's
    answer (its head read) or the error to answer with; counted and timed already."""

    prepared: Prepared
    request_id: str
    started: float  # time.perf_counter() when the relay began
    outcome: PooledResponse | GatewayError

    def close(self) -> None:
        if isinstance(self.outcome, PooledResponse):
            self.outcome.close()


def handover_for(request: web.BaseRequest) -> Handover | None:
    """The handover a relay left for ``request``, if any (taken once)."""
    protocol = request.protocol
    if not isinstance(protocol, EarlyHandler):
        return None
    handover = protocol.take_handover(request.raw_headers)
    return handover if isinstance(handover, Handover) else None


def relay_for(ctx: Context, head: bytes, peer: str | None) -> Relay | None:
    """The relay of the forward remembered for ``head`` (a request's exact bytes) from
    ``peer``, or None (then aiohttp parses it and it is handled as usual)."""
    prepared = ctx.decisions.exact.get((peer, head), ctx.clock())
    if prepared is None or prepared.head is None:
        return None  # not over a pool (TLS): forward_prepared sends it
    pooled = ctx.upstreams.pool_of(prepared.upstream)
    if pooled is None:
        return None
    return partial(_relay, ctx, prepared, pooled[0])


async def _relay(
    ctx: Context,
    prepared: Prepared,
    pool: UpstreamPool,
    write: Callable[[bytes, bool], None],
    keeps_alive: Callable[[], bool],
) -> Handover | None:
    started = time.perf_counter()
    request_id = prepared.request_id or logs.new_request_id()
    logs.bind_request_id(request_id)
    prepared.requests.inc()
    assert prepared.head is not None  # relay_for
    head = b"%sX-Request-Id: %s\r\n\r\n" % (prepared.head, request_id.encode())
    try:
        pooled = await pool.send(prepared.method, head)
    except Exception as exc:
        error = translate_upstream_error(exc, prepared.upstream)
        if error is None:
            raise
        ctx.metrics.answered_early.counts["handed_over"] += 1
        return Handover(prepared, request_id, started, error)
    prepared.latency.observe(time.perf_counter() - started)
    try:
        answer = await _whole_answer(ctx, prepared, pooled, keeps_alive)
    except BaseException:
        pooled.close()
        raise
    counts = ctx.metrics.answered_early.counts
    if answer is None:
        counts["handed_over"] += 1
        return Handover(prepared, request_id, started, pooled)
    counts["relayed"] += 1
    write(*answer)
    pooled.release()
    if ctx.config.server.access_log:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        status = pooled.message.code
        logs.access(prepared.method, prepared.path, status, prepared.rule_name, duration_ms)
    return None


async def _whole_answer(
    ctx: Context, prepared: Prepared, pooled: PooledResponse, keeps_alive: Callable[[], bool]
) -> tuple[bytes, bool] | None:
    """The answer to write and whether the connection stays open after it, as aiohttp's
    ``web.Response`` writes it for the usual relay (:meth:`gateway.proxy.Upstreams.
    relay_pooled`), when the upstream's is whole; else None."""
    message = pooled.message
    status = message.code
    if status < 200 or status in _BODILESS or prepared.method == "HEAD":
        return None
    relayed = ctx.upstreams.relayed(message.raw_headers, message.headers)
    length = relayed.get("Content-Length")  # digits: llhttp checked them
    if length is None or int(length) > BUFFERED_BODY_MAX_BYTES:
        return None
    payload = pooled.payload
    try:
        body = payload.read_nowait() if payload.is_eof() else await payload.read()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None  # the payload keeps its error: the usual relay answers it
    headers = CIMultiDict(relayed)
    if body:
        headers.setdefault("Content-Type", "application/octet-stream")
    if "Date" not in headers:
        headers["Date"] = rfc822_formatted_time()
    headers.setdefault("Server", SERVER_SOFTWARE)
    reason = message.reason or REASON_PHRASES.get(status, "")
    try:
        head: bytes = _serialize_headers(f"HTTP/1.1 {status} {reason}", headers)
    except ValueError:
        return None  # a control character: the usual relay refuses it (502)
    keep_alive = keeps_alive()  # asked last, as aiohttp asks when the head is written
    if not keep_alive:  # last, as aiohttp adds it
        head = head[:-2] + b"Connection: close\r\n\r\n"
    return head + body, keep_alive
