"""Differential tests: crafted requests through the gateway to real upstream servers.

The gateway judges a request (path, host, headers, client address) and the
upstream acts on its own reading of the same bytes. These tests put a servlet
container (Jetty 9.4) and Express 4 behind the gateway, with a strict rule on
``/api/transfers/**`` and a lenient catch-all, sign in at the weaker level, and
send every spelling we know of that some server maps to the transfers handler.
Each must be refused by the gateway (400/421), get the strict rule's treatment
(401, step-up needed), or reach a handler that matches what the gateway judged
(never the transfers handler, which the session may not use).

The control tests send the same spellings straight to the servers, to show that
each server really does read them as the protected path: without the gateway's
fix the spelling would be a bypass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs
from yarl import URL

from gateway.paths import normalize_path
from tests.conftest import Browser, Stack, StackFactory
from tests.support.differential import RunningServer, express, jetty

STRICT_RULES = """\
rules:
  - name: transfers
    match: {path: /api/transfers/**}
    require: {level: mfa}
  - name: catch-all
    match: {path: /**}
    require: {level: password}
"""

# Spellings of /api/transfers/1 (or of a path some server maps to its handler).
SPELLINGS = [
    "/api/transfers/1",  # the plain one: the strict rule
    "/api/transfers;/1",  # servlet path parameter
    "/api/transfers;jsessionid=x/1",
    "/api;x/transfers/1",
    "/api/transfers%3b/1",
    "/api/transfers%3B/1",
    "/api/transfers/..;/transfers/1",
    "/api/transfers./1",  # trimmed by Windows, IIS, .NET
    "/api/transfers%2e/1",
    "/api/transfers%20/1",  # trimmed by Java's trim()
    "/api/transfers%09/1",
    "/api/transfers%c2%a0/1",
    "/API/Transfers/1",  # case-insensitive routers (Express, IIS, ASP.NET)
    "/api/TRANSFERS/1",
    "/Api/transfers",
    "/%41PI/transfers/1",
    "/api/%74ransfers/1",  # an escaped unreserved letter
    "/api/%2574ransfers/1",  # double encoding
    "/api//transfers/1",  # empty segments
    "//api/transfers/1",
    "/api/./transfers/1",  # dot-segments
    "/api/x/../transfers/1",
    "/api/%2e/transfers/1",
    "/api/x/%2e%2e/transfers/1",
    "/api/transfers%2f1",  # encoded slash
    "/api%2ftransfers/1",
    "/api/transfers%5c1",  # backslash
    "/api\\transfers/1",
    "/api/transfers%00/1",  # NUL
    "/api/%EF%BD%94ransfers/1",  # fullwidth "t": Windows best-fit, NFKC
    "/api/transfers%EF%BC%8F1",  # fullwidth "/"
    "/api/transfers/",
    "/api/transfers",
]


@pytest.fixture(scope="session")
def jetty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with jetty(Path(tmp_path_factory.mktemp("jetty"))) as server:
        yield server


@pytest.fixture(scope="session")
def express_server() -> Iterator[RunningServer]:
    with express() as server:
        yield server


def upstream_setting(name: str, server: RunningServer, *, paths_rule: bool) -> str:
    # Express routes case-insensitively by default: the operator says so for it.
    if name == "express" and paths_rule:
        return f"{{url: '{server.url}', case_insensitive_paths: true}}"
    return server.url


@pytest.fixture(params=["jetty", "express"])
def real_upstream(request: pytest.FixtureRequest) -> tuple[str, RunningServer]:
    name: str = request.param
    server: RunningServer = request.getfixturevalue(f"{name}_server")
    return name, server


async def signed_in(
    make_stack: StackFactory,
    browser: Browser,
    upstream: tuple[str, RunningServer],
    *,
    rules: str = STRICT_RULES,
    server_extra: str = "",
) -> Stack:
    """A gateway in front of ``upstream`` and a browser signed in at ``password``."""
    name, server = upstream
    stack = await make_stack(
        rules=rules,
        upstream_url=upstream_setting(name, server, paths_rule=rules == STRICT_RULES),
        server_extra=server_extra,
    )
    final = await browser.follow(f"{stack.url}/home")
    assert final.status == 200, final.body
    assert json.loads(final.body)["handler"] == "default"
    return stack


async def send(
    http: aiohttp.ClientSession,
    url: str,
    method: str = "POST",
    headers: list[tuple[str, str]] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """``url`` exactly as written (no client-side normalising); (status, headers, body)."""
    async with http.request(
        method,
        URL(url, encoded=True),
        headers=headers or [("Accept", "application/json")],
        data=b"amount=5000" if method == "POST" else None,
        allow_redirects=False,
    ) as resp:
        text = await resp.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return resp.status, dict(resp.headers), body


def verdict(status: int, headers: dict[str, str], body: Any) -> str:
    """What happened: refused, strict (step-up asked), or the handler that answered."""
    if status in (400, 421):
        return "refused"
    if status == 401 and "insufficient_user_authentication" in headers.get("WWW-Authenticate", ""):
        return "strict"
    if status == 200 and isinstance(body, dict) and "handler" in body:
        return f"handler:{body['handler']}"
    return f"status:{status}"


def compact_name(name: str) -> str:
    """A header name with case and separators ignored (``X.Auth_subject`` -> ``xauthsubject``)."""
    return re.sub("[^a-z0-9]", "", name.lower())


def seen_headers(name: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    if name == "jetty":
        return [(key, value) for key, value in body["headers"]]
    raw = body["rawHeaders"]
    return list(zip(raw[0::2], raw[1::2], strict=True))


def seen_path(name: str, body: dict[str, Any]) -> str:
    return str(body["requestURI"] if name == "jetty" else body["originalUrl"])


# --------------------------------------------------------------------------- paths


async def test_no_spelling_reaches_the_handler_a_strict_rule_protects(
    make_stack: StackFactory, browser: Browser, real_upstream: tuple[str, RunningServer]
) -> None:
    name, _server = real_upstream
    stack = await signed_in(make_stack, browser, real_upstream)
    outcomes: dict[str, str] = {}
    for spelling in SPELLINGS:
        status, headers, body = await send(browser.http, stack.url + spelling)
        outcome = verdict(status, headers, body)
        outcomes[spelling] = outcome
        if outcome.startswith("handler:"):
            # It got through on the catch-all: the upstream acted on the path judged.
            assert seen_path(name, body) == normalize_path(spelling), (spelling, body)
    bypasses = {s: o for s, o in outcomes.items() if o == "handler:transfers"}
    assert not bypasses, f"{name}: reached the protected handler: {bypasses}"
    assert all(o in ("refused", "strict", "handler:default") for o in outcomes.values()), outcomes
    assert outcomes["/api/transfers/1"] == "strict"


@pytest.mark.parametrize(
    ("spelling", "reason"),
    [
        ("/api/transfers;/1", "path_parameter"),
        ("/api/transfers%3B/1", "path_parameter"),
        ("/api/transfers./1", "trailing_dot_or_space"),
        ("/api/transfers%20/1", "trailing_dot_or_space"),
        ("/api/%2574ransfers/1", "double_encoding"),
    ],
)
async def test_a_refused_spelling_is_a_400_with_a_log_line(
    make_stack: StackFactory,
    browser: Browser,
    jetty_server: RunningServer,
    spelling: str,
    reason: str,
) -> None:
    stack = await signed_in(make_stack, browser, ("jetty", jetty_server))
    with capture_logs() as logs:
        status, _headers, body = await send(browser.http, stack.url + spelling)
    assert (status, body["error"]) == (400, reason)
    refused = [e for e in logs if e["event"] == "request_refused"]
    assert refused and refused[0]["reason"] == reason and refused[0]["status"] == 400
    assert not any(e["event"] == "upstream_request" for e in logs)


@pytest.mark.parametrize(
    ("name", "spellings"),
    [
        ("jetty", ["/api/transfers;/1", "/api/transfers;jsessionid=x/1", "/api;x/transfers/1"]),
        ("express", ["/API/Transfers/1", "/api/TRANSFERS/1", "/Api/transfers"]),
    ],
)
async def test_each_server_maps_its_spellings_to_the_protected_handler(
    request: pytest.FixtureRequest, api: aiohttp.ClientSession, name: str, spellings: list[str]
) -> None:
    """The control: straight to the server, these reach the transfers handler."""
    server: RunningServer = request.getfixturevalue(f"{name}_server")
    for spelling in spellings:
        status, headers, body = await send(api, server.url + spelling)
        assert verdict(status, headers, body) == "handler:transfers", (spelling, body)


@pytest.mark.parametrize(
    "spelling",
    [
        "/home//a/./b/../c",
        "/home/%7Euser/x",
        "/home/caf%C3%A9",
        "/home/a%20b/c",
        "/home/%41bc",
        "/home/x?q=1;2",
    ],
)
async def test_the_upstream_acts_on_the_path_the_gateway_judged(
    make_stack: StackFactory,
    browser: Browser,
    real_upstream: tuple[str, RunningServer],
    spelling: str,
) -> None:
    name, _server = real_upstream
    stack = await signed_in(make_stack, browser, real_upstream)
    status, headers, body = await send(browser.http, stack.url + spelling, method="GET")
    assert verdict(status, headers, body) == "handler:default", body
    path, _, query = spelling.partition("?")
    expected = normalize_path(path) + (f"?{query}" if query and name == "express" else "")
    assert seen_path(name, body) == expected
    rule = [v for k, v in seen_headers(name, body) if k.lower() == "x-auth-rule"]
    assert rule == ["catch-all"]


async def test_a_case_insensitive_upstream_without_the_setting_is_bypassed(
    make_stack: StackFactory, browser: Browser, express_server: RunningServer
) -> None:
    """Why the setting exists: left out, /API/Transfers is judged by the catch-all."""
    stack = await make_stack(rules=STRICT_RULES, upstream_url=express_server.url)
    await browser.follow(f"{stack.url}/home")
    status, headers, body = await send(browser.http, stack.url + "/API/Transfers/1")
    assert verdict(status, headers, body) == "handler:transfers"
    # The global switch covers every upstream.
    stack = await make_stack(
        rules=STRICT_RULES,
        upstream_url=express_server.url,
        server_extra="case_insensitive_paths: true\n",
    )
    await browser.follow(f"{stack.url}/home")
    status, headers, body = await send(browser.http, stack.url + "/API/Transfers/1")
    assert verdict(status, headers, body) == "strict"


# --------------------------------------------------------------------------- hosts

HOST_RULES = """\
rules:
  - name: transfers
    match: {path: /api/transfers/**, host: bank.example.com}
    require: {level: mfa}
  - name: catch-all
    match: {path: /**}
    require: {level: password}
"""


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("bank.example.com", "strict"),
        ("BANK.Example.COM", "strict"),
        ("bank.example.com.", "strict"),
        ("bank.example.com:80", "strict"),  # http's default port
        ("bank.example.com:8443", "refused"),
        ("bank.example.com:443", "refused"),  # not the default port of http
        ("bank.example.com.:80", "strict"),
        ("other.example.com", "refused"),
        ("10.0.0.1", "refused"),
        ("[::1]", "refused"),
        ("xn--bnk-sna.example.com", "refused"),
        ("b\u00e4nk.example.com", "refused"),
        ("bank.example.com:", "strict"),  # an empty port is the default one
        ("bank.example.com:0080", "strict"),
    ],
)
async def test_host_spellings_never_fall_through_to_a_weaker_rule(
    make_stack: StackFactory,
    browser: Browser,
    real_upstream: tuple[str, RunningServer],
    host: str,
    expected: str,
) -> None:
    stack = await signed_in(make_stack, browser, real_upstream, rules=HOST_RULES)
    status, headers, body = await send(
        browser.http,
        stack.url + "/api/transfers/1",
        headers=[("Host", host), ("Accept", "application/json")],
    )
    assert verdict(status, headers, body) == expected, body
    if expected == "refused" and status == 421:
        assert body["error"] == "unknown_host"


async def test_the_upstream_is_told_the_host_the_rules_judged(
    make_stack: StackFactory, browser: Browser, real_upstream: tuple[str, RunningServer]
) -> None:
    name, _server = real_upstream
    stack = await signed_in(make_stack, browser, real_upstream, rules=HOST_RULES)
    port = URL(stack.url).port
    status, headers, body = await send(
        browser.http,
        stack.url + "/home",
        method="GET",
        headers=[("Host", f"127.0.0.1.:{port}"), ("Accept", "application/json")],
    )
    assert verdict(status, headers, body) == "handler:default", body
    forwarded_host = [v for k, v in seen_headers(name, body) if k.lower() == "x-forwarded-host"]
    assert forwarded_host == [f"127.0.0.1:{port}"]
    assert body["serverName" if name == "jetty" else "hostname"] == "127.0.0.1"


async def test_server_hosts_are_known_hosts(
    make_stack: StackFactory, browser: Browser, jetty_server: RunningServer
) -> None:
    stack = await signed_in(
        make_stack,
        browser,
        ("jetty", jetty_server),
        rules=HOST_RULES,
        server_extra="hosts: [WWW.example.com, 10.0.0.2]\n",
    )
    for host in ("www.example.com", "10.0.0.2:80", "10.0.0.2."):
        status, headers, body = await send(
            browser.http, stack.url + "/home", method="GET", headers=[("Host", host)]
        )
        assert verdict(status, headers, body) == "handler:default", (host, body)
        assert body["serverName"] == host.partition(":")[0].rstrip(".").lower()
    status, headers, body = await send(
        browser.http, stack.url + "/home", method="GET", headers=[("Host", "10.0.0.3")]
    )
    assert (status, body["error"]) == (421, "unknown_host")


# --------------------------------------------------------------------------- headers

ALIASES = [
    "X.Auth.Subject",
    "X_Auth_Level",
    "x-auth-rule",
    "X~Auth~Acr",
    "X-Auth_Amr",
    "XAuthTime",
    "X-AUTH-EMAIL",
    "X.Auth-Assertion",
    "X.Forwarded.Host",
    "X_Request_Id",
]


async def test_no_alias_of_a_gateway_header_reaches_the_upstream(
    make_stack: StackFactory, browser: Browser, real_upstream: tuple[str, RunningServer]
) -> None:
    name, _server = real_upstream
    stack = await signed_in(make_stack, browser, real_upstream)
    sent = [(alias, "forged") for alias in ALIASES]
    status, headers, body = await send(
        browser.http, stack.url + "/home", method="GET", headers=[*sent, ("Accept", "text/plain")]
    )
    assert verdict(status, headers, body) == "handler:default", body
    forged = [(k, v) for k, v in seen_headers(name, body) if v == "forged"]
    assert forged == [], f"{name} saw client copies of gateway headers: {forged}"
    subject = [
        v for k, v in seen_headers(name, body) if compact_name(k) == compact_name("X-Auth-Subject")
    ]
    assert subject == ["user-1"]


# ------------------------------------------------------------------ client address

OFFICE_RULES = """\
rules:
  - name: away
    match: {path: /api/transfers/**}
    when: "client_ip not in [198.51.100.0/24]"
    require: {level: mfa}
  - name: office
    match: {path: /**}
    require: {level: password}
"""


@pytest.mark.parametrize(
    ("lines", "judged"),
    [
        (["198.51.100.7", "203.0.113.66"], "203.0.113.66"),
        (["198.51.100.7", "203.0.113.66, 127.0.0.1"], "203.0.113.66"),
        (["203.0.113.66, 198.51.100.7", "203.0.113.66"], "203.0.113.66"),
        (["198.51.100.7, 203.0.113.66"], "203.0.113.66"),
        (["203.0.113.66", "198.51.100.7"], "198.51.100.7"),
        (["203.0.113.66, 198.51.100.7"], "198.51.100.7"),
        (["203.0.113.66", "198.51.100.7, 127.0.0.1"], "198.51.100.7"),
    ],
)
async def test_client_ip_is_what_the_upstream_reads_from_x_forwarded_for(
    make_stack: StackFactory,
    browser: Browser,
    real_upstream: tuple[str, RunningServer],
    lines: list[str],
    judged: str,
) -> None:
    """X-Forwarded-For lines from a trusted proxy: the upstream must act on the client the
    gateway judged, whether it reads the rightmost untrusted address (Express with
    ``trust proxy``) or the leftmost one (Jetty's ForwardedRequestCustomizer)."""
    name, _server = real_upstream
    stack = await signed_in(
        make_stack,
        browser,
        real_upstream,
        rules=OFFICE_RULES,
        server_extra="trusted_proxies: [127.0.0.1/32]\n",
    )
    sent = [("X-Forwarded-For", line) for line in lines]
    status, headers, body = await send(
        browser.http, stack.url + "/api/transfers/1", headers=[*sent, ("Accept", "*/*")]
    )
    outcome = verdict(status, headers, body)
    if judged.startswith("198.51.100."):
        assert outcome == "handler:transfers", body  # the office: the lenient rule
        seen = body["remoteAddr" if name == "jetty" else "ip"]
        assert seen == judged, body
    else:
        assert outcome == "strict", body
