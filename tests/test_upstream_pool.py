"""The pooled HTTP/1.1 path (gateway.upstream_pool) for requests without a body.

The upstreams here are raw asyncio servers that write exact bytes, so each test can
put the pool in front of one shape of answer: several on one connection, interim
1xx answers, a connection closed while idle, stray bytes after the answer, an
unrequested 101. What matters throughout: an answer is read exactly once, by the
request it belongs to, and a connection that might hold anything else is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway import errors
from gateway.model import UpstreamConfig
from gateway.proxy import Upstreams
from gateway.upstream_pool import UpstreamConnectError, UpstreamPool


@dataclass(frozen=True)
class Close:
    """An answer after which the upstream closes the connection."""

    data: bytes = b""


# (request number from 1, request head) -> what to write; None: close without a word.
Answer = Callable[[int, bytes], bytes | Close | None]


@dataclass
class RawUpstream:
    """Answers each request head with ``answer(n, head)``."""

    answer: Answer
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                data = self.answer(len(self.heads), head)
                if data is None:
                    break
                writer.write(data.data if isinstance(data, Close) else data)
                await writer.drain()
                if isinstance(data, Close):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close_idle_connections(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Answer], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> RawUpstream:
        upstream = RawUpstream(answer)
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        upstream.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return upstream

    yield start
    for server in servers:
        server.close()


def ok(body: bytes, *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        head.encode(),
        body,
    )


def make_pool(port: int, **overrides: float) -> UpstreamPool:
    settings: dict[str, float] = {
        "limit": 4,
        "connect_timeout_s": 2.0,
        "sock_connect_timeout_s": 1.0,
        "read_timeout_s": 2.0,
        "keepalive_timeout_s": 15.0,
        "read_bufsize": 65536,
    }
    settings.update(overrides)
    return UpstreamPool(
        "127.0.0.1",
        port,
        limit=int(settings["limit"]),
        connect_timeout_s=settings["connect_timeout_s"],
        sock_connect_timeout_s=settings["sock_connect_timeout_s"],
        read_timeout_s=settings["read_timeout_s"],
        keepalive_timeout_s=settings["keepalive_timeout_s"],
        read_bufsize=int(settings["read_bufsize"]),
    )


def request_headers() -> CIMultiDict[str]:
    return CIMultiDict({"Host": "upstream.test", "X-Auth-Subject": "alice"})


async def fetch(pool: UpstreamPool, path: str = "/", method: str = "GET") -> tuple[int, bytes]:
    response = await pool.request(method, path, request_headers())
    try:
        return response.message.code, await response.payload.read()
    finally:
        response.release()


async def test_connection_is_reused_and_the_head_is_exactly_what_was_given(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: ok(b"answer-%d" % n))
    pool = make_pool(upstream.port)

    assert await fetch(pool, "/a?x=1") == (200, b"answer-1")
    assert await fetch(pool, "/b") == (200, b"answer-2")

    assert upstream.connections == 1
    assert upstream.heads[0] == (
        b"GET /a?x=1 HTTP/1.1\r\nHost: upstream.test\r\nX-Auth-Subject: alice\r\n\r\n"
    )
    pool.close()


@pytest.mark.parametrize(
    "first_answer",
    [
        ok(b"one", "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\none",
        # Stray bytes after the answer: whatever they are, they are nobody's answer.
        ok(b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil",
        # No length: the body ends when the connection does.
        Close(b"HTTP/1.1 200 OK\r\n\r\none"),
    ],
    ids=["connection-close", "http-1.0", "stray-second-answer", "read-until-close"],
)
async def test_a_connection_that_may_hold_more_is_never_reused(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]], first_answer: bytes | Close
) -> None:
    upstream = await raw_upstream(lambda n, head: first_answer if n == 1 else ok(b"two"))
    pool = make_pool(upstream.port)

    assert await fetch(pool) == (200, b"one")
    assert await fetch(pool) == (200, b"two")

    assert upstream.connections == 2
    pool.close()


async def test_interim_answers_are_skipped(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n"
    upstream = await raw_upstream(lambda n, head: early + ok(b"final"))
    pool = make_pool(upstream.port)

    assert await fetch(pool) == (200, b"final")
    assert await fetch(pool) == (200, b"final")
    assert upstream.connections == 1
    pool.close()


async def test_head_gets_no_body_and_the_connection_stays_usable(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    def answer(n: int, head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
        return ok(b"body")

    upstream = await raw_upstream(answer)
    pool = make_pool(upstream.port)

    assert await fetch(pool, method="HEAD") == (200, b"")
    assert await fetch(pool) == (200, b"body")
    assert upstream.connections == 1
    pool.close()


async def test_an_idle_connection_the_upstream_closed_is_replaced_once(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: ok(b"answer-%d" % n))
    pool = make_pool(upstream.port)
    assert await fetch(pool) == (200, b"answer-1")

    # Closed by the upstream; the pool may not have noticed yet.
    upstream.close_idle_connections()
    assert await fetch(pool) == (200, b"answer-2")
    assert upstream.connections == 2
    pool.close()


async def test_a_kept_connection_that_breaks_is_retried_only_for_idempotent_methods(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    # The second request on the first connection gets no answer: the connection
    # closes, as when the upstream's keep-alive timer fires at the same moment.
    upstream = await raw_upstream(lambda n, head: ok(b"answer-%d" % n) if n != 2 else None)
    pool = make_pool(upstream.port)

    assert await fetch(pool) == (200, b"answer-1")
    assert await fetch(pool) == (200, b"answer-3")  # retried on a new connection
    assert upstream.connections == 2
    pool.close()


async def test_the_first_connection_breaking_is_not_retried(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: None)
    pool = make_pool(upstream.port)

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await fetch(pool)
    assert upstream.connections == 1
    pool.close()


async def test_no_upstream_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        pool = make_pool(port)
        with pytest.raises(UpstreamConnectError):
            await fetch(pool)
        pool.close()


async def test_a_silent_upstream_times_out_and_its_connection_is_dropped(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    # The first request never gets an answer.
    upstream = await raw_upstream(lambda n, head: ok(b"late") if n > 1 else b"")
    pool = make_pool(upstream.port, read_timeout_s=0.2)

    with pytest.raises(TimeoutError):
        await fetch(pool)
    assert await fetch(pool) == (200, b"late")
    assert upstream.connections == 2
    pool.close()


async def test_the_pool_limit_holds_and_a_freed_slot_is_passed_on(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: ok(b"answer"))
    pool = make_pool(upstream.port, limit=1, connect_timeout_s=0.3)

    held = await pool.request("GET", "/", request_headers())
    waiting = asyncio.create_task(fetch(pool))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # no second connection while the first is in use
    await held.payload.read()
    held.release()
    assert await waiting == (200, b"answer")

    held = await pool.request("GET", "/", request_headers())
    with pytest.raises(TimeoutError):  # never freed: the connect timeout answers
        await fetch(pool)
    held.release()
    assert await fetch(pool) == (200, b"answer")
    assert upstream.connections == 1
    pool.close()


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: ok(b"answer"))
    pool = make_pool(upstream.port, limit=1)
    headers = request_headers()
    headers["X-Auth-Email"] = "alice@example.com\r\nX-Auth-Level: admin"

    with pytest.raises(ValueError, match="control character"):
        await pool.request("GET", "/", headers)
    assert upstream.heads == []
    assert await fetch(pool) == (200, b"answer")  # the slot was given back
    pool.close()


async def test_abandoning_a_response_closes_its_connection(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: ok(b"x" * 200_000))
    pool = make_pool(upstream.port)

    response = await pool.request("GET", "/", request_headers())
    await response.payload.readany()  # some of the body, not all of it
    response.release()
    assert await fetch(pool) == (200, b"x" * 200_000)
    assert upstream.connections == 2
    pool.close()


async def test_cancelled_while_waiting_for_the_answer_frees_the_slot(
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    upstream = await raw_upstream(lambda n, head: b"" if n == 1 else ok(b"answer"))
    pool = make_pool(upstream.port, limit=1)

    waiting = asyncio.create_task(fetch(pool))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert await fetch(pool) == (200, b"answer")
    assert upstream.connections == 2  # the abandoned connection was not reused
    pool.close()


# -- through Upstreams.forward ---------------------------------------------------------


async def forward_once(
    aiohttp_raw_server: Callable[..., Awaitable[object]],
    upstream_url: str,
    path: str,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes, list[dict[str, object]]]:
    """GET ``path`` through Upstreams.forward (the pool), or POST ``body`` (ClientSession)."""
    upstreams = Upstreams(
        {"app": UpstreamConfig("app", upstream_url)}, connect_timeout_s=1.0, timeout_s=1.0
    )
    await upstreams.start()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await upstreams.forward(
                request,
                "app",
                path_qs=request.raw_path,
                headers=CIMultiDict({"Host": "upstream.test"}),
            )
        except errors.GatewayError as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)

    server = await aiohttp_raw_server(handle)
    try:
        with structlog.testing.capture_logs() as logs:
            async with (
                aiohttp.ClientSession() as http,
                http.request(
                    "GET" if body is None else "POST",
                    server.make_url(path),  # type: ignore[attr-defined]
                    data=body,
                ) as response,
            ):
                return response.status, dict(response.headers), await response.read(), logs
    finally:
        await upstreams.close()


@pytest.mark.parametrize(
    ("answer", "status", "reason"),
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            502,
            "upstream_bad_response",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            502,
            "upstream_failed",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            502,
            "upstream_failed",
        ),
        (b"garbage\r\n\r\n", 502, "upstream_failed"),
    ],
    ids=["unrequested-101", "two-lengths", "length-and-chunked", "not-http"],
)
@pytest.mark.parametrize("sent", [None, b"a body"], ids=["pooled-get", "client-session-post"])
async def test_invalid_answers_are_a_502(
    aiohttp_raw_server: Callable[..., Awaitable[object]],
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
    answer: bytes,
    status: int,
    reason: str,
    sent: bytes | None,
) -> None:
    upstream = await raw_upstream(lambda n, head: answer)
    got_status, _, body, logs = await forward_once(
        aiohttp_raw_server, f"http://127.0.0.1:{upstream.port}", "/x", sent
    )
    assert (got_status, body) == (status, b'{"error": "%s"}' % reason.encode())
    assert [entry["event"] for entry in logs] == [reason]


async def test_small_and_chunked_answers_arrive_whole(
    aiohttp_raw_server: Callable[..., Awaitable[object]],
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    upstream = await raw_upstream(
        lambda n, head: ok(b"small", "X-Kept: yes") if b"/small" in head else chunked
    )
    url = f"http://127.0.0.1:{upstream.port}"

    status, headers, body, _ = await forward_once(aiohttp_raw_server, url, "/small")
    assert (status, body, headers["X-Kept"], headers["Content-Length"]) == (
        200,
        b"small",
        "yes",
        "5",
    )
    status, headers, body, _ = await forward_once(aiohttp_raw_server, url, "/chunked")
    assert (status, body, headers["Transfer-Encoding"]) == (200, b"abcde", "chunked")


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["pooled", "client-session"])
async def test_an_upstream_base_path_prefixes_the_target_either_way(
    aiohttp_raw_server: Callable[..., Awaitable[object]],
    raw_upstream: Callable[[Answer], Awaitable[RawUpstream]],
    method: str,
) -> None:
    upstream = await raw_upstream(lambda n, head: ok(b"fine"))
    upstreams = Upstreams(
        {"app": UpstreamConfig("app", f"http://127.0.0.1:{upstream.port}/base/")},
        connect_timeout_s=1.0,
        timeout_s=1.0,
    )
    await upstreams.start()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return await upstreams.forward(
            request,
            "app",
            path_qs=request.raw_path,
            headers=CIMultiDict({"Host": "upstream.test"}),
        )

    server = await aiohttp_raw_server(handle)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method,
                server.make_url("/x/y?q=1"),  # type: ignore[attr-defined]
                data=None if method == "GET" else b"",
            ) as response,
        ):
            assert (response.status, await response.read()) == (200, b"fine")
    finally:
        await upstreams.close()
    assert upstream.heads[0].startswith(f"{method} /base/x/y?q=1 HTTP/1.1\r\n".encode())
