"""Client connections: the listener, per-connection limits and timeouts, the drain.

aiohttp's server accepts every connection it is offered, waits an hour for a
request head and closes keep-alive connections only when idle. Here:

- :class:`Listener` accepts only while the worker holds fewer than
  ``server.max_connections``. At the limit a waiting connection takes the place of
  the keep-alive connection idle the longest; with none idle the listening socket is
  not read, so new connections wait in the kernel's listen backlog (nginx does both
  when its ``worker_connections`` run out) instead of every connection slowing down.
- :class:`GuardedHandler` closes a connection that has not sent a complete request
  head within ``server.header_timeout``, an idle one after
  ``server.keepalive_timeout``, and ends keep-alive (``Connection: close`` on the
  last response) after ``server.keepalive_requests`` requests or
  ``server.keepalive_max_age``, so load spreads again over workers and replicas.
- :meth:`GuardedHandler.receive` hands what arrives to aiohttp's parser;
  :class:`gateway.early.EarlyHandler` answers some requests from memory first.
- :meth:`GuardedServer.drain` (SIGTERM) answers what is in flight or already
  received with ``Connection: close`` and closes idle connections only between
  requests.

The decisions are the pure functions at the top; the rest is asyncio plumbing.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("gateway.connections")

# The peer address of a connection on ``server.unix_socket`` (never what the socket's
# own peer name says: a local client may bind its end to any name, "10.0.0.1" too).
# An RFC 7239 obfuscated node, so ``Forwarded: for=_unix`` is well-formed.
UNIX_PEER = "_unix"

# Apache mod_reqtimeout's default (body=20,MinRate=500): past the first seconds, a
# body must keep arriving at 500 bytes/s on average. A trickle of a byte every few
# seconds then fails however patient each single read is.
BODY_MIN_RATE_BPS = 500.0
# On SIGTERM, a connection idle at that moment may be one whose client has just got an
# answer and is sending its next request (a busy keep-alive client does so within
# milliseconds). Such a request is still answered (with Connection: close) if it
# arrives within this grace; a connection still idle after it is closed.
DRAIN_IDLE_GRACE_S = 1.0
# After answering a body that came too slowly (or broke), what is left of it is read
# and dropped this long before closing (aiohttp's lingering close, 10 s by default),
# so the answer is not lost to a reset, without waiting on the trickle itself.
LINGER_AFTER_ERROR_S = 1.0
# Accepted per wake-up of the listening socket; asyncio's own server takes up to its
# backlog at once. Bounded so a burst of connections does not stall the loop.
ACCEPT_BATCH = 128
# At the connection limit, a keep-alive connection idle at least this long may be
# closed to make room for a new one; one idle for less may be about to be reused.
MIN_IDLE_TO_CLOSE_S = 1.0
# accept() failing for lack of file descriptors or memory: retry after this long
# (asyncio's ACCEPT_RETRY_DELAY) rather than spin on a socket that stays readable.
ACCEPT_RETRY_S = 1.0
_ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}

# A minimal answer to a client that never finished its request head (RFC 9110
# 15.5.9: the server SHOULD send "close").
_TIMEOUT_BODY = b'{"error":"request_head_timeout"}'
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """The ``server`` settings that bound one client connection."""

    max_connections: int = 1024
    header_timeout_s: float = 20.0
    body_timeout_s: float = 20.0
    keepalive_timeout_s: float = 75.0
    keepalive_requests: int = 1000
    keepalive_max_age_s: float = 10.0


def close_reason(
    policy: ConnectionPolicy, *, served: int, age_s: float, draining: bool
) -> str | None:
    """Why the response being sent must end keep-alive, or None to keep it."""
    if draining:
        return "draining"
    if served >= policy.keepalive_requests:
        return "max_requests"
    if age_s >= policy.keepalive_max_age_s:
        return "max_age"
    return None


def body_deadline(*, started: float, now: float, received_bytes: int, timeout_s: float) -> float:
    """When the next chunk of a request body must have arrived by.

    Both bounds hold: no single wait longer than ``timeout_s`` (nginx's
    ``client_body_timeout``), and on the whole at least ``BODY_MIN_RATE_BPS`` after
    the first ``timeout_s`` (Apache's ``MinRate``).
    """
    return min(now + timeout_s, started + timeout_s + received_bytes / BODY_MIN_RATE_BPS)


class GuardedRequest(web.BaseRequest):
    """A request whose ``keep_alive`` also asks the connection's limits.

    aiohttp reads ``request.keep_alive`` when a response is prepared (also one
    streamed from the upstream), to choose between keep-alive and
    ``Connection: close``; asked here, the decision is made for the response that
    is actually being sent.
    """

    @property
    def keep_alive(self) -> bool:
        protocol = self.protocol
        if not isinstance(protocol, GuardedHandler):
            return not self._message.should_close
        keep = not self._message.should_close and protocol.may_keep_alive()
        protocol.answered_close = not keep
        return keep


class GuardedServer(web.Server):
    """aiohttp's low-level server with a connection count, limits and a drain."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Any],
        policy: Callable[[], ConnectionPolicy],
        *,
        on_close: Callable[[str], None] = lambda reason: None,
        on_timeout: Callable[[str], None] = lambda phase: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=self._guarded_request, **kwargs)
        self.policy = policy
        self.on_close = on_close
        self.on_timeout = on_timeout
        self.draining = False
        self.open_connections = 0
        self.closing_idle = 0  # closed for room, connection_lost still to come
        self.listener: Listener | None = None

    def _guarded_request(
        self,
        message: Any,
        payload: Any,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        if isinstance(protocol, GuardedHandler):
            protocol.served += 1
        return GuardedRequest(message, payload, protocol, writer, task, self._loop)

    def handler_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for a new connection's handler."""
        return {**self._kwargs, "keepalive_timeout": self.policy().keepalive_timeout_s}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1
        if isinstance(handler, GuardedHandler) and handler.closed_for_room:
            self.closing_idle -= 1
        if self.listener is not None:
            self.listener.room_made()

    def close_longest_idle(self) -> bool:
        """Close the keep-alive connection idle the longest (at least
        MIN_IDLE_TO_CLOSE_S), to make room for a new one; False when none is."""
        oldest: GuardedHandler | None = None
        for handler in self._connections:
            if (
                isinstance(handler, GuardedHandler)
                and not handler.closed_for_room
                and handler.idle()
                and (oldest is None or handler.idle_since < oldest.idle_since)
            ):
                oldest = handler
        if oldest is None or self._loop.time() - oldest.idle_since < MIN_IDLE_TO_CLOSE_S:
            return False
        oldest.closed_for_room = True
        self.closing_idle += 1
        self.on_close("room")
        oldest.force_close()
        return True

    async def drain(self, timeout_s: float) -> int:
        """Let every connection finish its work and close; the ones forced after
        ``timeout_s`` (their count)."""
        self.draining = True
        for handler in list(self._connections):
            if isinstance(handler, GuardedHandler):
                handler.begin_drain()
        deadline = time.monotonic() + timeout_s
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self._connections)
        if left:
            await self.shutdown(0.1)  # aiohttp's: cancel what is still running
        return left


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a request-head timeout, keep-alive limits
    and a drain that never cuts a request it has received."""

    server: GuardedServer

    def __init__(self, server: GuardedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.server = server
        self.served = 0
        self.connected_at = 0.0
        self.draining = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._drain_timer: asyncio.TimerHandle | None = None
        self.closed_for_room = False
        self.over_unix = False  # on server.unix_socket: the peer is UNIX_PEER
        self.answered_close = False  # the last answer said Connection: close

    # -- the request head -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected_at = self._loop.time()
        sock = transport.get_extra_info("socket")
        self.over_unix = sock is not None and sock.family == socket.AF_UNIX
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends anything is closed too
        if self.server.draining:
            self.begin_drain()

    def data_received(self, data: bytes) -> None:
        waiting = self._waiter is not None and not self._waiter.done()
        before = self._request_count
        self.receive(data)
        if self._request_count != before:  # a complete head (the common case: no timer)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
                self._head_bytes = 0
        elif self._head_timer is not None:
            self._head_bytes += len(data)
        elif waiting and data:  # part of the next request's head on a kept connection
            self._arm_head_timer()
            self._head_bytes = len(data)

    def receive(self, data: bytes) -> None:
        """Parse ``data`` (aiohttp's parser); a subclass may answer from memory
        instead (:class:`gateway.early.EarlyHandler`). A request it takes counts in
        ``_request_count``, as aiohttp's parser counts the heads it completes."""
        super().data_received(data)

    def _arm_head_timer(self) -> None:
        timeout_s = self.server.policy().header_timeout_s
        self._head_bytes = 0
        self._head_timer = self._loop.call_later(timeout_s, self._head_timed_out)
        # aiohttp's idle timer must not cut a head that is still within its own time.
        self._next_keepalive_close_time = max(
            self._next_keepalive_close_time, self._loop.time() + timeout_s
        )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None:
            return
        started = self._head_bytes > 0
        log.info("client_timeout", phase="head" if started else "silent", peer=self.peer_address())
        self.server.on_timeout("head")
        if started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._drain_timer = None
        super().connection_lost(exc)

    @property
    def peername(self) -> Any:  # aiohttp's, which request.remote reads
        return UNIX_PEER if self.over_unix else super().peername

    def peer_address(self) -> str | None:
        peer = self.peername
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return peer if isinstance(peer, str) and peer else None

    def linger_briefly(self) -> None:
        """The body will not be read on: close soon after the answer (see LINGER_...)."""
        self._lingering_time = min(self._lingering_time, LINGER_AFTER_ERROR_S)

    # -- keep-alive ---------------------------------------------------------------

    def close_reason_next(self) -> str | None:
        """:func:`close_reason` for a request answered without aiohttp (not yet counted
        in ``served``, as aiohttp's requests are when their answer is prepared)."""
        return close_reason(
            self.server.policy(),
            served=self.served + 1,
            age_s=self._loop.time() - self.connected_at,
            draining=self.draining or self.server.draining,
        )

    def may_keep_alive(self) -> bool:
        """For the response being prepared: may the connection stay open after it?"""
        if self._messages:
            return True  # requests already received are answered first
        reason = close_reason(
            self.server.policy(),
            served=self.served,
            age_s=self._loop.time() - self.connected_at,
            draining=self.draining or self.server.draining,
        )
        if reason is None:
            return True
        self.server.on_close(reason)
        return False

    # -- drain --------------------------------------------------------------------

    def idle(self) -> bool:
        """Between requests: nothing received that is not answered."""
        waiting = self._waiter is not None and not self._waiter.done()
        return waiting and not self._messages and self._head_bytes == 0

    @property
    def idle_since(self) -> float:
        """When the last answer was sent (aiohttp's idle timer counts from it)."""
        if not self.served:
            return self.connected_at
        return self._next_keepalive_close_time - self._keepalive_timeout

    def begin_drain(self) -> None:
        self.draining = True
        if self._drain_timer is None:
            self._drain_timer = self._loop.call_later(DRAIN_IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._drain_timer = None
        if self.transport is None or self._force_close:
            return
        if self.idle():
            self.force_close()
        else:  # busy: its response says Connection: close; look again later
            self._drain_timer = self._loop.call_later(0.1, self._close_if_idle)


class Listener:
    """Listening sockets read only while the worker is under its connection limit."""

    def __init__(self, server: GuardedServer, sockets: list[socket.socket]) -> None:
        self._server = server
        self._sockets = sockets
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False
        self._adopting: set[asyncio.Task[Any]] = set()
        self._at_limit = False  # logged once per stretch at the limit
        server.listener = self

    @property
    def paused(self) -> bool:
        return not self._reading

    def start(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if self._reading or self._closed:
            return
        self._reading = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause(self) -> None:
        if not self._reading:
            return
        self._reading = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())

    def _full(self) -> bool:
        server = self._server
        held = server.open_connections - server.closing_idle + len(self._adopting)
        return held >= server.policy().max_connections

    def room_made(self) -> None:
        if not self._reading and not self._closed and not self._full():
            self._at_limit = False
            self._resume()

    def room_made_or_idle(self) -> None:
        if not self._reading and not self._closed:
            self._resume()  # _accept closes an idle connection or pauses again

    def _accept(self, sock: socket.socket, *, limit: bool = True) -> None:
        taken = 0
        for _ in range(ACCEPT_BATCH):
            if limit and self._full():
                if taken:
                    # Just filled up: whether anybody else waits shows when the
                    # socket is still readable and this is called again.
                    return
                # A connection is waiting: make room by closing the connection idle
                # the longest (nginx reuses idle keep-alive connections this way), so
                # idle clients cannot hold every slot; with none idle, wait for room.
                if self._server.close_longest_idle():
                    continue
                if not self._at_limit:
                    self._at_limit = True
                    log.warning("connection_limit_reached", open=self._server.open_connections)
                self._pause()
                # A busy connection may turn idle without closing: look again then.
                self._loop.call_later(ACCEPT_RETRY_S, self.room_made_or_idle)
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait instead of spinning.
                log.error("accept_failed", error=exc.strerror)
                self._pause()
                self._loop.call_later(ACCEPT_RETRY_S, self.room_made)
                return
            taken += 1
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._server, conn))
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("connection_setup_failed", error=type(task.exception()).__name__)
        self.room_made()

    async def close(self) -> None:
        """Stop listening. Connections the kernel has already completed (in the
        backlog) are taken first: closing the socket would reset them, and their
        clients may have sent a request already."""
        self._pause()
        self._closed = True
        for sock in self._sockets:
            self._accept(sock, limit=False)
            sock.close()
        if self._adopting:
            await asyncio.gather(*self._adopting, return_exceptions=True)
