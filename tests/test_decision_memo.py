"""Remembered decisions (gateway.decision_memo), over real HTTP on loopback: the proxy's
and ``/auth``'s, what ends them (max_age, sign-out, reload, the cap), what is never
remembered (one-time proofs), and the bound on their number."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import aiohttp
import jwt
from multidict import CIMultiDict

from gateway import decision_memo
from gateway.config import load_config_text
from tests.conftest import Browser, Stack, StackFactory
from tests.support.upstream import header_values
from tests.test_gateway import COOKIE, PHR_USER, sign_in
from tests.test_transactional import RULES as ONCE_RULES
from tests.test_transactional import finish_round_trip

FORWARD_AUTH = "mode: both\ntrusted_proxies: {trusted}\n"
FRESH_RULES = """\
rules:
  - name: fresh
    match: {path: /fresh/**}
    require: {level: password, max_age: 30s}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""


def memo_counts(stack: Stack) -> dict[str, float]:
    text = stack.gateway.metrics.render().decode()
    found = re.findall(r'stepup_decision_memo_total\{result="(\w+)"\} ([0-9.e+]+)', text)
    return {result: float(value) for result, value in found}


async def memo_stack(
    make_stack: StackFactory,
    browser: Browser,
    extra: str = "",
    trusted: str = "[127.0.0.1/32]",
    **kw: Any,
):
    stack = await make_stack(server_extra=FORWARD_AUTH.format(trusted=trusted) + extra, **kw)
    await sign_in(stack, browser)
    return stack, browser.cookie(COOKIE) or ""


async def auth(
    stack: Stack, cookie: str, path: str = "/app/x", method: str = "GET", **headers: str
) -> aiohttp.ClientResponse:
    """``/auth`` as nginx asks it; the answer (read) with its raw headers."""
    sent = {
        "Cookie": f"{COOKIE}={cookie}",
        "X-Original-Method": method,
        "X-Original-URL": f"{stack.url}{path}",
        **{name.replace("_", "-"): value for name, value in headers.items()},
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.url}/_gateway/auth", headers=sent, allow_redirects=False) as resp,
    ):
        await resp.read()
        return resp


def without_date(resp: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in resp.raw_headers if name.lower() != b"date"]


async def test_a_remembered_auth_answer_is_the_one_decided(make_stack, browser) -> None:
    stack, cookie = await memo_stack(make_stack, browser)
    first = await auth(stack, cookie, X_Request_Id="req-1")
    assert memo_counts(stack).get("hit", 0) == 0
    second = await auth(stack, cookie, X_Request_Id="req-1")
    assert memo_counts(stack)["hit"] == 1  # answered from memory, before aiohttp
    assert first.status == second.status == 200
    assert without_date(first) == without_date(second)
    assert CIMultiDict(second.headers)["X-Auth-Rule"] == "signed-in"
    # A fresh request id for a request that brings none, as aiohttp's path makes.
    third, fourth = await auth(stack, cookie), await auth(stack, cookie)
    assert third.headers["X-Request-Id"] != fourth.headers["X-Request-Id"]
    assert memo_counts(stack)["hit"] == 2  # the third was another request: decided
    assert [n for n, _ in without_date(third)] == [n for n, _ in without_date(first)]


async def test_the_proxy_forwards_a_remembered_allow_as_decided(make_stack, browser) -> None:
    stack, _ = await memo_stack(make_stack, browser)
    for _ in range(2):
        assert (await browser.get(f"{stack.url}/app/x")).status == 200
    assert memo_counts(stack)["hit"] >= 1
    first, second = stack.seen[-2:]
    names = ("X-Auth-Subject", "X-Auth-Level", "X-Auth-Rule", "X-Auth-Assertion")
    assert [header_values(first, n) for n in names] == [header_values(second, n) for n in names]
    assert header_values(second, "X-Auth-Assertion")


async def test_max_age_ends_a_remembered_answer(make_stack, browser, clock) -> None:
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 1m\n", rules=FRESH_RULES)
    signed_in = int((await auth(stack, cookie, "/fresh/a")).headers["X-Auth-Time"])
    clock.now = signed_in + 28  # within max_age (30 s) of the proof
    for _ in range(2):  # decided, then remembered
        assert (await auth(stack, cookie, "/fresh/a")).status == 200
        assert (await browser.get(f"{stack.url}/fresh/a")).status == 200
    hits = memo_counts(stack)["hit"]
    assert hits >= 2
    clock.now = signed_in + 31.5  # past max_age: within the 1 m cap, but stale
    assert (await auth(stack, cookie, "/fresh/a")).status == 401
    assert (await browser.get(f"{stack.url}/fresh/a")).status == 302  # a step-up
    assert memo_counts(stack)["hit"] == hits


async def test_a_sign_out_here_forgets_at_once(make_stack, browser) -> None:
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 1h\n")
    assert (await auth(stack, cookie)).status == 200
    assert (await auth(stack, cookie)).status == 200
    async with aiohttp.ClientSession() as http:
        assert (await with_cookie(http, stack, cookie)) == 200
        assert (await with_cookie(http, stack, cookie)) == 200
    assert len(stack.gateway.decisions.exact) >= 1  # forwarded as prepared the second time
    async with browser.http.post(
        f"{stack.url}/_gateway/logout", headers={"Origin": stack.url}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    # The saved cookie is revoked (cookie store): no remembered Allow survives it.
    assert (await auth(stack, cookie)).status == 401
    async with aiohttp.ClientSession() as http:
        assert (await with_cookie(http, stack, cookie)) == 401


async def with_cookie(http: aiohttp.ClientSession, stack: Stack, cookie: str) -> int:
    headers = {"Cookie": f"{COOKIE}={cookie}", "Accept": "application/json"}
    async with http.get(f"{stack.url}/app/x", headers=headers, allow_redirects=False) as resp:
        return resp.status


async def test_a_reload_decides_again(make_stack, browser) -> None:
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 1h\n")
    assert (await auth(stack, cookie)).status == 200
    assert (await auth(stack, cookie)).status == 200
    stricter = stack.config_text.replace(
        "match: {path: /app/**}\n    require: {level: password}",
        "match: {path: /app/**}\n    require: {level: mfa}",
    )
    assert stricter != stack.config_text
    await stack.gateway.reload(load_config_text(stricter, "reloaded.yaml"))
    assert (await auth(stack, cookie)).status == 401
    async with aiohttp.ClientSession() as http:
        assert (await with_cookie(http, stack, cookie)) == 401


async def test_a_one_time_proof_is_never_remembered(make_stack, browser) -> None:
    stack, cookie = await memo_stack(make_stack, browser, rules=ONCE_RULES)
    stack.op.behaviour.user = PHR_USER
    hop = await browser.get(f"{stack.url}/_gateway/step-up?level=phishing-resistant&rd=/")
    await finish_round_trip(browser, hop)
    cookie = browser.cookie(COOKIE) or ""
    assert (await auth(stack, cookie, "/api/delete-tenant", "POST")).status == 200
    assert (await auth(stack, cookie, "/api/delete-tenant", "POST")).status == 401
    assert memo_counts(stack).get("hit", 0) == 0


async def test_the_memo_holds_at_most_its_entries(make_stack, browser) -> None:
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo_entries: 2\n")
    for path in ("/app/a", "/app/b", "/app/c"):
        assert (await auth(stack, cookie, path)).status == 200
    assert len(stack.gateway.decisions.auth) == 2
    assert (await auth(stack, cookie, "/app/c")).status == 200
    assert memo_counts(stack)["hit"] == 1
    assert (await auth(stack, cookie, "/app/a")).status == 200  # dropped first: decided again
    assert memo_counts(stack)["hit"] == 1


async def test_the_memo_holds_at_most_its_bytes(make_stack, browser, monkeypatch) -> None:
    """A signed-in client chooses the headers nginx passes to /auth, so the size of the
    keys: bounded in bytes too, least recently used dropped first."""
    monkeypatch.setattr(decision_memo, "MEMO_BYTES", 64 * 1024)
    stack, cookie = await memo_stack(make_stack, browser)
    for n in range(4):
        assert (await auth(stack, cookie, X_Junk=f"{n}" * 12_000)).status == 200
    held = len(stack.gateway.decisions.auth)
    assert 1 <= held < 4
    assert (await auth(stack, cookie, X_Junk="3" * 12_000)).status == 200
    assert memo_counts(stack)["hit"] == 1  # the newest stayed
    assert (await auth(stack, cookie, X_Junk="0" * 12_000)).status == 200
    assert memo_counts(stack)["hit"] == 1  # the oldest went: decided again


async def test_zero_remembers_nothing(make_stack, browser) -> None:
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 0\n")
    for _ in range(3):
        assert (await auth(stack, cookie)).status == 200
        assert (await browser.get(f"{stack.url}/app/x")).status == 200
    assert memo_counts(stack).get("hit", 0) == 0
    assert len(stack.gateway.decisions.auth) == len(stack.gateway.decisions.proxied) == 0


async def test_pipelined_requests_are_answered_in_order(make_stack, browser) -> None:
    """Remembered answers go out before aiohttp sees the request: on one connection,
    a remembered one, one it must decide, and a remembered one again, sent at once."""
    stack, cookie = await memo_stack(make_stack, browser)
    assert (await auth(stack, cookie)).status == 200  # remembered from here on
    host, port = stack.url.split("//")[1].split(":")

    def head(target: str, request_id: str) -> bytes:
        return (
            f"GET /_gateway/auth HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Cookie: {COOKIE}={cookie}\r\nX-Original-Method: GET\r\n"
            f"X-Original-URL: {stack.url}{target}\r\nX-Request-Id: {request_id}\r\n\r\n"
        ).encode()

    reader, writer = await connect(stack)
    try:
        writer.write(head("/app/x", "one") + head("/public/y", "two") + head("/app/x", "three"))
        await writer.drain()
        seen = []
        for _ in range(3):
            status = await reader.readline()
            lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            ids = [line.split(": ")[1] for line in lines if line.startswith("X-Request-Id")]
            seen.append((status.split()[1], ids[0]))
    finally:
        writer.close()
    assert seen == [(b"200", "one"), (b"200", "two"), (b"200", "three")]


def auth_head(stack: Stack, cookie: str, target: str = "/app/x") -> bytes:
    """``/auth`` as nginx asks it, as bytes on the wire."""
    host = stack.url.split("//")[1]
    return (
        f"GET /_gateway/auth HTTP/1.1\r\nHost: {host}\r\nCookie: {COOKIE}={cookie}\r\n"
        f"X-Original-Method: GET\r\nX-Original-URL: {stack.url}{target}\r\n\r\n"
    ).encode()


async def read_answers(reader: asyncio.StreamReader) -> list[tuple[bytes, bytes]]:
    """Every answer on the connection until it is quiet: (status, head)."""
    answers = []
    while True:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        except (TimeoutError, asyncio.IncompleteReadError):
            return answers
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
        answers.append((head.split(b" ")[1], head))


async def connect(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection to the gateway."""
    host, port = stack.url.split("//")[1].split(":")
    return await asyncio.open_connection(host, int(port))


async def send_in_parts(stack: Stack, *parts: bytes) -> list[tuple[bytes, bytes]]:
    """``parts`` written one by one on one connection, each read by the gateway alone."""
    reader, writer = await connect(stack)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.1)
        return await read_answers(reader)
    finally:
        writer.close()


async def test_only_the_same_bytes_alone_are_answered_from_memory(make_stack, browser) -> None:
    """A remembered answer is found by the request's exact bytes, read alone; the same
    request split over two reads, or two of them in one read, is parsed and decided."""
    stack, cookie = await memo_stack(make_stack, browser)
    head = auth_head(stack, cookie)
    assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    assert memo_counts(stack).get("hit", 0) == 0
    assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    assert memo_counts(stack)["hit"] == 1
    split = await send_in_parts(stack, head[:40], head[40:])
    pipelined = await send_in_parts(stack, head + head)
    assert [status for status, _ in split + pipelined] == [b"200"] * 3
    assert memo_counts(stack)["hit"] == 1  # each decided again, and the same
    names = [re.findall(rb"\r\n([\w-]+):", h) for _, h in split + pipelined]
    assert names[0] == names[1] == names[2]


async def remembered_auth(
    make_stack: StackFactory, browser: Browser
) -> tuple[Stack, str, bytes, float]:
    """A signed-in stack whose ``/auth`` answer to ``head`` is remembered: (stack, the
    session cookie, head, the memo's hits so far)."""
    stack, cookie = await memo_stack(make_stack, browser)
    head = auth_head(stack, cookie)
    for _ in range(2):
        await send_in_parts(stack, head)
    return stack, cookie, head, memo_counts(stack)["hit"]


def header_lines(headers: dict[str, str]) -> str:
    """Header lines from keyword arguments: ``Content_Type`` is ``Content-Type``."""
    return "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())


def post_head(stack: Stack, path: str, length: int, **headers: str) -> bytes:
    """The head of a POST of ``length`` bytes, as bytes on the wire."""
    host = stack.url.split("//")[1]
    extra = header_lines(headers)
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {length}\r\n\r\n".encode()
    )


async def test_a_body_spelling_a_remembered_request_is_a_body(make_stack, browser) -> None:
    """A request whose body is the bytes of a remembered ``/auth`` request, sent after
    its head: the body goes to the app with the request; no second answer comes."""
    stack, cookie, head, hits = await remembered_auth(make_stack, browser)
    post = post_head(
        stack, "/public/form", len(head), Cookie=f"{COOKIE}={cookie}", Content_Type="text/plain"
    )
    answers = await send_in_parts(stack, post, head)
    assert [status for status, _ in answers] == [b"200"]  # the app's, and only one
    assert b"X-Auth-Rule" not in answers[0][1]
    assert stack.seen[-1]["body_sha256"] == hashlib.sha256(head).hexdigest()
    assert memo_counts(stack)["hit"] == hits


async def test_a_body_left_unread_is_not_taken_for_a_request(make_stack, browser) -> None:
    """The same when the gateway answers before reading the body (an unknown path of
    its own): the rest of that body, read after the answer, is still that body."""
    stack, _, head, hits = await remembered_auth(make_stack, browser)
    post = post_head(stack, "/_gateway/no-such-endpoint", len(head) + 2)
    answers = await send_in_parts(stack, post + b"ab", head)
    assert [status for status, _ in answers] == [b"404"]
    assert memo_counts(stack)["hit"] == hits


# -- the proxy's remembered forwards: the same bytes, forwarded as prepared ----------------


def page_head(stack: Stack, cookie: str, path: str = "/app/page", **headers: str) -> bytes:
    """A browser's GET through the proxy, as bytes on the wire."""
    host = stack.url.split("//")[1]
    extra = header_lines(headers)
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {COOKIE}={cookie}\r\n"
        f"Accept: text/html\r\n{extra}\r\n"
    ).encode()


def without_request_id(record: dict[str, Any]) -> list[list[str]]:
    return [pair for pair in record["headers"] if pair[0].lower() != "x-request-id"]


async def test_the_same_bytes_are_forwarded_as_they_were_decided(make_stack, browser) -> None:
    """A request whose exact bytes were decided and forwarded a moment ago is sent
    upstream as prepared then: the same headers (assurance, assertion, forwarding), a
    request id of its own, counted and logged as allowed."""
    stack, cookie = await memo_stack(make_stack, browser)
    head = page_head(stack, cookie, X_Forwarded_For="203.0.113.9")
    before, entries = memo_counts(stack).get("hit", 0), len(stack.gateway.decisions.exact)
    for _ in range(3):
        assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    assert len(stack.gateway.decisions.exact) == entries + 1
    assert memo_counts(stack)["hit"] == before + 2  # the second and third
    first, second, third = stack.seen[-3:]
    assert without_request_id(first) == without_request_id(second) == without_request_id(third)
    ids = {header_values(record, "X-Request-Id")[0] for record in (first, second, third)}
    assert len(ids) == 3
    assert header_values(third, "X-Auth-Rule") == ["signed-in"]
    assert header_values(third, "X-Auth-Assertion")
    text = stack.gateway.metrics.render().decode()
    assert 'stepup_requests_total{decision="allow",rule="signed-in"}' in text


async def test_a_prepared_forward_is_the_peers_own(make_stack, browser) -> None:
    """The same bytes from another peer (here the unix socket, a trusted proxy, after
    TCP loopback, which is not) are decided for that peer: X-Forwarded-For differs."""
    from tests.test_forward_auth import socket_dir

    with socket_dir() as directory:
        path = f"{directory}/gateway.sock"
        stack, cookie = await memo_stack(
            make_stack, browser, f"unix_socket: {path}\n", trusted="[unix]"
        )
        head = page_head(stack, cookie, "/app/peer", X_Forwarded_For="203.0.113.9")
        for _ in range(2):
            assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
            assert header_values(stack.seen[-1], "X-Forwarded-For") == ["127.0.0.1"]
        for _ in range(2):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(head)
                assert [status for status, _ in await read_answers(reader)] == [b"200"]
            finally:
                writer.close()
            assert header_values(stack.seen[-1], "X-Forwarded-For") == ["203.0.113.9, _unix"]


async def test_max_age_ends_a_prepared_forward(make_stack, browser, clock) -> None:
    rules = FRESH_RULES.replace("max_age: 30s", "max_age: 45s")
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 1m\n", rules=rules)
    head = page_head(stack, cookie, "/fresh/page")
    signed_in = int((await auth(stack, cookie, "/fresh/a")).headers["X-Auth-Time"])
    # Past the first assertion's reuse (30 s of its 60), within max_age (45 s): the
    # assertion signed now may be reused beyond the end of max_age.
    clock.now = signed_in + 32
    entries = len(stack.gateway.decisions.exact)
    for _ in range(2):  # decided, then forwarded as prepared
        assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    assert len(stack.gateway.decisions.exact) == entries + 1
    clock.now = signed_in + 46  # past max_age: within the cap and the assertion's reuse
    assert [status for status, _ in await send_in_parts(stack, head)] == [b"302"]


async def test_a_prepared_forward_ends_when_the_session_must_be_saved(
    make_stack, browser, clock
) -> None:
    """The idle timer is written back (a Set-Cookie) by a request decided as usual."""
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 1h\n")
    head = page_head(stack, cookie)
    entries = len(stack.gateway.decisions.exact)
    for _ in range(2):
        [(status, answer)] = await send_in_parts(stack, head)
        assert status == b"200" and b"Set-Cookie" not in answer
    assert len(stack.gateway.decisions.exact) == entries + 1
    clock.now += decision_memo.TOUCH_INTERVAL_S + 1
    [(status, answer)] = await send_in_parts(stack, head)
    assert status == b"200" and b"\r\nSet-Cookie: " in answer


async def test_a_prepared_forward_is_signed_again_when_its_assertion_is_due(
    make_stack, browser, clock
) -> None:
    """The assertion is sent as long as the signer would reuse it (half its 60 s), then
    the request is decided again and the app gets a new one."""
    stack, cookie = await memo_stack(make_stack, browser, "decision_memo: 1m\n")
    head = page_head(stack, cookie, "/app/signed")
    for _ in range(2):
        assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    first, second = (header_values(r, "X-Auth-Assertion")[0] for r in stack.seen[-2:])
    assert first == second
    clock.now += 31
    assert [status for status, _ in await send_in_parts(stack, head)] == [b"200"]
    third = header_values(stack.seen[-1], "X-Auth-Assertion")[0]
    assert third != first
    assert jwt.decode(third, options={"verify_signature": False})["iat"] >= int(clock.now)
