"""Remembered forwards relayed before aiohttp parses the request (gateway.early_forward),
over real HTTP on loopback, against an upstream that answers with exact bytes.

The first request is decided and forwarded as usual, the second (the same bytes) is
relayed early; whatever the upstream answers, the client must get the same bytes
from both (but the gateway's own Date), whether the relay writes the answer or hands
it back to the usual path.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator

import pytest

from gateway import logs
from tests.conftest import Browser, Stack, StackFactory
from tests.test_decision_memo import connect, memo_stack, page_head
from tests.test_gateway import COOKIE
from tests.test_logs import restore_structlog  # noqa: F401 (a fixture)
from tests.test_metrics import sample

EARLY_HOW = ("auth", "relayed", "handed_over")

JSON = b'{"ok":true}'
OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(JSON),
    JSON,
)
BIG = b"x" * (70 * 1024)  # over the 64 KiB a relay writes whole


class CannedUpstream:
    """An HTTP/1.1 server on loopback answering each request with the exact bytes set
    for its path (keep-alive): a float part is a pause, ``None`` closes the
    connection there. It records each request head and each connection it closes."""

    def __init__(self) -> None:
        self.answers: dict[str, list[bytes | float | None]] = {}
        self.heads: list[bytes] = []
        self.closed = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                path = head.split(b" ")[1].decode().partition("?")[0]
                for part in self.answers.get(path, [OK_JSON]):
                    if part is None:
                        return
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                    else:
                        writer.write(part)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


@pytest.fixture
async def canned() -> AsyncIterator[CannedUpstream]:
    upstream = CannedUpstream()
    server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield upstream


async def canned_stack(
    make_stack: StackFactory, browser: Browser, canned: CannedUpstream, extra: str = ""
) -> tuple[Stack, str]:
    return await memo_stack(make_stack, browser, extra, upstream_url=canned.url)


def early_counts(stack: Stack) -> dict[str, float]:
    """stepup_answered_early_total, by how."""
    name = "stepup_answered_early_total"
    return {how: sample(stack.gateway.metrics, name, how=how) or 0.0 for how in EARLY_HOW}


async def read_until_quiet(reader: asyncio.StreamReader, quiet_s: float = 0.5) -> bytes:
    """Everything the gateway sends until it pauses for ``quiet_s`` or closes."""
    got = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 20), quiet_s)
        except TimeoutError:
            return got
        if not chunk:
            return got
        got += chunk


async def exchange(stack: Stack, head: bytes) -> bytes:
    """``head`` alone on a new connection; every byte of the answer."""
    reader, writer = await connect(stack)
    try:
        writer.write(head)
        return await read_until_quiet(reader)
    finally:
        writer.close()


def comparable(answer: bytes) -> bytes:
    """The answer but for what differs by the moment: the gateway's own Date, and the
    request id of an error answer."""
    answer = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", answer)
    return re.sub(rb"\r\nX-Request-Id: [^\r]*", b"\r\nX-Request-Id: -", answer)


async def usual_then_early(
    stack: Stack, cookie: str, path: str, method: str = "GET"
) -> tuple[bytes, bytes, dict[str, float]]:
    """The answers to the same bytes decided (the usual path) and then found early,
    and how the second was answered (the change in stepup_answered_early_total)."""
    head = page_head(stack, cookie, path)
    if method != "GET":
        head = head.replace(b"GET ", method.encode() + b" ", 1)
    usual = await exchange(stack, head)
    before = early_counts(stack)
    early = await exchange(stack, head)
    after = early_counts(stack)
    return usual, early, {how: after[how] - before.get(how, 0) for how in after}


def sent_headers(head: bytes) -> dict[str, list[str]]:
    """A request head as the upstream got it: its header values by name."""
    headers: dict[str, list[str]] = {}
    for line in head.decode().split("\r\n")[1:-2]:
        name, _, value = line.partition(": ")
        headers.setdefault(name.lower(), []).append(value)
    return headers


def sent_upstream(canned: CannedUpstream, method: str, path: str) -> int:
    return sum(head.startswith(f"{method} {path} ".encode()) for head in canned.heads)


WHOLE_ANSWERS = {
    "json": OK_JSON,
    "no-content-type": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "empty": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "own-date-and-server": (
        b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nServer: app/1.0\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    ),
    "no-reason": b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nhi",
    "404-own-reason": b"HTTP/1.1 404 Nope\r\nContent-Length: 4\r\n\r\ngone",
    "hop-by-hop-and-cookies": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
        b"X-Secret: hop\r\nSet-Cookie: %s=forged; Path=/\r\n"
        b"Set-Cookie: app=1; Path=/\r\nContent-Length: 2\r\n\r\nhi" % COOKIE.encode()
    ),
    "body-after-a-pause": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 0.2, b"later"],
}


@pytest.mark.parametrize("name", sorted(WHOLE_ANSWERS))
async def test_a_relayed_answer_is_the_one_the_usual_path_writes(
    make_stack, browser, canned, name
) -> None:
    answer = WHOLE_ANSWERS[name]
    canned.answers[f"/app/{name}"] = answer if isinstance(answer, list) else [answer]
    stack, cookie = await canned_stack(make_stack, browser, canned)
    usual, early, how = await usual_then_early(stack, cookie, f"/app/{name}")
    assert how == {"auth": 0, "relayed": 1, "handed_over": 0}
    assert comparable(early) == comparable(usual)
    assert early.startswith(b"HTTP/1.1 ") and b"\r\nDate: " in early
    assert b"X-Secret" not in early and b"forged" not in early and b"Keep-Alive" not in early
    # The upstream got the same request twice, each with a request id of its own.
    first, second = (sent_headers(head) for head in canned.heads[-2:])
    assert first.pop("x-request-id") != second.pop("x-request-id")
    assert first == second and "x-auth-assertion" in first


HANDED_OVER: dict[str, tuple[str, list[bytes | float | None]]] = {
    "chunked": (
        "GET",
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
    ),
    "large": ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BIG), BIG)]),
    "no-content": ("GET", [b"HTTP/1.1 204 No Content\r\n\r\n"]),
    "not-modified": ("GET", [b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\n\r\n']),
    "head": ("HEAD", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]),
    "control-character": (
        "GET",
        [b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 0\r\n\r\n"],
    ),
    "closed-without-answer": ("GET", [None]),
    "body-cut-short": ("GET", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", None]),
}


@pytest.mark.parametrize("name", sorted(HANDED_OVER))
async def test_what_a_relay_does_not_write_is_answered_as_usual(
    make_stack, browser, canned, name
) -> None:
    """Streamed and large bodies, answers without a body, a head the client may not
    get, an upstream that fails: handed to the usual path, with the same outcome."""
    method, answer = HANDED_OVER[name]
    canned.answers[f"/app/{name}"] = answer
    stack, cookie = await canned_stack(make_stack, browser, canned)
    path = f"/app/{name}"
    head = page_head(stack, cookie, path).replace(b"GET ", f"{method} ".encode(), 1)
    answers, sent = [], []
    for _ in range(2):  # decided, then found early
        # Each on a kept upstream connection (a failure there is tried once more).
        await exchange(stack, page_head(stack, cookie, "/app/warm"))
        before = sent_upstream(canned, method, path), early_counts(stack)
        answers.append(await exchange(stack, head))
        sent.append(sent_upstream(canned, method, path) - before[0])
    assert early_counts(stack)["handed_over"] == before[1].get("handed_over", 0) + 1
    assert early_counts(stack)["relayed"] == before[1].get("relayed", 0)
    usual, early = answers
    assert comparable(early) == comparable(usual)
    assert sent[0] == sent[1]  # the usual path does not send a handed-over request again


async def test_a_request_pipelined_behind_a_relay_is_answered_after_it(
    make_stack, browser, canned
) -> None:
    canned.answers["/app/slow"] = [0.3, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"]
    canned.answers["/app/fast"] = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfast"]
    stack, cookie = await canned_stack(make_stack, browser, canned)
    slow = page_head(stack, cookie, "/app/slow")
    await exchange(stack, slow)  # decided and remembered
    reader, writer = await connect(stack)
    try:
        writer.write(slow)  # relayed early: the upstream takes 0.3 s
        await asyncio.sleep(0.1)
        writer.write(page_head(stack, cookie, "/app/fast") + page_head(stack, cookie, "/app/x"))
        answers = await read_until_quiet(reader, 1.0)
    finally:
        writer.close()
    assert early_counts(stack)["relayed"] == 1
    bodies = re.findall(rb"\r\n\r\n(slow|fast|\{\"ok\":true\})", answers)
    assert bodies == [b"slow", b"fast", JSON]


async def test_a_relay_whose_client_left_drops_its_upstream_connection(
    make_stack, browser, canned
) -> None:
    canned.answers["/app/slow"] = [0.5, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"]
    stack, cookie = await canned_stack(make_stack, browser, canned)
    slow = page_head(stack, cookie, "/app/slow")
    await exchange(stack, slow)
    closed = canned.closed
    _, writer = await connect(stack)
    writer.write(slow)
    await asyncio.sleep(0.1)
    writer.close()  # gone before the upstream answers
    await asyncio.sleep(0.8)
    assert canned.closed == closed + 1  # not kept for reuse half-read
    assert early_counts(stack)["relayed"] == 0
    assert b"\r\n\r\n" + JSON in await exchange(stack, page_head(stack, cookie, "/app/x"))


async def test_the_last_answer_of_a_connection_closes_it(make_stack, browser, canned) -> None:
    """``keepalive_requests``: the answer that ends keep-alive is aiohttp's, with
    Connection: close, from the remembered forward."""
    stack, cookie = await canned_stack(make_stack, browser, canned, "keepalive_requests: 3\n")
    head = page_head(stack, cookie, "/app/three")
    reader, writer = await connect(stack)
    answers: list[bytes] = []
    try:
        for _ in range(3):
            writer.write(head)
            answers.append(await read_until_quiet(reader, 0.3))
        assert await reader.read() == b""  # closed
    finally:
        writer.close()
    assert [a.split(b"\r\n")[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert [b"Connection: close" in a for a in answers] == [False, False, True]
    assert early_counts(stack)["relayed"] == 1  # the second; the third went the usual way
    sent = [h for h in canned.heads if h.startswith(b"GET /app/three ")]
    assert len(sent) == 3 and all(b"X-Auth-Assertion: " in h for h in sent)


@pytest.mark.usefixtures("restore_structlog")
async def test_a_relayed_request_is_logged_as_the_usual_one(make_stack, browser, canned) -> None:
    """The same access line, with the request id the upstream got."""
    stack, cookie = await canned_stack(make_stack, browser, canned)
    stream = io.StringIO()
    logs.configure("info", stream)
    _, _, how = await usual_then_early(stack, cookie, "/app/logged")
    assert how["relayed"] == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    usual, early = [line for line in lines if line.get("path") == "/app/logged"]
    [sent_id] = sent_headers(canned.heads[-1])["x-request-id"]
    assert early["request_id"] == sent_id != usual["request_id"]
    varying = ("timestamp", "duration_ms", "request_id")
    usual, early = ({k: v for k, v in line.items() if k not in varying} for line in (usual, early))
    assert early == usual == {**usual, "event": "request", "status": 200, "rule": "signed-in"}


async def test_a_connection_that_must_close_during_a_relay_closes_after_its_answer(
    make_stack, browser, canned
) -> None:
    """``keepalive_max_age`` passed while the upstream answered: the relayed answer says
    Connection: close, arrives whole, and the connection closes after it."""
    body = b"y" * 1000
    canned.answers["/app/aging"] = [0.8, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body]
    stack, cookie = await canned_stack(make_stack, browser, canned, "keepalive_max_age: 0.5\n")
    head = page_head(stack, cookie, "/app/aging")
    await exchange(stack, head)  # decided and remembered
    closed = closes_for_max_age(stack)
    reader, writer = await connect(stack)
    try:
        writer.write(head)  # relayed at once, answered after the connection's max age
        answer = await asyncio.wait_for(reader.read(), 5)  # until it closes
    finally:
        writer.close()
    assert early_counts(stack)["relayed"] == 1
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + body)
    assert b"\r\nConnection: close\r\n" in answer
    assert closes_for_max_age(stack) == closed + 1


def closes_for_max_age(stack: Stack) -> float:
    return sample(stack.gateway.metrics, "stepup_connections_closed_total", reason="max_age") or 0.0


async def test_a_drain_lets_a_relay_finish_and_closes_after_it(make_stack, browser, canned) -> None:
    """SIGTERM's drain closes idle connections after a grace of a second; one whose
    relay is still waiting for the upstream is busy, answered (Connection: close)."""
    canned.answers["/app/slow"] = [1.5, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"]
    stack, cookie = await canned_stack(make_stack, browser, canned)
    head = page_head(stack, cookie, "/app/slow")
    await exchange(stack, head)  # decided and remembered
    reader, writer = await connect(stack)
    try:
        writer.write(head)
        await asyncio.sleep(0.2)
        assert stack.gateway.server is not None
        drained = asyncio.create_task(stack.gateway.server.drain(5))
        answer = await asyncio.wait_for(reader.read(), 5)  # until it closes
    finally:
        writer.close()
    assert early_counts(stack)["relayed"] == 1
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nslow")
    assert b"\r\nConnection: close\r\n" in answer
    assert await drained == 0  # none had to be forced


async def test_a_request_held_behind_a_slow_relay_is_not_a_slow_head(
    make_stack, browser, canned
) -> None:
    """``header_timeout`` bounds how long a head takes to arrive, not how long it
    waits, whole, behind an answer the upstream is slow to give."""
    canned.answers["/app/slow"] = [1.5, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"]
    stack, cookie = await canned_stack(make_stack, browser, canned, "header_timeout: 0.5\n")
    slow = page_head(stack, cookie, "/app/slow")
    await exchange(stack, slow)  # decided and remembered
    reader, writer = await connect(stack)
    try:
        writer.write(slow)  # relayed early
        await asyncio.sleep(0.1)
        writer.write(page_head(stack, cookie, "/app/x"))  # whole, held behind it
        answers = await read_until_quiet(reader, 2.5)
    finally:
        writer.close()
    assert early_counts(stack)["relayed"] == 1
    assert re.findall(rb"HTTP/1.1 (\d+)", answers) == [b"200", b"200"]
    assert answers.endswith(b"\r\n\r\n" + JSON)
