"""The client's request body on its way to the upstream, and what failures there mean.

:class:`RequestBodyStream` streams the body chunk by chunk with an idle timeout
(and answers ``Expect: 100-continue`` only once the upstream is connected);
:func:`translate_send_error` turns what sending the request raised into the
error the client gets: its own body's fault (400, the connection closed) or the
upstream's (502, 504).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import errors
from gateway.connections import body_deadline
from gateway.headers import FramingError
from gateway.upstream_pool import UpstreamConnectError

log = structlog.get_logger("gateway.proxy")  # the name these lines had in proxy.py

# Seconds the client may go silent in the middle of its request body (nginx's
# client_body_timeout default). Bounds slow uploads that stall, and a body that
# aiohttp's llhttp parser stops feeding without an error (a malformed chunk
# after the head was accepted leaves the stream waiting forever).
BODY_IDLE_TIMEOUT_S = 60.0


class RequestBodyStream:
    """The client's body as the upstream request's data, chunk by chunk as it comes.

    Fails with TimeoutError when the client sends nothing for ``idle_timeout_s``
    (``server.body_timeout``), or trickles it slower than the minimum rate of
    :func:`gateway.connections.body_deadline`; a single wait for the upstream to take
    a chunk does not count against the first bound.

    A client that sent ``Expect: 100-continue`` is told to go on only now, when
    the request was allowed and the upstream is connected (RFC 9110 10.1.1); a
    refusal or a 502 comes before it has sent a byte. (Behind aiohttp's router,
    whose default expect handler answers first, the client gets a second 100:
    harmless, RFC 9110 15.2 has clients accept any number of 1xx.)
    """

    __slots__ = ("_idle_timeout_s", "_request", "stalled")

    def __init__(self, request: web.BaseRequest, idle_timeout_s: float) -> None:
        self._request = request
        self._idle_timeout_s = idle_timeout_s
        self.stalled = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        request = self._request
        if (
            request.version >= aiohttp.HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        loop = asyncio.get_running_loop()
        read = request.content.readany
        try:
            # One timer for the whole body, moved per chunk: cheaper than wait_for.
            started = loop.time()
            received = 0
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(
                        body_deadline(
                            started=started,
                            now=loop.time(),
                            received_bytes=received,
                            timeout_s=self._idle_timeout_s,
                        )
                    )
                    chunk = await read()
                    deadline.reschedule(None)
                    if not chunk:
                        return
                    received += len(chunk)
                    yield chunk
        except TimeoutError:
            self.stalled = True
            raise


def translate_send_error(
    exc: Exception,
    request: web.BaseRequest,
    upstream: str,
    body: RequestBodyStream | None,
) -> errors.GatewayError | None:
    """An exception from sending the request, as the error the client should get.

    ``None`` for anything that is not a network or protocol failure (a bug): it
    propagates as it is.
    """
    # The client's body broke (bad chunk, disconnect) or stalled: not the upstream's
    # fault. The connection cannot be reused: where the body ends is unknown.
    if body is not None and body.stalled:
        log.info("request_body_timeout", upstream=upstream)
        return FramingError("The request body stalled.", reason="request_body_timeout")
    payload_error = request.content.exception() if body is not None else None
    if payload_error is not None:
        log.info("request_body_aborted", upstream=upstream, error=type(payload_error).__name__)
        return FramingError("The request body was incomplete.", reason="request_body_aborted")
    return translate_upstream_error(exc, upstream)


def translate_upstream_error(exc: Exception, upstream: str) -> errors.GatewayError | None:
    """:func:`translate_send_error` for a request without a body: only the upstream
    can have failed."""
    if isinstance(exc, TimeoutError):
        log.warning("upstream_timeout", upstream=upstream, error=type(exc).__name__)
        return errors.UpstreamTimeout(
            "The upstream did not answer in time.", reason="upstream_timeout"
        )
    if isinstance(exc, aiohttp.ClientConnectorError | UpstreamConnectError):
        log.warning("upstream_unreachable", upstream=upstream, error=type(exc).__name__)
        return errors.UpstreamError(
            "The upstream could not be reached.", reason="upstream_unreachable"
        )
    if isinstance(exc, aiohttp.ClientError | OSError | HttpProcessingError):
        # Connected, then reset, closed without an answer, or an unparsable answer.
        log.warning("upstream_failed", upstream=upstream, error=type(exc).__name__)
        return errors.UpstreamError("The upstream failed to answer.", reason="upstream_failed")
    return None
