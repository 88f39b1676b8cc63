"""Forward-auth end to end through the real front proxies: nginx (auth_request) and
Caddy (forward_auth), started here as processes on loopback ports with the configs
shipped in docs/forward-auth/ (ports substituted), in front of the gateway (server.mode
forward_auth) and a real echo upstream; the test OpenID Provider signs users in."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import ConfigError, load_config_text
from tests.conftest import (
    CLIENT_SECRET,
    LEVELS_YAML,
    SESSION_SECRET,
    Browser,
    Clock,
    free_port,
    query_of,
)
from tests.support.op import OpenIdProvider, OpUser
from tests.support.serving import serving, wait_for_port
from tests.support.upstream import SEEN, header_values

DOCS = Path(__file__).resolve().parent.parent / "docs" / "forward-auth"
PHR_USER = OpUser(acr="phr", amr=["hwk"])

RULES = """\
rules:
  - name: transfers
    match: {path: /transfers/**}
    require: {level: phishing-resistant, max_age: 5m}
  - name: public
    match: {path: /public/**}
    require: none
  - name: by-amount
    match: {path: /pay/**}
    when: 'amount > 100'
    require: {level: mfa}
  - name: signed-in
    match: {path: /app/**}
    require: {level: password}
"""


# The shipped nginx.conf asks the gateway over its unix socket (server.unix_socket).
SHIPPED_SOCKET = "server unix:/run/stepup-gateway/gateway.sock;"


def render_nginx(tmp: Path, port: int, gateway_socket: str, app_port: int) -> str:
    """The shipped server block with this run's socket and ports, in a minimal main config."""
    shipped = (DOCS / "nginx.conf").read_text()
    block = (
        shipped.replace(SHIPPED_SOCKET, f"server unix:{gateway_socket};")
        .replace("server 127.0.0.1:9000;", f"server 127.0.0.1:{app_port};")
        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
    )
    (tmp / "site.conf").write_text(block)
    return textwrap.dedent(f"""\
        pid {tmp}/nginx.pid;
        error_log {tmp}/error.log info;
        worker_processes 1;
        events {{ worker_connections 256; }}
        http {{
            access_log {tmp}/access.log;
            client_body_temp_path {tmp}/body;
            proxy_temp_path {tmp}/proxy;
            fastcgi_temp_path {tmp}/fastcgi;
            uwsgi_temp_path {tmp}/uwsgi;
            scgi_temp_path {tmp}/scgi;
            include {tmp}/site.conf;
        }}
        """)


def render_caddy(port: int, gateway_port: int, app_port: int) -> str:
    shipped = (DOCS / "Caddyfile").read_text()
    return (
        shipped.replace("127.0.0.1:8000", f"127.0.0.1:{gateway_port}")
        .replace("127.0.0.1:9000", f"127.0.0.1:{app_port}")
        .replace("http://app.example.com:8080", f"http://127.0.0.1:{port}")
    )


@dataclass
class Front:
    url: str  # the proxy's, which is also the gateway's public_url
    gateway: Gateway
    op: OpenIdProvider
    upstream: Any
    clock: Clock
    kind: str

    @property
    def seen(self) -> list[dict[str, Any]]:
        return list(self.upstream.app[SEEN])


def gateway_config(
    public_url: str,
    gateway_port: int,
    app_url: str,
    issuer: str,
    *,
    mode: str = "both",
    rules: str = RULES,
    unix_socket: str | None = None,
) -> str:
    trusted = "[127.0.0.1/32]" if unix_socket is None else "[127.0.0.1/32, unix]"
    server = textwrap.dedent(f"""\
        server:
          listen: 127.0.0.1:{gateway_port}
          public_url: {public_url}
          mode: {mode}
          trusted_proxies: {trusted}
        """)
    if unix_socket is not None:  # nginx's workers (another user) connect: open to all
        server += f"  unix_socket: {unix_socket}\n  unix_socket_mode: '0666'\n"
    return (
        server
        + textwrap.dedent(f"""\
        upstreams:
          app: {app_url}
        oidc:
          issuer: {issuer}
          client_id: gateway
          client_secret: {CLIENT_SECRET}
        session:
          secret: {SESSION_SECRET}
          cookie_secure: false
        """)
        + LEVELS_YAML
        + rules
    )


@pytest.fixture(params=["nginx", "caddy"])
async def front(
    request: pytest.FixtureRequest,
    op: OpenIdProvider,
    upstream: Any,
    clock: Clock,
    tmp_path: Path,
) -> AsyncIterator[Front]:
    kind = request.param
    port, gateway_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    app_url = str(upstream.make_url("")).rstrip("/")
    with socket_dir() as directory:
        unix = f"{directory}/gateway.sock" if kind == "nginx" else None
        text = gateway_config(url, gateway_port, app_url, op.issuer, unix_socket=unix)
        config = load_config_text(text, "fa.yaml")
        op.clients["gateway"].redirect_uris.append(f"{url}/_gateway/callback")
        async with (
            serving(Gateway(config, clock=clock), gateway_port) as gateway,
            front_proxy(kind, tmp_path, port, unix or gateway_port, upstream.port),
        ):
            yield Front(url, gateway, op, upstream, clock, kind)


@contextlib.contextmanager
def socket_dir() -> Iterator[str]:
    """A directory for the gateway's unix socket that nginx's workers (another user)
    may enter; short, as a socket path must be."""
    directory = tempfile.mkdtemp(prefix="stepup-", dir="/tmp")
    try:
        os.chmod(directory, 0o711)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def front_proxy(
    kind: str, tmp_path: Path, port: int, gateway: int | str, app_port: int
) -> AsyncIterator[None]:
    """nginx or Caddy with its shipped config, on ``port``, until the block ends;
    ``gateway``: its unix socket (nginx) or its port (Caddy)."""
    binary = shutil.which(kind) or (f"/usr/sbin/{kind}" if kind == "nginx" else None)
    assert binary and Path(binary).exists(), f"{kind} is not installed (scripts/test installs it)"
    if kind == "nginx":
        conf = tmp_path / "nginx.conf"
        assert isinstance(gateway, str), "the shipped nginx.conf asks over the unix socket"
        conf.write_text(render_nginx(tmp_path, port, gateway, app_port))
        argv = [binary, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"]
    else:
        conf = tmp_path / "Caddyfile"
        assert isinstance(gateway, int)
        conf.write_text(render_caddy(port, gateway, app_port))
        argv = [binary, "run", "--config", str(conf), "--adapter", "caddyfile"]
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    stderr = (tmp_path / "proxy.err").open("wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        await wait_for_port(port, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        stderr.close()


def saw(record: dict[str, Any], name: str) -> list[str]:
    return header_values(record, name)


async def test_browser_signs_in_through_the_proxy_and_the_app_gets_the_assurance(
    front: Front, browser: Browser
) -> None:
    final = await browser.follow(f"{front.url}/app/home?tab=2&x=1")
    assert final.status == 200, final.body
    record = json.loads(final.body)
    assert record["path_qs"] == "/app/home?tab=2&x=1"
    assert saw(record, "X-Auth-Subject") == ["user-1"]
    assert saw(record, "X-Auth-Level") == ["password"]
    assert saw(record, "X-Auth-Rule") == ["signed-in"]
    assertion = saw(record, "X-Auth-Assertion")[0]
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["aud"] == "app" and claims["sub"] == "user-1"
    # Every hop of the round trip went through the proxy's origin or the provider.
    hosts = {h.url.split("/")[2] for h in browser.hops}
    assert hosts <= {front.url.split("/")[2], front.op.issuer.split("/")[2]}


async def test_step_up_through_the_proxy(front: Front, browser: Browser) -> None:
    assert (await browser.follow(f"{front.url}/app/home")).status == 200
    front.op.behaviour.user = PHR_USER
    first = await browser.get(f"{front.url}/transfers/new")
    assert first.status == 302  # to /start (nginx) or straight to the provider (Caddy)
    final = await browser.follow(f"{front.url}/transfers/new")
    assert final.status == 200, final.body
    record = json.loads(final.body)
    assert saw(record, "X-Auth-Level") == ["phishing-resistant"]
    assert saw(record, "X-Auth-Acr") == ["phr"]
    authorize = [h for h in browser.hops if h.url.startswith(front.op.issuer)]
    assert query_of(authorize[-1].url)["acr_values"] == "phr phrh"


# Caddy hands no header of a 2xx auth answer to the client: nginx alone.
@pytest.mark.parametrize("front", ["nginx"], indirect=True)
async def test_the_idle_timeout_slides_through_nginx(front: Front, browser: Browser) -> None:
    assert (await browser.follow(f"{front.url}/app/home")).status == 200
    front.clock.advance(29 * 60)
    hop = await browser.get(f"{front.url}/app/x")
    assert hop.status == 200 and "stepup_session=" in hop.headers.get("Set-Cookie", "")
    front.clock.advance(29 * 60)
    assert (await browser.get(f"{front.url}/app/x")).status == 200
    front.clock.advance(31 * 60)
    assert (await browser.get(f"{front.url}/app/x")).status == 302


async def test_api_challenge_reaches_the_client(
    front: Front, browser: Browser, api: aiohttp.ClientSession
) -> None:
    async with api.get(f"{front.url}/app/data", headers={"Accept": "application/json"}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await browser.follow(f"{front.url}/app/home")).status == 200
    cookies = {m.key: m.value for m in browser.http.cookie_jar}
    async with api.get(
        f"{front.url}/transfers/list",
        headers={"Accept": "application/json"},
        cookies=cookies,
    ) as r:
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge
        assert 'acr_values="phr phrh"' in challenge
    assert all(not rec["path_qs"].startswith(("/app/data", "/transfers")) for rec in front.seen)


async def test_spoofed_headers_from_clients_never_reach_the_app(
    front: Front, api: aiohttp.ClientSession
) -> None:
    spoofed = {
        "X-Auth-Subject": "admin",
        "X-Auth-Level": "phishing-resistant",
        "X-Auth-Assertion": "forged",
        "X-Original-URL": f"{front.url}/public/x",
        "X-Original-Method": "GET",
        "X-Forwarded-Uri": "/public/x",
        "X-Forwarded-Method": "GET",
        "Accept": "application/json",
    }
    # Claiming to be a public page does not open a protected one ...
    async with api.get(f"{front.url}/app/secret", headers=spoofed) as r:
        assert r.status == 401
    # ... and on a public page the app sees none of the forged headers.
    async with api.get(f"{front.url}/public/page", headers=spoofed) as r:
        assert r.status == 200
        record = await r.json()
    # Not sent (nginx), or sent empty (Caddy 2.6 copies the gateway's empty value).
    for name in ("X-Auth-Subject", "X-Auth-Level", "X-Auth-Assertion"):
        assert saw(record, name) in ([], [""]), name
    assert saw(record, "X-Original-URL") == []
    assert saw(record, "X-Original-Method") == []
    assert saw(record, "X-Forwarded-Uri") == []


async def test_clients_cannot_ask_auth_through_the_proxy(
    front: Front, api: aiohttp.ClientSession
) -> None:
    for path in ("/_gateway/auth", "/_gateway/auth/envoy/public/x"):
        headers = {"X-Original-URL": f"{front.url}/public/x", "X-Original-Method": "GET"}
        async with api.get(f"{front.url}{path}", headers=headers) as r:
            assert r.status == 404, path
            assert not any(name.lower().startswith("x-auth-") for name in r.headers)


async def test_off_site_rd_is_refused(front: Front, api: aiohttp.ClientSession) -> None:
    for rd in ("https://evil.example/", "//evil.example/x", "http%3A%2F%2Fevil.example%2F"):
        async with api.get(f"{front.url}/_gateway/start?rd={rd}", allow_redirects=False) as r:
            assert r.status == 400, rd
            assert (await r.json())["error"] == "off_site_rd"


async def test_start_takes_the_level_from_the_rule(
    front: Front, api: aiohttp.ClientSession
) -> None:
    async with api.get(
        f"{front.url}/_gateway/start?rd=/transfers/x?level=password&acr_values=x",
        allow_redirects=False,
    ) as r:
        assert r.status == 302
        assert query_of(r.headers["Location"])["acr_values"] == "phr phrh"


async def test_a_rule_reading_the_body_fails_closed(
    front: Front, browser: Browser, api: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        async with api.post(
            f"{front.url}/pay/now", data={"amount": "5"}, headers={"Accept": "application/json"}
        ) as r:
            assert r.status in (403, 500)  # nginx turns an auth answer it can't pass into 500
    assert any(e["event"] == "forward_auth_needs_body" for e in logs)
    assert all(not rec["path_qs"].startswith("/pay") for rec in front.seen)


async def test_the_shipped_configs_are_what_the_suite_runs() -> None:
    shipped = (DOCS / "nginx.conf").read_text()
    for needle in (SHIPPED_SOCKET, "server 127.0.0.1:9000;", "listen 8080;"):
        assert shipped.count(needle) == 1, needle
    assert re.search(r"keepalive \d+;", shipped)
    caddy = (DOCS / "Caddyfile").read_text()
    for needle in ("127.0.0.1:8000", "127.0.0.1:9000", "http://app.example.com:8080"):
        assert needle in caddy, needle


# -- the gateway itself: who may ask, and what check refuses -----------------------


async def test_auth_refuses_an_untrusted_peer(
    op: OpenIdProvider, upstream: Any, clock: Clock
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    text = gateway_config(url, port, "http://127.0.0.1:9", op.issuer).replace(
        "  trusted_proxies: [127.0.0.1/32]\n", "  trusted_proxies: [10.0.0.0/8]\n"
    )
    async with serving(Gateway(load_config_text(text, "fa.yaml"), clock=clock), port):
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as http:
                headers = {"X-Original-URL": f"{url}/public/x", "X-Original-Method": "GET"}
                async with http.get(f"{url}/_gateway/auth", headers=headers) as r:
                    assert r.status == 403
        assert any(e["event"] == "forward_auth_untrusted_peer" for e in logs)


def test_check_refuses_a_body_rule_in_forward_auth_only_mode() -> None:
    issuer = "https://op.example.com"
    text = gateway_config("https://app.example.com", 8000, "http://127.0.0.1:9", issuer)
    text = text.replace("mode: both", "mode: forward_auth")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "fa.yaml")
    message = str(info.value)
    assert "by-amount" in message and "proxy" in message and "no body" in message
    load_config_text(text.replace("mode: forward_auth", "mode: both"), "fa.yaml")


@pytest.fixture
async def direct(op: OpenIdProvider, clock: Clock) -> AsyncIterator[str]:
    """The gateway alone (forward-auth on, loopback trusted, a host-scoped rule)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    text = gateway_config(url, port, "http://127.0.0.1:9", op.issuer) + (
        "  - name: admin-host\n"
        "    match: {path: /**, host: admin.example.com}\n"
        "    require: {level: mfa}\n"
    )
    async with serving(Gateway(load_config_text(text, "fa.yaml"), clock=clock), port):
        yield url


async def ask(url: str, path: str = "/_gateway/auth", **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        async with http.get(f"{url}{path}", headers=sent, allow_redirects=False) as r:
            return r.status, r.headers


async def test_the_described_path_is_normalised_as_in_proxy_mode(direct: str) -> None:
    assert (await ask(direct, X_Original_Method="GET", X_Original_URL=f"{direct}/public/a"))[
        0
    ] == 200
    # A dot segment that climbs out of /public is judged where it lands.
    status, headers = await ask(
        direct, X_Original_Method="GET", X_Original_URL=f"{direct}/public/%2e%2e/app/x"
    )
    assert status in (400, 401)
    status, _ = await ask(
        direct, X_Original_Method="GET", X_Original_URL=f"{direct}/public/..%2fapp/x"
    )
    assert status == 400
    status, headers = await ask(
        direct, X_Original_Method="GET", X_Original_URL=f"{direct}/public/../app/x"
    )
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")


async def test_an_unknown_host_is_421_and_the_gateways_paths_are_not_targets(
    direct: str,
) -> None:
    status, _ = await ask(
        direct, X_Original_Method="GET", X_Original_URL="http://other.example/public/a"
    )
    assert status == 421
    status, _ = await ask(
        direct, X_Original_Method="GET", X_Original_URL=f"{direct}/_gateway/healthz"
    )
    assert status == 400


async def test_envoy_describes_with_its_own_method_host_and_path(direct: str) -> None:
    host = direct.split("/")[2]
    status, headers = await ask(direct, "/_gateway/auth/envoy/public/a", Host=host)
    assert status == 200 and headers["Content-Length"] == "0"
    status, headers = await ask(
        direct, "/_gateway/auth/envoy/app/x?y=1", Host=host, Accept="text/html"
    )
    assert status == 302 and "acr_values=" in headers["Location"]
    status, _ = await ask(direct, "/_gateway/auth/envoy/x", Host="admin.example.com")
    assert status == 401  # the host-scoped rule judged it


async def test_traefik_style_headers_and_a_missing_description(direct: str) -> None:
    host = direct.split("/")[2]
    status, headers = await ask(
        direct,
        X_Forwarded_Method="GET",
        X_Forwarded_Proto="http",
        X_Forwarded_Host=host,
        X_Forwarded_Uri="/app/x",
        Sec_Fetch_Mode="navigate",
    )
    assert status == 302 and headers["Location"].startswith("http")
    assert (await ask(direct))[0] == 400


async def test_forward_auth_is_off_in_proxy_mode(op: OpenIdProvider, clock: Clock) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    text = gateway_config(url, port, "http://127.0.0.1:9", op.issuer).replace("  mode: both\n", "")
    async with serving(Gateway(load_config_text(text, "fa.yaml"), clock=clock), port):
        described = {"X_Original_Method": "GET", "X_Original_URL": f"{url}/public/a"}
        assert (await ask(url, **described))[0] == 404
        assert (await ask(url, "/_gateway/start?rd=/app/x"))[0] == 404
