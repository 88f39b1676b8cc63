"""Relaying a WebSocket: frames both ways once both handshakes are done, and the close.

:func:`forward_websocket` does the two handshakes, upstream first; from then on
:func:`relay_websocket` copies messages until either side closes, relaying the
close code (RFC 6455 7.4) so both sides see the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence

import aiohttp
import structlog
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway import errors
from gateway.headers import WEBSOCKET_HANDSHAKE_HEADERS, websocket_protocols
from gateway.request_stream import translate_send_error

log = structlog.get_logger("gateway.proxy")  # the name these lines had in proxy.py

# WebSocket messages are buffered whole by aiohttp; this caps one message.
# 4 MiB is aiohttp's default; larger messages close the connection with 1009.
WS_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Seconds to wait for the other side's close frame when relaying a close.
WS_CLOSE_TIMEOUT_S = 10.0

# RFC 6455 7.4.1: 1005, 1006 and 1015 must not be sent in a close frame, 1004 is
# reserved; 3000-4999 are for libraries and applications.
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)}) | frozenset(
    range(3000, 5000)
)


def sendable_close_code(code: object) -> int:
    if isinstance(code, int) and code in _SENDABLE_CLOSE_CODES:
        return code
    return aiohttp.WSCloseCode.OK


async def forward_websocket(
    request: web.BaseRequest,
    session: aiohttp.ClientSession,
    url: URL,
    upstream: str,
    headers: CIMultiDict[str],
    extra_response_headers: Sequence[tuple[str, str]],
    response_headers: Callable[[Iterable[tuple[str, str]]], CIMultiDict[str]],
) -> web.StreamResponse:
    """Relay a WebSocket: open it upstream first (at ``url``), then accept the client's.

    Text, binary and close frames (with their codes) pass both ways. When the
    upstream refuses the upgrade, its status goes back as a plain response with its
    headers as ``response_headers`` filters them.
    """
    protocols = websocket_protocols(request.headers.items())
    # Check the client's handshake before opening anything upstream.
    if not web.WebSocketResponse(protocols=protocols).can_prepare(request).ok:
        raise errors.BadRequest("Invalid WebSocket handshake.", reason="bad_ws_handshake")
    try:
        upstream_ws = await session.ws_connect(
            url,
            headers=headers,
            protocols=protocols,
            autoclose=False,
            autoping=True,
            max_msg_size=WS_MAX_MESSAGE_BYTES,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_TIMEOUT_S),
        )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 101:
            raise errors.UpstreamError(
                "The upstream's WebSocket handshake was invalid.", reason="ws_bad_handshake"
            ) from exc
        log.info("upstream_ws_refused", upstream=upstream, status=exc.status)
        refused: CIMultiDict[str] = CIMultiDict()
        if exc.headers is not None:
            refused = response_headers(exc.headers.items())
            # The refusal's body is not relayed, so its length and the handshake go.
            for name in ("Content-Length", *WEBSOCKET_HANDSHAKE_HEADERS):
                refused.popall(name, None)
        return web.Response(status=exc.status, headers=refused)
    except Exception as exc:
        error = translate_send_error(exc, request, upstream, None)
        if error is None:
            raise
        raise error from exc

    client_ws = web.WebSocketResponse(
        protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
        autoclose=False,
        autoping=True,
        max_msg_size=WS_MAX_MESSAGE_BYTES,
        timeout=WS_CLOSE_TIMEOUT_S,
    )
    for name, value in extra_response_headers:
        client_ws.headers.add(name, value)
    try:
        await client_ws.prepare(request)
    except BaseException:
        await upstream_ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        raise
    await relay_websocket(client_ws, upstream_ws, upstream)
    return client_ws


async def relay_websocket(
    client_ws: web.WebSocketResponse,
    upstream_ws: aiohttp.ClientWebSocketResponse,
    upstream: str,
) -> None:
    # Each pump ends the whole relay on its own: a close frame is relayed to the
    # other side, a vanished peer closes the other side, and the other pump then
    # reads "closing" and stops. The finally is for cancellation (shutdown).
    to_upstream = asyncio.ensure_future(
        _pump(client_ws, upstream_ws, lost=aiohttp.WSCloseCode.GOING_AWAY)
    )
    to_client = asyncio.ensure_future(
        _pump(upstream_ws, client_ws, lost=aiohttp.WSCloseCode.BAD_GATEWAY)
    )
    try:
        await asyncio.gather(to_upstream, to_client)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        if not upstream_ws.closed:
            await upstream_ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        log.debug(
            "websocket_closed",
            upstream=upstream,
            client_code=client_ws.close_code,
            upstream_code=upstream_ws.close_code,
        )


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    *,
    lost: int,
) -> None:
    """Copy frames from ``source`` to ``sink`` until a close, relaying its code.

    ``lost`` is the code the sink gets when the source goes away without a close
    frame: 1001 (going away) towards the upstream, 1014 (bad gateway, IANA
    WebSocket close code registry) towards the client.
    """
    try:
        while True:
            msg = await source.receive()
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                code = sendable_close_code(msg.data)
                reason = (msg.extra or "").encode("utf-8")[:123]  # RFC 6455 5.5: 125 B
                # Close the far side first and wait for its answer, then answer the
                # side that started: both see the same code.
                await sink.close(code=code, message=reason)
                await source.close(code=code, message=reason)
                return
            elif msg.type is WSMsgType.CLOSING:
                return  # the other pump is relaying a close
            else:  # CLOSED or ERROR: the source vanished or broke the protocol
                await sink.close(code=lost)
                return
    except (aiohttp.ClientError, OSError, RuntimeError) as exc:
        log.info("websocket_relay_ended", error=type(exc).__name__)
        with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
            await sink.close(code=lost)
