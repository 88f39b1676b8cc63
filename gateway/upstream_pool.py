"""Pooled HTTP/1.1 connections to one upstream, for requests without a body.

Most forwarded requests are GETs: no body, a small answer. aiohttp's
``ClientSession.request`` spends several times the cost of the exchange itself
on what a proxy does not need (URL and cookie handling, redirects, tracing,
request and response wrappers), and it was the largest single cost of a
forwarded request. This pool keeps what decides correctness and drops the rest:

* the connection protocol is aiohttp's own :class:`ResponseHandler`, so the
  response is parsed by the same llhttp parser with the same limits, the same
  read timeout (``sock_read``) and the same handling of a connection that
  breaks, as with ``ClientSession``;
* the request head is serialised by aiohttp's own function (its ``StreamWriter``'s),
  which refuses CR, LF and other control characters in the request line and in
  every header, as ``ClientSession`` does; a head may be serialised once and sent
  many times (:meth:`UpstreamPool.send`: a remembered forward);
* a connection goes back to the pool only when its response was read to the
  end and nothing says it must close (``ResponseHandler.should_close``: a
  ``Connection: close``, an unread or broken body, stray bytes, an upgrade);
  anything else closes it, so one response can never be read as the next one's.

:mod:`gateway.proxy` uses it for bodiless GET, HEAD, OPTIONS and TRACE to plain
``http://`` upstreams and keeps ``ClientSession`` for everything else (bodies,
WebSockets, TLS). Both apply the same timeouts and pool limit.
"""

from __future__ import annotations

import asyncio
import collections
import time

from aiohttp import ClientConnectionError, ClientConnectionResetError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

# aiohttp's ClientSession retries these once when a kept-alive connection turns out
# to be closed (RFC 9112 9.3.1); so does the pool.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamConnectError(OSError):
    """No connection to the upstream could be opened (refused, unresolvable, ...)."""


class PooledResponse:
    """The response head from the upstream and its body, still on the connection.

    Read ``payload`` and then call :meth:`release` (always, also after an error):
    the connection goes back to the pool if the body was read to its end and the
    exchange allows reuse, and is closed otherwise.
    """

    __slots__ = ("_pool", "_protocol", "message", "payload")

    def __init__(
        self,
        pool: UpstreamPool,
        protocol: ResponseHandler,
        message: RawResponseMessage,
        payload: StreamReader,
    ) -> None:
        self._pool = pool
        self._protocol: ResponseHandler | None = protocol
        self.message = message
        self.payload = payload

    def release(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._pool.release(protocol, reusable=self.payload.is_eof())

    def close(self) -> None:
        """Drop the connection whatever its state (the relay was abandoned)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._pool.release(protocol, reusable=False)


def request_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    """A request head as aiohttp's StreamWriter writes it: ``ValueError`` for a CR, LF or
    other control character in the request line or a header."""
    head: bytes = _serialize_headers(f"{method} {target} HTTP/1.1", headers)
    return head


class UpstreamPool:
    """Keep-alive connections to one ``host:port``, at most ``limit`` at a time.

    ``connect_timeout_s`` bounds waiting for a free connection plus opening one,
    ``sock_connect_timeout_s`` opening one, ``read_timeout_s`` every wait for
    bytes from the upstream; an idle connection is closed after
    ``keepalive_timeout_s``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limit: int,
        connect_timeout_s: float,
        sock_connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_timeout_s: float,
        read_bufsize: int,
    ) -> None:
        self._host = host
        self._port = port
        self._limit = limit
        self._connect_timeout_s = connect_timeout_s
        self._sock_connect_timeout_s = sock_connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._read_bufsize = read_bufsize
        # Most recently released last: reuse takes the warmest connection and the
        # cleanup closes the coldest first.
        self._idle: collections.deque[tuple[ResponseHandler, float]] = collections.deque()
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._cleanup_handle: asyncio.TimerHandle | None = None
        self._closed = False

    # -- the exchange -----------------------------------------------------------------

    async def request(self, method: str, target: str, headers: CIMultiDict[str]) -> PooledResponse:
        """Send a request without a body and wait for the response head.

        Raises :class:`UpstreamConnectError` when no connection can be opened,
        ``TimeoutError`` when the pool, the connect or the head takes too long,
        ``ValueError`` for a head aiohttp would not write (CR or LF in it), and
        aiohttp's client errors (``ServerDisconnectedError``, ``ClientOSError``,
        ``ClientResponseError``-like ``HttpProcessingError``) when the upstream
        breaks the exchange.
        """
        return await self.send(method, request_head(method, target, headers))

    async def send(self, method: str, head: bytes) -> PooledResponse:
        """:meth:`request` with its head written already (:func:`request_head`)."""
        retry = method in IDEMPOTENT_METHODS
        while True:
            # An idle connection is the common case: taken without a coroutine.
            protocol = self._take_idle()
            reused = True
            if protocol is None:
                protocol, reused = await self._acquire()
            try:
                protocol.set_response_params(
                    skip_payload=method == "HEAD",
                    read_until_eof=True,
                    auto_decompress=False,
                    read_timeout=self._read_timeout_s,
                    read_bufsize=self._read_bufsize,
                )
                transport = protocol.transport
                if transport is None or transport.is_closing():  # as aiohttp's StreamWriter
                    raise ClientConnectionResetError("Cannot write to closing transport")
                transport.write(head)
                protocol.start_timeout()
                while True:
                    message, payload = await protocol.read()
                    # 1xx interim answers (100 Continue, 103 Early Hints) precede the real one.
                    if not 100 <= message.code < 200 or message.code == 101:
                        return PooledResponse(self, protocol, message, payload)
            except (ClientConnectionError, ConnectionError) as exc:
                self.release(protocol, reusable=False)
                # A kept-alive connection the upstream closed meanwhile: nothing was
                # processed, so an idempotent request may go again, once.
                if not (retry and reused) or isinstance(exc, TimeoutError):
                    raise
                retry = False
            except BaseException:
                self.release(protocol, reusable=False)
                raise

    # -- the pool ---------------------------------------------------------------------

    async def _acquire(self) -> tuple[ResponseHandler, bool]:
        """A connection when none was idle: wait for a slot, then reuse one (True)
        or open one (False)."""
        async with asyncio.timeout(self._connect_timeout_s):
            while self._in_use >= self._limit:
                await self._wait_for_slot()
                protocol = self._take_idle()
                if protocol is not None:
                    return protocol, True
            self._in_use += 1
            try:
                async with asyncio.timeout(self._sock_connect_timeout_s):
                    protocol = await self._connect()
            except BaseException:
                self._in_use -= 1
                self._wake_one()
                raise
            return protocol, False

    def _take_idle(self) -> ResponseHandler | None:
        now = time.monotonic()
        while self._idle:
            protocol, released_at = self._idle.pop()
            if protocol.is_connected() and now - released_at <= self._keepalive_timeout_s:
                self._in_use += 1
                return protocol
            protocol.close()
        return None

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._wake_one()  # pass the slot on
            raise

    async def _connect(self) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: ResponseHandler(loop), self._host, self._port
            )
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise UpstreamConnectError(exc.errno, str(exc)) from exc
        return protocol

    def release(self, protocol: ResponseHandler, *, reusable: bool) -> None:
        """Hand ``protocol`` back: kept for reuse when it can be, closed otherwise."""
        self._in_use -= 1
        if self._closed or not reusable or protocol.should_close or not protocol.is_connected():
            protocol.close()
        else:
            self._idle.append((protocol, time.monotonic()))
            if self._cleanup_handle is None:
                self._schedule_cleanup()
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _schedule_cleanup(self) -> None:
        self._cleanup_handle = asyncio.get_running_loop().call_later(
            self._keepalive_timeout_s, self._cleanup
        )

    def _cleanup(self) -> None:
        self._cleanup_handle = None
        now = time.monotonic()
        while self._idle:
            protocol, released_at = self._idle[0]
            if protocol.is_connected() and now - released_at <= self._keepalive_timeout_s:
                break
            self._idle.popleft()
            protocol.close()
        if self._idle:
            self._schedule_cleanup()

    def close(self) -> None:
        """Close every idle connection; those in use close when released."""
        self._closed = True
        if self._cleanup_handle is not None:
            self._cleanup_handle.cancel()
            self._cleanup_handle = None
        while self._idle:
            self._idle.pop()[0].close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ServerDisconnectedError("the upstream pool is closed"))
        self._waiters.clear()
