"""The proxy over real loopback HTTP: client -> a small gateway app -> an echo upstream.

The gateway app here is the least that uses ``gateway.headers`` and
``gateway.proxy`` the way ``gateway.app`` does: check framing, build the upstream
headers, add an assurance header of its own, forward. The echo upstream answers
with what it received, so each test asserts on what crossed each hop.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import errors, headers
from gateway.model import UpstreamConfig
from gateway.proxy import Upstreams

PREFIX = "X-Auth-"
GATEWAY_ACR = "urn:gateway:acr"
GATEWAY_COOKIES = frozenset({"stepup_session", "__Host-stepup_session"})
GATEWAY_COOKIE_PREFIXES = ("stepup_tx_", "__Host-stepup_tx_")
MiB = 1024 * 1024
GiB = 1024 * MiB


# --------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    server: TestServer
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    ws_closes: list[int | None] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)
    head_seen: asyncio.Event = field(default_factory=asyncio.Event)
    body_errors: list[str] = field(default_factory=list)
    body_failed: asyncio.Event = field(default_factory=asyncio.Event)
    stream_stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


def vm_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def upstream_app(up: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            length += len(chunk)
        record = {
            "method": request.method,
            "path_qs": request.raw_path,
            "version": list(request.version),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
        }
        up.requests.append(record)
        return web.json_response(record)

    async def count(request: web.Request) -> web.Response:
        length = 0
        next_sample = 0
        while chunk := await request.content.readany():
            length += len(chunk)
            if length >= next_sample:
                up.rss_samples.append(vm_rss_bytes())
                next_sample += 16 * MiB
        up.rss_samples.append(vm_rss_bytes())
        up.requests.append({"method": request.method, "path_qs": request.raw_path})
        return web.json_response({"body_length": length})

    async def watch(request: web.Request) -> web.Response:
        up.head_seen.set()
        try:
            body = await request.read()
        except (Exception, asyncio.CancelledError) as exc:
            # A lost connection cancels the handler (the test server's
            # handler_cancellation) or fails the read; either way it was cut off.
            up.body_errors.append(type(exc).__name__)
            up.body_failed.set()
            raise
        up.requests.append({"method": request.method, "body_length": len(body)})
        return web.json_response({"body_length": len(body)})

    async def many_bytes(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        block = b"\xab" * (256 * 1024)
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        sent = 0
        while sent < size:
            piece = block[: size - sent]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="cookies")
        for value in (
            "a=1; Path=/",
            "b=2; Path=/; HttpOnly",
            "c=3; Path=/; Secure",
            "__Host-stepup_session=forged; Path=/; Secure",
        ):
            response.headers.add("Set-Cookie", value)
        return response

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        up.requests.append({"method": request.method, "path_qs": request.raw_path})
        return web.Response(status=code, headers={"ETag": '"v1"', "X-Kept": "yes"})

    async def reason(request: web.Request) -> web.Response:
        return web.Response(status=299, reason="Fine Thanks", text="ok")

    async def slow(request: web.Request) -> web.Response:
        up.requests.append({"method": request.method, "path_qs": request.raw_path})
        await up.release.wait()  # released at teardown; the gateway's timeout fires first
        return web.Response(text="late")

    async def compressed(request: web.Request) -> web.Response:
        body = gzip.compress(b"hello compressed world" * 100, mtime=0)
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        # The first chunk goes out, then the upstream waits until the client has
        # seen it: a gateway that buffered the response would deadlock here.
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first-chunk;")
        await asyncio.wait_for(up.release.wait(), 5)
        await response.write(b"second-chunk")
        await response.write_eof()
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"z" * 65536)
                await asyncio.sleep(0)
        except (Exception, asyncio.CancelledError):
            up.stream_stopped.set()  # the gateway let go of this connection
            raise

    async def hangup(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()  # no answer at all
        return web.Response()

    async def truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.close()  # dies mid-body
        return response

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        await ws.send_json(
            {
                "protocol": ws.ws_protocol,
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                ],
            }
        )
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT and msg.data == "vanish":
                assert request.transport is not None
                request.transport.abort()  # gone without a close frame
                break
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"upstream says bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
        up.ws_closes.append(ws.close_code)
        up.release.set()
        return ws

    async def websocket_refused(request: web.Request) -> web.Response:
        return web.Response(status=403, text="no sockets for you", headers={"X-Why": "policy"})

    app = web.Application()
    app.router.add_route("*", "/count", count)
    app.router.add_route("*", "/watch", watch)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/bytes/{size}", many_bytes)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/reason", reason)
    app.router.add_get("/slow", slow)
    app.router.add_get("/compressed", compressed)
    app.router.add_get("/stream", stream)
    app.router.add_get("/truncated", truncated)
    app.router.add_get("/endless", endless)
    app.router.add_get("/hangup", hangup)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/ws-refused", websocket_refused)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[Upstream]:
    up = Upstream(server=None)  # type: ignore[arg-type]
    up.server = await aiohttp_server(upstream_app(up))
    yield up
    up.release.set()


# --------------------------------------------------------------------------- gateway


def gateway_handler(
    upstreams: Upstreams, *, trusted: bool, heads: list[str] | None = None
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """What gateway.app does for an allowed request, minus the policy."""

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        headers.check_framing(request.raw_headers, http_version=request.version)
        websocket = headers.is_websocket_upgrade(request.headers.items())
        upstream_headers = headers.upstream_request_headers(
            request.headers.items(),
            prefix=PREFIX,
            allow_method_override=request.path.startswith("/override/"),
            strip_cookies=GATEWAY_COOKIES,
            strip_cookie_prefixes=GATEWAY_COOKIE_PREFIXES,
            client_ip=request.remote or "",
            peer_trusted=trusted,
            scheme="https",
            host=request.host,
            request_id="req-1",
            upstream_host=upstreams.host_of("app"),
            websocket=websocket,
        )
        upstream_headers["X-Auth-Acr"] = GATEWAY_ACR
        if websocket:
            return await upstreams.forward_websocket(
                request, "app", path_qs=request.raw_path, headers=upstream_headers
            )
        return await upstreams.forward(
            request,
            "app",
            path_qs=request.raw_path,
            headers=upstream_headers,
            extra_response_headers=[("X-Gateway", "1")],
            on_headers=None if heads is None else lambda: heads.append(request.path),
        )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await forward(request)
        except errors.GatewayError as exc:
            refusal = web.json_response({"error": exc.reason}, status=exc.status)
            if isinstance(exc, headers.FramingError):
                refusal.force_close()
            return refusal

    return handle


def gateway_app(
    upstreams: Upstreams, *, trusted: bool, heads: list[str] | None = None
) -> web.Application:
    handler = gateway_handler(upstreams, trusted=trusted, heads=heads)

    async def route(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    async def no_early_continue(request: web.Request) -> None:
        return None  # forward() says 100 Continue once the upstream is connected

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", route, expect_handler=no_early_continue)
    return app


MakeGateway = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def make_gateway(
    aiohttp_server: Any, aiohttp_raw_server: Any, upstream: Upstream
) -> AsyncIterator[MakeGateway]:
    opened: list[Upstreams] = []

    async def make(
        *,
        trusted: bool = False,
        timeout_s: float = 5.0,
        body_idle_timeout_s: float = 5.0,
        url: str | None = None,
        low_level: bool = False,
        heads: list[str] | None = None,
    ) -> TestServer:
        """A gateway on loopback; ``low_level`` serves it with ``web.Server`` and
        no router, as gateway.app does."""
        upstreams = Upstreams(
            {"app": UpstreamConfig("app", url or upstream.url)},
            connect_timeout_s=2.0,
            timeout_s=timeout_s,
            gateway_cookies=GATEWAY_COOKIES,
            gateway_cookie_prefixes=GATEWAY_COOKIE_PREFIXES,
            body_idle_timeout_s=body_idle_timeout_s,
        )
        await upstreams.start()
        opened.append(upstreams)
        if low_level:
            raw: TestServer = await aiohttp_raw_server(
                gateway_handler(upstreams, trusted=trusted, heads=heads)
            )
            return raw
        server: TestServer = await aiohttp_server(
            gateway_app(upstreams, trusted=trusted, heads=heads)
        )
        return server

    yield make
    for upstreams in opened:
        await upstreams.close()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> TestServer:
    return await make_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: the test sees the bytes the gateway relayed.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    rest: bytes  # anything after the first response (there should be nothing)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def raw_exchange(port: int, data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send handcrafted bytes; read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def parse_response(raw: bytes, *, head: bool = False) -> RawResponse:
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    _, status, reason = [*status_line.split(" ", 2), ""][:3]
    fields = [(n.strip(), v.strip()) for n, v in (line.split(":", 1) for line in lines)]
    names = {n.lower(): v for n, v in fields}
    body = b""
    if head or status in ("204", "304"):
        pass
    elif names.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                rest = rest.partition(b"\r\n")[2]
                break
            body += rest[:size]
            rest = rest[size + 2 :]
    elif "content-length" in names:
        length = int(names["content-length"])
        body, rest = rest[:length], rest[length:]
    else:
        body, rest = rest, b""
    return RawResponse(int(status), reason, fields, body, rest)


def request_bytes(
    method: str, path: str, fields: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in fields)
    return head.encode("latin-1") + b"\r\n" + body


async def echo_via_raw(
    gateway: TestServer, fields: list[tuple[str, str]], *, method: str = "GET", body: bytes = b""
) -> dict[str, Any]:
    assert gateway.port is not None
    raw = await raw_exchange(gateway.port, request_bytes(method, "/echo", fields, body))
    response = parse_response(raw)
    assert response.status == 200, raw
    record: dict[str, Any] = json.loads(response.body)
    return record


def names_of(record: dict[str, Any]) -> list[str]:
    return [name for name, _ in record["headers"]]


def values_of(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


# --------------------------------------------------------------------------- spoofing


@pytest.mark.parametrize(
    "spoofed",
    [
        [("X-Auth-Acr", "urn:evil")],
        [("x-auth-acr", "urn:evil")],
        [("X-AUTH-ACR", "urn:evil")],
        [("X_Auth_Acr", "urn:evil")],
        [("x_auth-acr", "urn:evil")],
        [("X-Auth-Acr", "urn:evil"), ("X-Auth-Acr", "urn:evil2")],
        [("X-Auth-Subject", "admin"), ("X-Auth-Level", "phishing-resistant")],
        [("X-Auth-Assertion", "eyJhbGciOiJub25lIn0.e30.")],
        [("X_AUTH_SUBJECT", "admin")],
        [("Connection", "x-auth-acr"), ("X-Auth-Acr", "urn:evil")],
        [("Connection", "X-Auth-Acr, x_auth_acr")],
    ],
    ids=lambda fields: "|".join(f"{n}" for n, _ in fields),
)
async def test_client_cannot_set_assurance_headers(
    gateway: TestServer, upstream: Upstream, spoofed: list[tuple[str, str]]
) -> None:
    record = await echo_via_raw(gateway, spoofed)

    under_prefix = [(n, v) for n, v in record["headers"] if headers.is_assurance_header(n, PREFIX)]
    assert under_prefix == [("X-Auth-Acr", GATEWAY_ACR)]


async def test_connection_cannot_remove_host_or_content_length(
    gateway: TestServer, upstream: Upstream
) -> None:
    record = await echo_via_raw(
        gateway,
        [
            ("Connection", "host, content-length, x-auth-acr, x-drop-me"),
            ("X-Drop-Me", "1"),
            ("Content-Length", "5"),
        ],
        method="POST",
        body=b"hello",
    )

    assert values_of(record, "Host") == [f"127.0.0.1:{upstream.server.port}"]
    assert values_of(record, "Content-Length") == ["5"]
    assert record["body_length"] == 5
    assert values_of(record, "X-Auth-Acr") == [GATEWAY_ACR]
    assert values_of(record, "X-Drop-Me") == []  # Connection still works for other names
    assert values_of(record, "Connection") in ([], ["keep-alive"])


async def test_hop_by_hop_headers_are_not_forwarded(gateway: TestServer) -> None:
    record = await echo_via_raw(
        gateway,
        [
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("X-Original-URL", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("X-Request-Id", "client-chosen"),
        ],
    )

    lowered = {n.lower() for n in names_of(record)}
    assert not lowered & {
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "x-original-url",
        "x-rewrite-url",
    }
    assert values_of(record, "X-Request-Id") == ["req-1"]


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [("/echo", []), ("/override/echo", ["PATCH"])],
    ids=["not-allowed", "allowed-by-rule"],
)
async def test_method_override_headers(
    gateway: TestServer, path: str, forwarded: list[str]
) -> None:
    assert gateway.port is not None
    fields = [
        ("X-HTTP-Method-Override", "PATCH"),
        ("X-HTTP-Method", "PATCH"),
        ("X-Method-Override", "PATCH"),
        ("X_HTTP_Method_Override", "PATCH"),
    ]
    raw = await raw_exchange(gateway.port, request_bytes("POST", path, fields))
    record = json.loads(parse_response(raw).body)

    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        assert values_of(record, name) == forwarded
    assert values_of(record, "X_HTTP_Method_Override") == forwarded


# --------------------------------------------------------------------------- forwarding


SPOOFED_FORWARDING = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "for=203.0.113.7;proto=http, for=198.51.100.1"),
    ("X-Real-IP", "203.0.113.7"),
    ("X_Forwarded_For", "198.51.100.1"),
]


async def test_forwarding_headers_from_an_untrusted_peer_are_replaced(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(trusted=False)

    record = await echo_via_raw(gateway, SPOOFED_FORWARDING)

    assert values_of(record, "X-Forwarded-For") == ["127.0.0.1"]
    assert values_of(record, "X_Forwarded_For") == []
    assert values_of(record, "X-Forwarded-Proto") == ["https"]
    assert values_of(record, "X-Forwarded-Host") == ["gateway.test"]
    assert values_of(record, "Forwarded") == ["for=127.0.0.1;host=gateway.test;proto=https"]
    assert values_of(record, "X-Real-IP") == []


async def test_forwarding_chain_from_a_trusted_peer_starts_at_the_judged_client(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(trusted=True)

    record = await echo_via_raw(gateway, SPOOFED_FORWARDING)

    # 198.51.100.1 is no trusted proxy, so it is the client: what lies left of it is the
    # client's own claim, and an upstream reading the leftmost address must not see it.
    assert values_of(record, "X-Forwarded-For") == ["198.51.100.1, 127.0.0.1"]
    # Proto and host are what the app derived and passed in, never the inbound copy.
    assert values_of(record, "X-Forwarded-Proto") == ["https"]
    assert values_of(record, "X-Forwarded-Host") == ["gateway.test"]
    assert values_of(record, "Forwarded") == [
        "for=198.51.100.1;host=gateway.test;proto=https, "
        "for=127.0.0.1;host=gateway.test;proto=https"
    ]
    assert values_of(record, "X-Real-IP") == []  # it names another client


# --------------------------------------------------------------------------- cookies


@pytest.mark.parametrize(
    ("cookie", "forwarded"),
    [
        ("a=1; __Host-stepup_session=SEALED; b=2", ["a=1; b=2"]),
        ("stepup_session=SEALED", []),
        ("__Host-stepup_tx_Q2xpZW50=tx; theme=dark", ["theme=dark"]),
        ("__Host-stepup_session=x; stepup_tx_abc=y; stepup_session=z", []),
        ("stepup_session_other=keep", ["stepup_session_other=keep"]),
    ],
)
async def test_gateway_cookies_never_reach_the_upstream(
    gateway: TestServer, cookie: str, forwarded: list[str]
) -> None:
    record = await echo_via_raw(gateway, [("Cookie", cookie)])

    assert values_of(record, "Cookie") == forwarded


async def test_several_set_cookie_headers_come_back(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(gateway.make_url("/cookies")) as response:
        set_cookies = response.headers.getall("Set-Cookie")

    # All of the upstream's, except one that would overwrite the gateway's session.
    assert set_cookies == ["a=1; Path=/", "b=2; Path=/; HttpOnly", "c=3; Path=/; Secure"]


# --------------------------------------------------------------------------- bodies


async def test_request_with_content_length_keeps_its_length(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    body = os.urandom(300_000)

    async with http.put(gateway.make_url("/upload?x=1"), data=body) as response:
        record = await response.json()

    assert record["method"] == "PUT"
    assert record["path_qs"] == "/upload?x=1"
    assert values_of(record, "Content-Length") == [str(len(body))]
    assert values_of(record, "Transfer-Encoding") == []
    assert record["body_length"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_chunked_upload_streams_through(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    parts = [os.urandom(10_000 + i) for i in range(20)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with http.post(gateway.make_url("/upload"), data=chunks()) as response:
        record = await response.json()

    body = b"".join(parts)
    assert values_of(record, "Transfer-Encoding") == ["chunked"]
    assert values_of(record, "Content-Length") == []
    assert record["body_length"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
async def test_no_body_when_the_client_sent_none(gateway: TestServer, method: str) -> None:
    assert gateway.port is not None
    raw = await raw_exchange(gateway.port, request_bytes(method, "/echo", []))
    record = json.loads(parse_response(raw).body)

    assert record["method"] == method
    assert record["body_length"] == 0
    assert values_of(record, "Transfer-Encoding") == []
    assert values_of(record, "Content-Length") in ([], ["0"])


async def test_aiohttp_adds_no_headers_of_its_own(gateway: TestServer, upstream: Upstream) -> None:
    record = await echo_via_raw(gateway, [("Content-Length", "3")], method="POST", body=b"abc")

    lowered = {n.lower() for n in names_of(record)}
    assert not lowered & {"user-agent", "accept", "accept-encoding", "content-type"}
    assert values_of(record, "Host") == [f"127.0.0.1:{upstream.server.port}"]


async def test_client_headers_pass_through_unchanged(gateway: TestServer) -> None:
    record = await echo_via_raw(
        gateway,
        [
            ("User-Agent", "curl/8.0"),
            ("Accept-Encoding", "gzip, br"),
            ("Authorization", "Bearer upstream-token"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
        ],
    )

    assert values_of(record, "User-Agent") == ["curl/8.0"]
    assert values_of(record, "Accept-Encoding") == ["gzip, br"]
    assert values_of(record, "Authorization") == ["Bearer upstream-token"]
    assert values_of(record, "X-Custom") == ["one", "two"]


async def test_compressed_response_passes_untouched(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(gateway.make_url("/compressed")) as response:
        body = await response.read()
        encoding = response.headers.get("Content-Encoding")
        length = response.headers.get("Content-Length")

    assert encoding == "gzip"
    assert length == str(len(body))
    assert gzip.decompress(body) == b"hello compressed world" * 100


async def test_status_and_reason_are_preserved(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(gateway.make_url("/reason")) as response:
        assert (response.status, response.reason) == (299, "Fine Thanks")
        assert await response.text() == "ok"


async def test_gateway_adds_its_response_headers_and_sees_the_head_arrive(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    heads: list[str] = []
    gateway = await make_gateway(heads=heads)

    async with http.get(gateway.make_url("/stream")) as response:
        # The head is in, the body is not (the upstream waits for release).
        assert heads == ["/stream"]
        assert response.headers.getall("X-Gateway") == ["1"]


async def test_head_gets_length_but_no_body(gateway: TestServer, upstream: Upstream) -> None:
    assert gateway.port is not None
    raw = await raw_exchange(gateway.port, request_bytes("HEAD", "/echo", []))
    response = parse_response(raw, head=True)

    assert response.status == 200
    assert upstream.requests[-1]["method"] == "HEAD"
    assert int(response.values("Content-Length")[0]) > 0
    assert response.rest == b""  # not one body byte after the head


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses(gateway: TestServer, code: int) -> None:
    assert gateway.port is not None
    raw = await raw_exchange(gateway.port, request_bytes("GET", f"/status/{code}", []))
    response = parse_response(raw)

    assert response.status == code
    assert response.values("ETag") == ['"v1"']
    assert response.values("X-Kept") == ["yes"]
    assert response.values("Transfer-Encoding") == []
    assert response.rest == b""


async def test_response_streams_before_the_upstream_is_done(
    gateway: TestServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(gateway.make_url("/stream")) as response:
        first = await asyncio.wait_for(response.content.readexactly(len(b"first-chunk;")), 5)
        upstream.release.set()
        rest = await response.read()

    assert first + rest == b"first-chunk;second-chunk"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_one_gib_upload_streams_with_flat_memory(
    gateway: TestServer, upstream: Upstream, framing: str
) -> None:
    """1 GiB through the gateway; memory must not grow with the body.

    Client, gateway and upstream share this process, so the RSS bound covers all
    three: a gateway that buffered the body would add a whole GiB. The client
    writes one reused 256 KiB block, so it holds no more than that.
    """
    assert gateway.port is not None
    block = os.urandom(256 * 1024)
    blocks = GiB // len(block)
    if framing == "chunked":
        head_field = "Transfer-Encoding: chunked"
        block = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        trailer = b"0\r\n\r\n"
    else:
        head_field = f"Content-Length: {GiB}"
        trailer = b""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    baseline = vm_rss_bytes()
    started = time.perf_counter()
    writer.write(
        b"POST /count HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        + f"{head_field}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
    )
    for _ in range(blocks):
        writer.write(block)
        await writer.drain()
    writer.write(trailer)
    raw = await asyncio.wait_for(reader.read(), 60)
    elapsed = time.perf_counter() - started
    writer.close()

    response = parse_response(raw)
    assert response.status == 200, raw[:300]
    assert json.loads(response.body) == {"body_length": GiB}
    growth = max(upstream.rss_samples) - baseline
    print(
        f"\n1 GiB upload ({framing}): {elapsed:.1f} s ({GiB / MiB / elapsed:.0f} MiB/s), "
        f"RSS baseline {baseline / MiB:.0f} MiB, max growth {growth / MiB:.1f} MiB "
        f"over {len(upstream.rss_samples)} samples"
    )
    assert growth < 64 * MiB


async def test_one_gib_download_streams_with_flat_memory(gateway: TestServer) -> None:
    assert gateway.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    baseline = vm_rss_bytes()
    samples = [baseline]
    started = time.perf_counter()
    writer.write(f"GET /bytes/{GiB} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    received = 0
    next_sample = 0
    while received < GiB:
        chunk = await asyncio.wait_for(reader.read(1024 * 1024), 10)
        assert chunk, "connection closed early"
        received += len(chunk)
        if received >= next_sample:
            samples.append(vm_rss_bytes())
            next_sample += 16 * MiB
    elapsed = time.perf_counter() - started
    writer.close()

    assert parse_response(head, head=True).values("Content-Length") == [str(GiB)]
    assert received == GiB
    growth = max(samples) - baseline
    print(
        f"\n1 GiB download: {elapsed:.1f} s ({GiB / MiB / elapsed:.0f} MiB/s), "
        f"max RSS growth {growth / MiB:.1f} MiB"
    )
    assert growth < 64 * MiB


# --------------------------------------------------------------------------- failures


@pytest.fixture
def closed_port() -> Iterator[int]:
    # Bound but not listening: a connect is refused, and no one else can take it.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


async def test_unreachable_upstream_is_502(
    make_gateway: MakeGateway,
    closed_port: int,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(url=f"http://127.0.0.1:{closed_port}")

    with structlog.testing.capture_logs() as logs:
        async with http.post(gateway.make_url("/anything"), data=b"body") as response:
            assert response.status == 502
            assert await response.json() == {"error": "upstream_unreachable"}

    assert [e["event"] for e in logs] == ["upstream_unreachable"]
    assert logs[0]["upstream"] == "app"
    assert_no_errors_logged(caplog)


async def test_slow_upstream_is_504(
    make_gateway: MakeGateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(timeout_s=0.2)

    with structlog.testing.capture_logs() as logs:
        async with http.get(gateway.make_url("/slow")) as response:
            assert response.status == 504
            assert await response.json() == {"error": "upstream_timeout"}

    assert upstream.requests[-1]["path_qs"] == "/slow"
    assert [e["event"] for e in logs] == ["upstream_timeout"]


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No traceback in the logs (aiohttp logs unhandled handler errors at ERROR)."""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_upstream_hanging_up_without_an_answer_is_502(
    gateway: TestServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with http.get(gateway.make_url("/hangup")) as response:
        assert response.status == 502
        assert await response.json() == {"error": "upstream_failed"}
    assert_no_errors_logged(caplog)


async def test_upstream_dying_mid_body_truncates_the_response(
    gateway: TestServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with http.get(gateway.make_url("/truncated")) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    # The gateway itself is fine afterwards.
    async with http.get(gateway.make_url("/echo")) as response:
        assert response.status == 200
    assert_no_errors_logged(caplog)


async def test_client_leaving_mid_download_releases_the_upstream(
    gateway: TestServer, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    assert gateway.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
    await reader.readexactly(100_000)
    writer.transport.abort()

    await asyncio.wait_for(upstream.stream_stopped.wait(), 5)
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize("low_level", [False, True], ids=["router", "web.Server"])
async def test_expect_continue_is_answered_once_the_upstream_is_connected(
    make_gateway: MakeGateway, upstream: Upstream, low_level: bool
) -> None:
    gateway = await make_gateway(low_level=low_level)
    assert gateway.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.write(b"hello")
    final = parse_response(await asyncio.wait_for(reader.read(), 5))
    writer.close()

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.status == 200
    record = json.loads(final.body)
    assert record["body_length"] == 5
    assert values_of(record, "Expect") == []


async def test_expect_continue_with_unreachable_upstream_gets_the_502_instead(
    make_gateway: MakeGateway, closed_port: int
) -> None:
    gateway = await make_gateway(url=f"http://127.0.0.1:{closed_port}", low_level=True)
    assert gateway.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: gateway.test\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()

    assert head.startswith(b"HTTP/1.1 502 ")  # no 100 first: the body is never sent


# --------------------------------------------------------------------------- smuggling


@dataclass(frozen=True)
class Shape:
    name: str
    raw: bytes
    # "aiohttp": its parser answers 400 before our code runs; "gateway": check_framing;
    # "either": depends on the parser build (llhttp or the pure-Python one).
    refused_by: str
    pipelined: bool = True  # follow it with a second request on the same connection


POST = b"POST /echo HTTP/1.1\r\nHost: gateway.test\r\n"
NEXT = b"GET /smuggled HTTP/1.1\r\nHost: gateway.test\r\n\r\n"

SHAPES = [
    Shape(
        "cl-and-te",
        POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "aiohttp",
    ),
    Shape(
        "te-and-cl",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "aiohttp",
    ),
    Shape(
        "cl-duplicate-different",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "aiohttp",
    ),
    Shape(
        "cl-duplicate-same",
        POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "aiohttp",
    ),
    Shape("cl-list", POST + b"Content-Length: 5, 5\r\n\r\nhello", "aiohttp"),
    Shape("cl-plus", POST + b"Content-Length: +5\r\n\r\nhello", "aiohttp"),
    Shape("cl-negative", POST + b"Content-Length: -1\r\n\r\nhello", "aiohttp"),
    Shape("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", "aiohttp"),
    Shape("cl-space-before-colon", POST + b"Content-Length : 5\r\n\r\nhello", "aiohttp"),
    Shape(
        "te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "gateway"
    ),
    Shape("te-leading-comma", POST + b"Transfer-Encoding: , chunked\r\n\r\n0\r\n\r\n", "gateway"),
    Shape(
        "te-chunked-chunked",
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "either",
    ),
    Shape("te-empty", POST + b"Transfer-Encoding: \r\n\r\n", "either"),
    Shape(
        "te-chunked-gzip", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "aiohttp"
    ),
    Shape("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\nhello", "aiohttp"),
    Shape("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "aiohttp"),
    Shape(
        "te-two-headers",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "aiohttp",
    ),
    Shape("te-vertical-tab", POST + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", "aiohttp"),
    Shape(
        "te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", "aiohttp"
    ),
    Shape(
        "te-in-http-1.0",
        b"POST /echo HTTP/1.0\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "gateway",
        pipelined=False,  # HTTP/1.0 closes; aiohttp refuses any data after it on its own
    ),
    Shape("obs-fold-te", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", "aiohttp"),
    Shape("obs-fold-other", POST + b"Content-Length: 0\r\nX-Foo: a\r\n b\r\n\r\n", "aiohttp"),
    Shape("obs-fold-tab", POST + b"Content-Length: 0\r\nX-Foo: a\r\n\tb\r\n\r\n", "aiohttp"),
    Shape("bare-lf", b"POST /echo HTTP/1.1\nHost: gateway.test\nContent-Length: 0\n\n", "aiohttp"),
    Shape("bare-cr-in-value", POST + b"Content-Length: 0\r\nX-Foo: a\rb\r\n\r\n", "aiohttp"),
    Shape(
        "cl-underscore-alias",
        POST + b"Content-Length: 5\r\nContent_Length: 0\r\n\r\nhello",
        "gateway",
    ),
    Shape(
        "te-underscore-alias",
        POST + b"Content-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\nhello",
        "gateway",
    ),
    Shape(
        "chunk-size-invalid",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n",
        "aiohttp",
    ),
    Shape(
        "chunk-size-lf-only", POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", "aiohttp"
    ),
]


@pytest.mark.parametrize("low_level", [False, True], ids=["router", "web.Server"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.name)
async def test_smuggling_shapes_are_refused(
    make_gateway: MakeGateway, upstream: Upstream, shape: Shape, low_level: bool
) -> None:
    gateway = await make_gateway(low_level=low_level)
    assert gateway.port is not None

    raw = await raw_exchange(gateway.port, shape.raw + (NEXT if shape.pipelined else b""))
    response = parse_response(raw)

    assert response.status == 400, raw[:200]
    assert upstream.requests == []  # neither the shape nor what follows it got through
    assert b"/smuggled" not in response.rest
    if shape.refused_by == "gateway":
        assert json.loads(response.body)["error"]
    elif shape.refused_by == "aiohttp":
        assert response.values("Content-Type")[0].startswith("text/plain")


async def test_well_formed_requests_still_pass_the_framing_check(
    gateway: TestServer, upstream: Upstream
) -> None:
    assert gateway.port is not None
    chunked = (
        POST + b"Transfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )

    response = parse_response(await raw_exchange(gateway.port, chunked))

    assert response.status == 200
    assert json.loads(response.body)["body_length"] == 5


async def send_head_then(port: int, upstream: Upstream, head: bytes, then: bytes) -> bytes:
    """Send ``head``, wait until the upstream handler has started, then ``then``.

    Returns the first response. aiohttp keeps reading an unfinished body for up
    to its lingering time (10 s) before it closes, so this reads one response by
    its Content-Length instead of waiting for the close.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        await asyncio.wait_for(upstream.head_seen.wait(), 5)
        writer.write(then)
        await writer.drain()
        response_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = parse_response(response_head).values("Content-Length")
        return response_head + await reader.readexactly(int(length[0]) if length else 0)
    finally:
        writer.close()


WATCH = b"POST /watch HTTP/1.1\r\nHost: gateway.test\r\n"


@pytest.mark.parametrize(
    ("head", "then"),
    [
        (WATCH + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"zz\r\n" + NEXT),
        (WATCH + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"5\r\nhelloXX" + NEXT),
        (WATCH + b"Content-Length: 100\r\n\r\nhello", b""),  # then silence
    ],
    ids=["bad-chunk-size", "chunk-longer-than-its-size", "body-stalls"],
)
async def test_body_breaking_after_the_head_reaches_no_complete_request(
    make_gateway: MakeGateway, upstream: Upstream, head: bytes, then: bytes
) -> None:
    """The head passes the check and forwarding starts; then the body breaks.

    Streaming means the upstream has seen the head, but it never gets a complete
    request. With llhttp a malformed chunk mid-body just stops the stream (no
    error reaches the handler), so the body idle timeout is what ends it.
    """
    gateway = await make_gateway(body_idle_timeout_s=0.3)
    assert gateway.port is not None

    raw = await send_head_then(gateway.port, upstream, head, then)

    response = parse_response(raw)
    assert response.status == 400
    assert json.loads(response.body)["error"] in ("request_body_timeout", "request_body_aborted")
    assert upstream.requests == []
    # The upstream's read of the body fails: the gateway cut that connection.
    await asyncio.wait_for(upstream.body_failed.wait(), 5)


# --------------------------------------------------------------------------- websockets


async def test_websocket_echo_and_close_code_from_upstream(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(
        gateway.make_url("/ws"),
        protocols=("chat.v2", "chat.v1"),
        headers={
            "X-Auth-Acr": "urn:evil",
            "X_Auth_Level": "high",
            "Cookie": "stepup_session=s; a=1",
        },
    ) as ws:
        hello = await ws.receive_json()
        await ws.send_str("ping")
        text = await ws.receive_str()
        await ws.send_bytes(b"\x00\x01")
        data = await ws.receive_bytes()
        await ws.send_str("close:4001")
        closing = await ws.receive()

    assert ws.protocol == "chat.v1"
    assert hello["protocol"] == "chat.v1"
    seen = hello["headers"]
    assert [v for n, v in seen if headers.is_assurance_header(n, PREFIX)] == [GATEWAY_ACR]
    assert [v for n, v in seen if n.lower() == "cookie"] == ["a=1"]
    assert [v for n, v in seen if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert (text, data) == ("echo:ping", b"echo:\x00\x01")
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == 4001
    assert closing.extra == "upstream says bye"


async def test_websocket_close_code_from_client_reaches_upstream(
    gateway: TestServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(gateway.make_url("/ws"), protocols=("chat.v1",)) as ws:
        await ws.receive_json()
        await ws.close(code=4002, message=b"client leaves")

    await asyncio.wait_for(upstream.release.wait(), 5)
    assert upstream.ws_closes == [4002]
    assert ws.close_code == 4002


async def test_websocket_upstream_vanishing_closes_the_client_with_1014(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(gateway.make_url("/ws"), protocols=("chat.v1",)) as ws:
        await ws.receive_json()
        await ws.send_str("vanish")
        closing = await asyncio.wait_for(ws.receive(), 5)

    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert closing.data == aiohttp.WSCloseCode.BAD_GATEWAY


async def test_websocket_refused_upstream_status_is_relayed(
    gateway: TestServer, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(gateway.make_url("/ws-refused"))

    assert refused.value.status == 403


async def test_websocket_to_unreachable_upstream_is_502(
    make_gateway: MakeGateway, closed_port: int, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(url=f"http://127.0.0.1:{closed_port}")

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(gateway.make_url("/ws"))

    assert refused.value.status == 502
