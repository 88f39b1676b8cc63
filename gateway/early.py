"""Requests answered from memory before aiohttp parses them, by their exact bytes.

A request the gateway has just decided arrives again byte for byte (nginx asking
``/auth`` for each of a page's assets, a browser's or an API client's repeated GET).
:mod:`gateway.decision_memo` remembers the answer by those bytes and the peer; here
the connection finds it before aiohttp builds a request object, which is most of the
cost of such a request:

- a remembered ``/auth`` answer (:meth:`EarlyServer.early`) is written at once;
- a remembered forward (:meth:`EarlyServer.early_relay`) is sent upstream and its
  answer written when it is a whole one (a length, a small body); otherwise, or when
  the upstream fails, the request is handed to aiohttp after all, with what the relay
  got (:meth:`EarlyHandler.take_handover`), and answered as usual.

Only a whole HTTP/1.1 head without a body, alone in one read, on an idle connection
whose parser is between requests, and only while the connection may stay open after
the answer. While a relay runs, what arrives is held (reading pauses past
``read_bufsize``; no head timer runs on it) and parsed after its answer, so pipelined
requests keep their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD

from gateway.connections import GuardedHandler, GuardedServer

log = structlog.get_logger("gateway.early")

# The whole answer to a request, from memory, or None: (the request's exact bytes, a
# whole head without a body; the peer's address).
EarlyAnswer = Callable[[bytes, str | None], bytes | None]


class Unfinished(Protocol):
    """What a relay leaves to aiohttp's handling of the same request."""

    def close(self) -> None:
        """The request will not be handled after all (the connection is gone)."""


# A relay under way. Given how to write the whole answer (and whether the connection
# stays open after it) and how to ask that, it writes the answer and returns None, or
# writes nothing and returns what the usual handling of the request should finish.
Relay = Callable[[Callable[[bytes, bool], None], Callable[[], bool]], Awaitable[Unfinished | None]]
# The relay for a request's exact bytes and peer, or None.
EarlyRelay = Callable[[bytes, str | None], Relay | None]


def _one_head(data: bytes) -> bool:
    """``data`` is one request head and nothing else: its first blank line ends it."""
    return data.find(b"\r\n\r\n") == len(data) - 4


class EarlyServer(GuardedServer):
    """A :class:`GuardedServer` whose connections may answer from memory."""

    def follows_heads(self) -> bool:
        """Whether connections keep the exact bytes of requests that come alone
        (:meth:`EarlyHandler.exact_head`), for answers remembered by them."""
        return False

    def early(self) -> EarlyAnswer | None:
        """Remembered whole answers (only while :meth:`follows_heads`)."""
        return None

    def early_relay(self) -> EarlyRelay | None:
        """Remembered forwards (only while :meth:`follows_heads`)."""
        return None


class EarlyHandler(GuardedHandler):
    """A connection that looks for a remembered answer before aiohttp parses."""

    server: EarlyServer

    def __init__(self, server: EarlyServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        # aiohttp's parser is between requests, with nothing buffered (_note_boundary).
        self._at_boundary = True
        self._exact: tuple[object, bytes] | None = None  # (raw headers, bytes): exact_head
        self._relay: asyncio.Task[None] | None = None
        self._held = bytearray()  # arrived during the relay: parsed after its answer
        self._held_paused = False  # reading paused: _held is full
        self._handover: tuple[object, Unfinished] | None = None  # (raw headers, ...)

    def data_received(self, data: bytes) -> None:
        if self._relay is not None:
            # Held, not yet read: no head timer runs on what waits behind an answer
            # (aiohttp would have parsed a pipelined request already).
            self._hold(data)
            return
        super().data_received(data)

    def receive(self, data: bytes) -> None:
        server = self.server
        if not server.follows_heads():
            super().receive(data)
            self._at_boundary = False  # not followed: never answered from memory
            self._exact = None
            return
        if not (self._may_answer(data) and self._answered(data, server)):
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        before = self._request_count
        super().receive(data)
        if data:
            self._note_boundary(data, before)

    def _note_boundary(self, data: bytes, before: int) -> None:
        """After aiohttp parsed ``data``: is its parser now between requests, with
        nothing of a next one buffered? Yes when ``data`` ended with the head of a
        request without a body (then nothing follows it in the parser). That request,
        alone in ``data`` and one that may be answered from memory next time, is kept
        with its bytes (:meth:`exact_head`)."""
        self._exact = None
        received = self._request_count - before
        message, payload = self._messages[-1] if received and self._messages else (None, None)
        self._at_boundary = (
            isinstance(message, RawRequestMessage)
            and payload is EMPTY_PAYLOAD
            and data.endswith(b"\r\n\r\n")
            and not (self._upgraded or self._buffer_paused or self._payload_parser)
        )
        if (
            self._at_boundary
            and isinstance(message, RawRequestMessage)
            and received == 1
            and _one_head(data)
            and not message.should_close
            and message.version == HttpVersion11
        ):
            self._exact = (message.raw_headers, data)

    def exact_head(self, raw_headers: object) -> bytes | None:
        """The bytes of the request with these ``raw_headers`` (the very object), when it
        came alone, whole and without a body on a connection between requests (so the
        same bytes there are the same request)."""
        exact = self._exact
        return exact[1] if exact is not None and exact[0] is raw_headers else None

    def _may_answer(self, data: bytes) -> bool:
        """Whether ``data`` may be answered from memory: only a whole request head,
        alone, arriving on an idle HTTP/1.1 connection whose parser is between
        requests, and only while the connection may stay open after the answer."""
        return (
            self._at_boundary
            and _one_head(data)
            and not self._request_in_progress  # every answer so far is sent
            and not self._messages
            and not self.answered_close
            and self.transport is not None
            and not self.writing_paused
            and not (self._upgraded or self._force_close or self._close or self._buffer_paused)
            # else aiohttp answers it, with Connection: close
            and self.close_reason_next() is None
        )

    def _answered(self, data: bytes, server: EarlyServer) -> bool:
        peer = self.peer_address()
        early = server.early()
        answer = early(data, peer) if early is not None else None
        if answer is not None:
            self._request_count += 1
            self.served += 1
            self._write(answer)
            self._idle_from_now()
            return True
        early_relay = server.early_relay()
        relay = early_relay(data, peer) if early_relay is not None else None
        if relay is None:
            return False
        # Counted as aiohttp counts a request it parsed, until it is handed back; as
        # while aiohttp handles it, shutdown() waits for it, and the idle timer is off.
        self._request_count += 1
        self.served += 1
        self._request_in_progress = True
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._relay = self._loop.create_task(self._run_relay(data, relay))
        return True

    def _write(self, answer: bytes) -> None:
        if self.transport is not None:
            self.transport.write(answer)

    def _write_relayed(self, answer: bytes, keep_alive: bool) -> None:
        self._write(answer)
        if not keep_alive:  # the answer says Connection: close
            self.answered_close = True
            self.force_close()  # the transport sends what it holds, then closes

    def _keeps_alive(self) -> bool:
        """For a relayed answer about to be written: may the connection stay open?"""
        return not (self._force_close or self._close) and self.may_keep_alive()

    def _idle_from_now(self) -> None:
        """As aiohttp's start() after an answer: the idle timer counts from now."""
        self._keepalive = True
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(
                self._next_keepalive_close_time, self._process_keepalive
            )

    async def _run_relay(self, data: bytes, relay: Relay) -> None:
        unfinished: Unfinished | None = None
        try:
            unfinished = await relay(self._write_relayed, self._keeps_alive)
        except Exception as exc:  # a bug: as aiohttp does with a handler's
            log.error("early_relay_failed", error=type(exc).__name__, exc_info=exc)
            self.force_close()
            return
        finally:
            self._relay = None
            self._request_in_progress = False
            waiter = self._handler_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # shutdown() waits for this
        if unfinished is None:
            if not self.answered_close:
                self._idle_from_now()
        else:
            self._request_count -= 1  # counted again as aiohttp parses it
            self.served -= 1
            before = len(self._messages)
            self._parse(data)
            message = self._messages[-1][0] if len(self._messages) > before else None
            if isinstance(message, RawRequestMessage):
                self._handover = (message.raw_headers, unfinished)
            else:  # closing meanwhile: never handled
                unfinished.close()
        held = bytes(self._held)
        self._held.clear()
        if self._held_paused and self.transport is not None:
            self._held_paused = False
            self.transport.resume_reading()
        if held:
            self.data_received(held)

    def _hold(self, data: bytes) -> None:
        self._held += data
        if (
            len(self._held) >= self._read_bufsize
            and not self._held_paused
            and self.transport is not None
        ):
            self._held_paused = True
            self.transport.pause_reading()

    def take_handover(self, raw_headers: object) -> Unfinished | None:
        """What a relay left for the request with these ``raw_headers`` (the very
        object) to finish, if anything (once)."""
        handover = self._handover
        if handover is None or handover[0] is not raw_headers:
            return None
        self._handover = None
        return handover[1]

    def idle(self) -> bool:
        return self._relay is None and super().idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._relay is not None:
            self._relay.cancel()
        handover, self._handover = self._handover, None
        if handover is not None:
            handover[1].close()
        super().connection_lost(exc)
