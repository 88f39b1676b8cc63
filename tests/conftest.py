"""Shared fixtures: a real test OpenID Provider, a real echo upstream and the gateway
between them, all on loopback; plus a cookie-keeping client that walks redirects
one hop at a time so tests can assert on every hop."""

from __future__ import annotations

import contextlib
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from gateway.config import load_config_text
from tests.support.op import OpBehaviour, OpClient, OpenIdProvider, start_op
from tests.support.serving import serving
from tests.support.upstream import SEEN, make_echo_app

SESSION_SECRET = "test-session-secret-0123456789abcdef"  # a fixture, not a real secret
CLIENT_SECRET = "test-client-secret"
HTML = {"Accept": "text/html,application/xhtml+xml"}

LEVELS_YAML = """\
assurance:
  levels:
    - name: password
      acr: [urn:example:loa:1]
    - name: mfa
      acr: [urn:example:loa:2]
      amr_any: [otp]
    - name: phishing-resistant
      acr: [phr, phrh]
      amr_any: [hwk]
"""

DEFAULT_RULES = """\
rules:
  - name: transfers
    match: {path: /api/transfers/**, methods: [POST, PUT]}
    require: {level: phishing-resistant, max_age: 5m}
  - name: transfer-page
    match: {path: /transfers/**}
    require: {level: phishing-resistant, max_age: 5m}
  - name: payees
    match: {path: /payees/**}
    require: {level: mfa}
  - name: public
    match: {path: /public/**}
    require: none
  - name: dav
    match: {path: /dav/**, methods: [PROPFIND, GET]}
    require: none
  - name: override-ok
    match: {path: /legacy/**}
    require: none
    allow_method_override: true
  - name: signed-in
    match: {path: /app/**}
    require: {level: password}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Clock:
    """A clock tests move by hand: no sleeping."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Hop:
    method: str
    url: str
    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Browser:
    """An aiohttp client with a cookie jar that follows redirects hop by hop."""

    http: aiohttp.ClientSession
    hops: list[Hop] = field(default_factory=list)

    async def get(self, url: str, **kwargs: Any) -> Hop:
        return await self.request("GET", url, **kwargs)

    async def request(self, method: str, url: str, **kwargs: Any) -> Hop:
        headers = {**HTML, **kwargs.pop("headers", {})}
        async with self.http.request(
            method, url, headers=headers, allow_redirects=False, **kwargs
        ) as resp:
            hop = Hop(method, url, resp.status, dict(resp.headers), await resp.text())
        self.hops.append(hop)
        return hop

    async def follow(self, url: str, *, max_hops: int = 10, **kwargs: Any) -> Hop:
        """GET ``url`` and follow redirects; return the final hop."""
        hop = await self.get(url, **kwargs)
        for _ in range(max_hops):
            if hop.status not in (301, 302, 303, 307, 308):
                return hop
            hop = await self.get(_absolute(hop.url, hop.headers["Location"]))
        raise AssertionError(f"redirect loop: {[h.url for h in self.hops[-max_hops:]]}")

    def cookie(self, name: str) -> str | None:
        for morsel in self.http.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None


def _absolute(base: str, location: str) -> str:
    if location.startswith("http"):
        return location
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}{location}"


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def raw_request(url: str, data: bytes) -> bytes:
    """Send handcrafted bytes (what a non-normalising client sends); return the answer."""
    parts = urlsplit(url)
    reader, writer = await __import__("asyncio").open_connection(parts.hostname, parts.port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


@dataclass
class Stack:
    gateway: Gateway
    url: str
    op: OpenIdProvider
    upstream: Any  # aiohttp TestServer of the echo app
    clock: Clock
    config_text: str

    @property
    def seen(self) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = self.upstream.app[SEEN]
        return seen


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
def clock() -> Clock:
    import time

    return Clock(time.time())


@pytest.fixture
async def op(aiohttp_server: Any, clock: Clock) -> OpenIdProvider:
    return await start_op(
        aiohttp_server,
        clients=[OpClient(client_id="gateway", client_secret=CLIENT_SECRET)],
        behaviour=OpBehaviour(now=clock),
    )


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Any:
    return await aiohttp_server(make_echo_app())


@pytest.fixture
async def make_stack(
    op: OpenIdProvider, upstream: Any, clock: Clock
) -> AsyncIterator[StackFactory]:
    running = contextlib.AsyncExitStack()

    async def factory(
        *,
        rules: str = DEFAULT_RULES,
        store: str = "cookie",
        extra: str = "",
        oidc_extra: str = "",
        session_extra: str = "",
        server_extra: str = "",
        upstream_url: str | None = None,
        issuer: str | None = None,
        secret: str = SESSION_SECRET,
        tracer: Any = None,  # a gateway.telemetry.Tracing (tests/test_telemetry.py)
    ) -> Stack:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        text = (
            textwrap.dedent(f"""\
            server:
              listen: 127.0.0.1:{port}
              public_url: {url}
            """)
            + textwrap.indent(server_extra, "  ")
            + textwrap.dedent(f"""\
            upstreams:
              app: {upstream_url or str(upstream.make_url("")).rstrip("/")}
            oidc:
              issuer: {issuer or op.issuer}
              client_id: gateway
              client_secret: {CLIENT_SECRET}
            """)
            + textwrap.indent(oidc_extra, "  ")
            + textwrap.dedent(f"""\
            session:
              secret: {secret}
              store: {store}
              cookie_secure: false
            """)
            + textwrap.indent(session_extra, "  ")
            + LEVELS_YAML
            + rules
            + extra
        )
        config = load_config_text(text, "test.yaml")
        op.clients["gateway"].redirect_uris.append(f"{url}/_gateway/callback")
        op.clients["gateway"].post_logout_redirect_uris.append(f"{url}/_gateway/logged-out")
        gateway = Gateway(config, clock=clock, tracer=tracer)
        await running.enter_async_context(serving(gateway, port))
        return Stack(gateway, url, op, upstream, clock, text)

    async with running:
        yield factory


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield Browser(http)


@pytest.fixture
async def api() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield http


def make_web_app(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
