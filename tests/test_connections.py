"""Client connections against the real serving code (``run_gateway``: the listener,
limits, timeouts, drain) on loopback: slow clients, keep-alive limits, the connection
limit, SIGTERM's drain, and a busy Redis pool."""

from __future__ import annotations

import asyncio
import gc
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import load_config_text
from gateway.connections import ConnectionPolicy, body_deadline, close_reason
from gateway.server import GC_GEN0_THRESHOLD, run_gateway
from tests.conftest import CLIENT_SECRET, LEVELS_YAML, SESSION_SECRET, free_port
from tests.support.rawhttp import RawResponse, read_response, request_bytes
from tests.support.upstream import SEEN

RULES = """\
rules:
  - name: big-payments
    match: {path: /api/pay, methods: [POST]}
    when: "amount > 1000"
    require: {level: mfa}
  - name: payments
    match: {path: /api/pay, methods: [POST]}
    require: none
  - name: public
    match: {path: /public/**}
    require: none
  - name: signed-in
    match: {path: /app/**}
    require: {level: password}
"""


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    """An upstream that answers after ``?delay=`` seconds and keeps what it saw."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        request.app[SEEN].append(request.path)
        await asyncio.sleep(float(request.query.get("delay", "0")))
        return web.json_response({"path": request.path})

    app = web.Application()
    app[SEEN] = []
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


@dataclass
class Served:
    url: str
    port: int
    gateway: Gateway
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    def get(self, path: str, **headers: str) -> bytes:
        return request_bytes("GET", path, f"127.0.0.1:{self.port}", headers)


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(op: Any, upstream: Any) -> AsyncIterator[ServeFactory]:
    started: list[Served] = []

    async def start(server_extra: str = "", session_extra: str = "") -> Served:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        text = (
            f"server:\n  listen: 127.0.0.1:{port}\n  public_url: {url}\n"
            + textwrap.indent(server_extra, "  ")
            + textwrap.dedent(f"""\
            upstreams:
              app: {str(upstream.make_url("")).rstrip("/")}
            oidc:
              issuer: {op.issuer}
              client_id: gateway
              client_secret: {CLIENT_SECRET}
            session:
              secret: {SESSION_SECRET}
              cookie_secure: false
            """)
            + textwrap.indent(session_extra, "  ")
            + LEVELS_YAML
            + RULES
        )
        config = load_config_text(text, "test.yaml")
        op.clients["gateway"].redirect_uris.append(f"{url}/_gateway/callback")
        stop = asyncio.Event()
        ready: asyncio.Future[Gateway] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_gateway(config, stop, on_ready=ready.set_result))
        gateway = await asyncio.wait_for(ready, 15)
        served = Served(url, port, gateway, stop, task)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop.set()
        await asyncio.wait_for(served.task, 20)


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed in time."""
    return await asyncio.wait_for(reader.read(), timeout_s)


# -- pure decisions ---------------------------------------------------------------------

POLICY = ConnectionPolicy(keepalive_requests=100, keepalive_max_age_s=10.0)


@pytest.mark.parametrize(
    ("served", "age_s", "draining", "reason"),
    [
        (1, 0.0, False, None),
        (99, 9.9, False, None),
        (100, 0.0, False, "max_requests"),
        (1, 10.0, False, "max_age"),
        (1, 0.0, True, "draining"),
    ],
)
def test_close_reason(served: int, age_s: float, draining: bool, reason: str | None) -> None:
    assert close_reason(POLICY, served=served, age_s=age_s, draining=draining) == reason


@pytest.mark.parametrize(
    ("now", "received", "deadline"),
    [
        (0.0, 0, 20.0),  # the first byte: the whole timeout
        (5.0, 0, 20.0),  # nothing yet: no later than the first deadline
        (15.0, 10_000, 35.0),  # 20 s of credit earned by 10 kB: a 20 s wait at most
        (100.0, 1_000, 22.0),  # a trickle: the minimum rate ran out long ago
    ],
)
def test_body_deadline(now: float, received: int, deadline: float) -> None:
    assert body_deadline(started=0.0, now=now, received_bytes=received, timeout_s=20.0) == (
        deadline
    )


async def test_serving_collects_garbage_less_often_than_the_default(serve):
    saved = gc.get_threshold()
    gc.set_threshold(700, *saved[1:])  # CPython's default
    try:
        await serve()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *saved[1:])
    finally:
        gc.set_threshold(*saved)


# -- slow clients -------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_header_timeout(serve):
    served = await serve(server_extra="header_timeout: 1\n")
    reader, writer = await served.connect()
    started = time.monotonic()
    with capture_logs() as logs:
        assert await closed_within(reader, 5) == b""  # closed, nothing said
    assert 0.9 <= time.monotonic() - started < 5
    assert {"event": "client_timeout", "phase": "silent"}.items() <= logs[-1].items()
    writer.close()


async def test_trickled_header_lines_are_answered_408_and_closed(serve):
    served = await serve(server_extra="header_timeout: 1\n")
    reader, writer = await served.connect()
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def trickle() -> None:
        for i in range(50):
            await asyncio.sleep(0.2)
            writer.write(f"X-Slow-{i}: 1\r\n".encode())

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    answer = await closed_within(reader, 5)
    sender.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"Connection: close" in answer
    assert time.monotonic() - started < 3
    writer.close()


async def test_the_header_timeout_covers_the_next_request_on_a_kept_connection(serve):
    served = await serve(server_extra="header_timeout: 1\n")
    reader, writer = await served.connect()
    writer.write(served.get("/public/a"))
    assert (await read_response(reader)).status == 200
    writer.write(b"GET /public/b HTTP/1.1\r\n")  # ... and the rest never comes
    started = time.monotonic()
    assert (await closed_within(reader, 5)).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 3
    writer.close()


async def test_a_trickled_body_on_a_when_rule_is_answered_408(serve, upstream):
    served = await serve(server_extra="body_timeout: 1\n")
    reader, writer = await served.connect()
    body = b"amount=5&note=" + b"x" * 200
    head = request_bytes(
        "POST",
        "/api/pay",
        f"127.0.0.1:{served.port}",
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(len(body))},
    )
    writer.write(head + body[:10])

    async def trickle() -> None:
        for i in range(10, len(body)):
            await asyncio.sleep(0.1)
            writer.write(body[i : i + 1])

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    answer = await closed_within(reader, 6)
    sender.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request_body_timeout" in answer and b"Connection: close" in answer
    assert time.monotonic() - started < 4
    assert upstream.app[SEEN] == []  # nothing was forwarded
    writer.close()


async def test_a_streamed_body_trickled_to_the_upstream_is_cut(serve):
    served = await serve(server_extra="body_timeout: 1\n")
    reader, writer = await served.connect()
    head = request_bytes(
        "PUT",
        "/public/upload",
        f"127.0.0.1:{served.port}",
        {"Content-Type": "application/octet-stream", "Content-Length": "100000"},
    )
    writer.write(head + b"x" * 1000)

    async def trickle() -> None:
        for _ in range(200):
            await asyncio.sleep(0.1)
            writer.write(b"x")

    sender = asyncio.create_task(trickle())
    started = time.monotonic()
    await closed_within(reader, 8)
    sender.cancel()
    # 1 s + 1000 bytes' worth of credit (2 s) at 500 bytes/s, then cut.
    assert time.monotonic() - started < 6
    writer.close()


# -- keep-alive limits ----------------------------------------------------------------


async def test_keepalive_ends_after_keepalive_requests(serve):
    served = await serve(server_extra="keepalive_requests: 3\n")
    reader, writer = await served.connect()
    answers: list[RawResponse] = []
    for _ in range(3):
        writer.write(served.get("/public/x"))
        answers.append(await read_response(reader))
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.closes for a in answers] == [False, False, True]
    assert await closed_within(reader, 2) == b""
    writer.close()


async def test_keepalive_ends_after_keepalive_max_age(serve):
    served = await serve(server_extra="keepalive_max_age: 1\n")
    reader, writer = await served.connect()
    writer.write(served.get("/public/x"))
    assert not (await read_response(reader)).closes
    await asyncio.sleep(1.1)
    writer.write(served.get("/public/x"))
    last = await read_response(reader)
    assert last.status == 200 and last.closes
    assert await closed_within(reader, 2) == b""
    writer.close()


async def test_an_idle_kept_connection_is_closed_after_keepalive_timeout(serve):
    served = await serve(server_extra="keepalive_timeout: 1\n")
    reader, writer = await served.connect()
    writer.write(served.get("/public/x"))
    assert (await read_response(reader)).status == 200
    started = time.monotonic()
    assert await closed_within(reader, 5) == b""
    assert 0.9 <= time.monotonic() - started < 5
    writer.close()


# -- the connection limit ---------------------------------------------------------------


async def test_past_max_connections_a_new_connection_waits_for_room(serve):
    served = await serve(server_extra="max_connections: 2\n")
    held = [await served.connect() for _ in range(2)]
    for _, writer in held:
        writer.write(served.get("/public/busy?delay=1.5"))
    await asyncio.sleep(0.3)
    reader, writer = await served.connect()  # the kernel completes it: the backlog
    writer.write(served.get("/public/waiting"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read_response(reader), 0.7)
    assert served.gateway.accepting() == 0 and served.gateway.open_connections() == 2
    for held_reader, _ in held:
        assert (await read_response(held_reader)).status == 200  # the two it holds go on
    # Once they are idle, the one idle the longest makes room for the waiting one.
    answer = await asyncio.wait_for(read_response(reader), 5)
    assert answer.status == 200
    reads = [asyncio.ensure_future(held_reader.read()) for held_reader, _ in held]
    done, pending = await asyncio.wait(reads, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert [task.result() for task in done] == [b""]  # one of the two made room
    for task in pending:
        task.cancel()
    writer.close()
    for _, held_writer in held:
        held_writer.close()


async def test_at_max_connections_idle_keepalive_connections_make_room(serve):
    served = await serve(server_extra="max_connections: 2\n")
    held = [await served.connect() for _ in range(2)]
    for held_reader, held_writer in held:
        held_writer.write(served.get("/public/held"))
        assert (await read_response(held_reader)).status == 200
    await asyncio.sleep(1.2)  # both idle for longer than MIN_IDLE_TO_CLOSE_S
    reader, writer = await served.connect()
    writer.write(served.get("/public/new"))
    started = time.monotonic()
    assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    assert time.monotonic() - started < 1
    # The first connection (idle the longest) was closed between requests, no word said.
    assert await closed_within(held[0][0], 2) == b""
    held[1][1].write(served.get("/public/still-here"))
    assert (await read_response(held[1][0])).status == 200
    writer.close()
    for _, held_writer in held:
        held_writer.close()


async def metrics_text(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> str:
    reader, writer = connection
    writer.write(request_bytes("GET", "/_gateway/metrics", "127.0.0.1"))
    return (await read_response(reader)).body.decode()


# -- the drain on SIGTERM --------------------------------------------------------------


async def test_drain_answers_in_flight_and_pipelined_requests_with_connection_close(serve):
    served = await serve()
    # Two requests in one write (pipelined): both received before the drain starts.
    reader, writer = await served.connect()
    writer.write(served.get("/public/slow?delay=0.5") + served.get("/public/second"))
    # A busy keep-alive client: it sends its next request right after each answer.
    busy_reader, busy_writer = await served.connect()
    busy_writer.write(served.get("/public/x"))
    await read_response(busy_reader)
    idle_reader, idle_writer = await served.connect()
    await asyncio.sleep(0.2)  # the slow one is at the upstream
    served.stop.set()
    first, second = await read_response(reader), await read_response(reader)
    assert (first.status, second.status) == (200, 200)
    assert not first.closes and second.closes  # the last one received says close
    assert await closed_within(reader, 3) == b""
    # Its next request arrives within the grace: answered, with Connection: close.
    busy_writer.write(served.get("/public/next"))
    nxt = await read_response(busy_reader)
    assert nxt.status == 200 and nxt.closes
    # An idle connection is closed between requests, without a word.
    assert await closed_within(idle_reader, 3) == b""
    await asyncio.wait_for(served.task, 10)
    for w in (writer, busy_writer, idle_writer):
        w.close()


async def test_readyz_answers_503_while_draining(serve):
    served = await serve()
    reader, writer = await served.connect()
    writer.write(served.get("/_gateway/readyz"))
    assert (await read_response(reader)).status == 200
    served.stop.set()
    await asyncio.sleep(0.05)
    writer.write(served.get("/_gateway/readyz"))
    answer = await read_response(reader)
    assert answer.status == 503 and answer.closes
    assert b'"draining": true' in answer.body or b'"draining":true' in answer.body
    writer.close()
