"""Several OpenID providers in one gateway (oidc.providers, rules[].provider).

An admin console signs in at the workforce provider (our test OP, the top-level
``oidc``: provider ``default``) and a customer app at the customer provider (node
oidc-provider, ``customers``). Every hop is real HTTP on loopback: the browser, both
providers, the gateway and the upstream that shows what it was sent.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest
from yarl import URL

from gateway.app import Gateway
from gateway.config import ConfigError, load_config_text
from gateway.session.model import Login, Proof, Session
from tests.conftest import (
    CLIENT_SECRET,
    LEVELS_YAML,
    SESSION_SECRET,
    Browser,
    Clock,
    free_port,
    query_of,
)
from tests.support.authz import AuthorizationServer, start_authorization_server
from tests.support.op import OpBehaviour, OpClient, OpenIdProvider, OpUser, start_op
from tests.support.serving import serving
from tests.support.upstream import SEEN, make_echo_app
from tests.test_operations import logout_token, post_logout_token

CUSTOMER_LEVELS = """\
      levels:
        - {name: password, acr: [urn:example:loa:1]}
        - {name: mfa, acr: [urn:example:loa:2]}
"""

RULES = """\
rules:
  - name: admin
    match: {path: /admin/**}
    require: {level: mfa}
  - name: customer-settings
    match: {path: /customer/settings/**}
    require: {level: mfa}
    provider: customers
  - name: customer
    match: {path: /customer/**}
    require: {level: password}
    provider: customers
  - name: rest
    match: {path: /**}
    require: none
"""


@dataclass
class Two:
    url: str
    workforce: OpenIdProvider  # provider "default"
    customers: AuthorizationServer  # provider "customers" (node oidc-provider)
    upstream: Any
    gateway: Gateway

    def seen_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.upstream.app[SEEN][-1]["headers"]}


def config_text(port: int, workforce: str, customers: str, upstream: str, store: str) -> str:
    return (
        textwrap.dedent(f"""\
        server:
          listen: 127.0.0.1:{port}
          public_url: http://127.0.0.1:{port}
          mode: both
          trusted_proxies: [127.0.0.1/32]
        upstreams:
          app: {upstream}
        oidc:
          issuer: {workforce}
          client_id: gateway
          client_secret: {CLIENT_SECRET}
          providers:
            customers:
              issuer: {customers}
              client_id: gateway-rp
              client_secret: test-client-secret
              scopes: [openid]
        """)
        + CUSTOMER_LEVELS
        + textwrap.dedent(f"""\
        session:
          secret: {SESSION_SECRET}
          store: {store}
          cookie_secure: false
        """)
        + LEVELS_YAML
        + RULES
    )


@pytest.fixture(params=["cookie", "redis"])
async def two(request: Any, aiohttp_server: Any, clock: Clock) -> AsyncIterator[Two]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    customers = start_authorization_server(
        env={
            "GATEWAY_REDIRECT_URI": f"{url}/_gateway/callback",
            "GATEWAY_LOGGED_OUT_URI": f"{url}/_gateway/logged-out",
        }
    )
    # The same sub string at both providers: it must still never stand for the other.
    workforce = await start_op(
        aiohttp_server,
        clients=[
            OpClient(
                client_id="gateway",
                client_secret=CLIENT_SECRET,
                redirect_uris=[f"{url}/_gateway/callback"],
                post_logout_redirect_uris=[f"{url}/_gateway/logged-out"],
            )
        ],
        behaviour=OpBehaviour(
            now=clock, user=OpUser(sub="alice", acr="urn:example:loa:2", amr=["pwd", "otp"])
        ),
    )
    upstream = await aiohttp_server(make_echo_app())
    text = config_text(
        port,
        workforce.issuer,
        customers.issuer,
        str(upstream.make_url("")).rstrip("/"),
        request.param,
    )
    if request.param == "redis":
        text = text.replace(
            "  store: redis\n",
            f"  store: redis\n  redis_url: redis://127.0.0.1:6379/0\n"
            f"  redis_prefix: 'several-{os.getpid()}-{port}:'\n",
        )
    gateway = Gateway(load_config_text(text, "several.yaml"), clock=clock)
    try:
        async with serving(gateway, port):
            yield Two(url, workforce, customers, upstream, gateway)
    finally:
        customers.stop()


def assertion_claims(headers: dict[str, str]) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        headers["x-auth-assertion"], options={"verify_signature": False}
    )
    return claims


async def sign_in_both(two: Two, browser: Browser) -> None:
    hop = await browser.follow(f"{two.url}/admin/console")
    assert hop.status == 200, hop.body
    hop = await browser.follow(f"{two.url}/customer/orders")
    assert hop.status == 200, hop.body


async def test_each_rule_signs_in_at_its_own_provider_and_gets_its_headers(
    two: Two, browser: Browser
) -> None:
    # The admin console: the workforce provider, at mfa.
    first = await browser.get(f"{two.url}/admin/console")
    assert first.status == 302
    assert first.headers["Location"].startswith(f"{two.workforce.issuer}/authorize?")
    hop = await browser.follow(f"{two.url}/admin/console")
    assert hop.status == 200, hop.body
    admin = two.seen_headers()
    assert admin["x-auth-subject"] == "alice"
    assert admin["x-auth-acr"] == "urn:example:loa:2"
    assert admin["x-auth-level"] == "mfa"
    assert assertion_claims(admin)["idp"] == two.workforce.issuer

    # The customer app needs the customer provider: the workforce sign-in, at a higher
    # level and with the same sub, is no proof there.
    asked = await browser.get(f"{two.url}/customer/orders")
    assert asked.status == 302
    location = asked.headers["Location"]
    assert location.startswith(f"{two.customers.issuer}/auth?"), location
    assert query_of(location)["client_id"] == "gateway-rp"
    assert query_of(location)["acr_values"] == "urn:example:loa:1"
    hop = await browser.follow(f"{two.url}/customer/orders")
    assert hop.status == 200, hop.body
    customer = two.seen_headers()
    assert customer["x-auth-subject"] == "alice"
    assert customer["x-auth-acr"] == "urn:example:loa:1"
    assert customer["x-auth-level"] == "password"
    assert customer["x-auth-rule"] == "customer"
    assert assertion_claims(customer)["idp"] == two.customers.issuer

    # Both proofs are kept, apart: the admin console still sees the workforce sign-in.
    again = await browser.get(f"{two.url}/admin/console")
    assert again.status == 200
    assert two.seen_headers()["x-auth-acr"] == "urn:example:loa:2"
    assert assertion_claims(two.seen_headers())["idp"] == two.workforce.issuer


async def test_the_customer_sign_in_alone_is_no_proof_for_the_admin_console(
    two: Two, browser: Browser
) -> None:
    # At mfa, the level the admin console needs: still the wrong provider's proof.
    hop = await browser.follow(f"{two.url}/customer/settings/password")
    assert hop.status == 200, hop.body
    assert two.seen_headers()["x-auth-acr"] == "urn:example:loa:2"
    # An API call (no redirect): the session holds no workforce sign-in at all.
    async with browser.http.get(
        f"{two.url}/admin/console", headers={"Accept": "application/json"}
    ) as resp:
        assert resp.status == 401
    asked = await browser.get(f"{two.url}/admin/console")
    assert asked.headers["Location"].startswith(f"{two.workforce.issuer}/authorize?")


async def test_a_session_saved_before_the_upgrade_still_serves_the_default_rules(
    two: Two, browser: Browser
) -> None:
    # A session exactly as a single-provider gateway writes it (format 1).
    old = sign_in("alice", "urn:example:loa:2", two.gateway.clock())
    assert old.to_dict()["v"] == 1
    value = await two.gateway.store.save(old, two.gateway.clock())
    browser.http.cookie_jar.update_cookies(
        {two.gateway.session_cookie: value}, response_url=URL(two.url)
    )
    hop = await browser.get(f"{two.url}/admin/console")
    assert hop.status == 200, hop.body
    assert two.seen_headers()["x-auth-subject"] == "alice"
    asked = await browser.get(f"{two.url}/customer/orders")
    assert asked.headers["Location"].startswith(f"{two.customers.issuer}/auth?")


async def test_a_code_from_the_other_provider_is_refused_mix_up(two: Two, browser: Browser) -> None:
    # The gateway starts a sign-in at the customer provider ...
    asked = await browser.get(f"{two.url}/customer/orders")
    params = query_of(asked.headers["Location"])
    # ... and the answer comes from the workforce provider (same redirect URI, same
    # state): RFC 9207's iss names the workforce provider, so the callback refuses it.
    params["client_id"] = "gateway"
    at_workforce = await browser.get(f"{two.workforce.issuer}/authorize?{urlencode(params)}")
    assert at_workforce.status == 302
    callback = at_workforce.headers["Location"]
    assert callback.startswith(f"{two.url}/_gateway/callback?")
    assert query_of(callback)["iss"] == two.workforce.issuer
    hop = await browser.get(callback, headers={"Accept": "application/json"})
    assert hop.status == 400
    assert json.loads(hop.body)["error"] == "callback_iss_mismatch"
    assert two.workforce.hits["token"] == 0  # the code was never redeemed
    # Nothing was signed in.
    again = await browser.get(f"{two.url}/customer/orders")
    assert again.status == 302


async def test_backchannel_logout_from_one_provider_ends_only_its_sign_in(
    two: Two, browser: Browser
) -> None:
    await sign_in_both(two, browser)
    async with aiohttp.ClientSession() as api:
        # The workforce provider ends alice's sessions there (a sub the customer
        # provider also has): the customer sign-in stays.
        jti = os.urandom(8).hex()
        token = logout_token(two.workforce, sub="alice", jti=jti)
        assert await post_logout_token(api, two.url, token) == 200
        ended = await browser.get(f"{two.url}/admin/console")
        assert ended.status == 302
        assert ended.headers["Location"].startswith(f"{two.workforce.issuer}/authorize?")
        kept = await browser.get(f"{two.url}/customer/orders")
        assert kept.status == 200
        assert two.seen_headers()["x-auth-rule"] == "customer"

        # Signing in at the workforce provider again works (a new sign-in, after the mark).
        two.workforce.behaviour.now = lambda: time.time() + 5
        two.gateway.clock = lambda: time.time() + 5
        hop = await browser.follow(f"{two.url}/admin/console")
        assert hop.status == 200, hop.body

        # A customer-provider logout token (its own key, its audience) ends that one only;
        # its jti is the workforce token's: unique per issuer, not across them.
        now = int(time.time()) + 5
        claims = {
            "iss": two.customers.issuer,
            "aud": "gateway-rp",
            "iat": now,
            "jti": jti,
            "sub": "alice",
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
        }
        signed = await customer_sign(two.customers.issuer, claims)
        assert await post_logout_token(api, two.url, signed) == 200
        assert (await browser.get(f"{two.url}/customer/orders")).status == 302
        assert (await browser.get(f"{two.url}/admin/console")).status == 200


async def customer_sign(issuer: str, payload: dict[str, Any]) -> str:
    from tests.support.authz import sign

    return await sign(issuer, {"typ": "logout+jwt"}, payload)


async def test_a_logout_token_of_one_provider_under_another_issuer_is_refused(
    two: Two, browser: Browser
) -> None:
    await sign_in_both(two, browser)
    # Signed by the customer provider but naming the workforce issuer: verified with
    # the workforce provider's keys (its iss), so the signature fails.
    claims = {
        "iss": two.workforce.issuer,
        "aud": "gateway",
        "iat": int(time.time()),
        "jti": os.urandom(8).hex(),
        "sub": "alice",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    }
    forged = await customer_sign(two.customers.issuer, claims)
    async with aiohttp.ClientSession() as api:
        assert await post_logout_token(api, two.url, forged) == 400
    assert (await browser.get(f"{two.url}/admin/console")).status == 200


async def test_logout_ends_every_sign_in_and_goes_to_the_latest_provider(
    two: Two, browser: Browser
) -> None:
    await sign_in_both(two, browser)
    hop = await browser.request("POST", f"{two.url}/_gateway/logout", headers={"Origin": two.url})
    assert hop.status == 303
    location = hop.headers["Location"]
    # The customer sign-in is the most recent one: its provider's end-session endpoint.
    assert location.startswith(f"{two.customers.issuer}/session/end"), location
    assert query_of(location)["client_id"] == "gateway-rp"
    assert (await browser.get(f"{two.url}/admin/console")).status == 302
    assert (await browser.get(f"{two.url}/customer/orders")).status == 302


async def test_forward_auth_judges_by_the_rule_provider(two: Two, browser: Browser) -> None:
    async def auth(path: str) -> tuple[int, dict[str, str]]:
        sent = {"X-Original-URL": f"{two.url}{path}", "X-Original-Method": "GET"}
        async with browser.http.get(
            f"{two.url}/_gateway/auth", headers=sent, allow_redirects=False
        ) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}

    hop = await browser.follow(f"{two.url}/admin/console")
    assert hop.status == 200, hop.body
    status, headers = await auth("/admin/console")
    assert status == 200 and headers["x-auth-acr"] == "urn:example:loa:2"
    status, _ = await auth("/customer/orders")
    assert status == 401  # the workforce sign-in is no proof for the customer app
    start = await browser.get(f"{two.url}/_gateway/start?rd={two.url}/customer/orders")
    assert start.status == 302
    assert start.headers["Location"].startswith(f"{two.customers.issuer}/auth?")
    hop = await browser.follow(f"{two.url}/customer/orders")
    assert hop.status == 200, hop.body
    status, headers = await auth("/customer/orders")
    assert status == 200 and headers["x-auth-acr"] == "urn:example:loa:1"
    assert assertion_claims(headers)["idp"] == two.customers.issuer
    status, headers = await auth("/admin/console")  # still the workforce sign-in's
    assert status == 200 and headers["x-auth-acr"] == "urn:example:loa:2"
    assert assertion_claims(headers)["idp"] == two.workforce.issuer


async def test_an_explicit_step_up_names_its_provider(two: Two, browser: Browser) -> None:
    base = f"{two.url}/_gateway/step-up?rd=/customer/orders"
    asked = await browser.get(f"{base}&provider=customers&level=mfa")
    assert asked.status == 302
    location = asked.headers["Location"]
    assert location.startswith(f"{two.customers.issuer}/auth?")
    assert query_of(location)["acr_values"] == "urn:example:loa:2"
    default = await browser.get(f"{base}&level=mfa")
    assert default.headers["Location"].startswith(f"{two.workforce.issuer}/authorize?")
    unknown = await browser.get(f"{base}&provider=partners&level=mfa")
    assert unknown.status == 400


# -- config --------------------------------------------------------------------------


def load(text: str) -> list[str]:
    try:
        load_config_text(text, "bad.yaml")
    except ConfigError as exc:
        return [str(problem) for problem in exc.problems]
    return []


BASE = config_text(
    8080,
    "https://login.example.com",
    "https://customers.example.net",
    "http://127.0.0.1:9000",
    "cookie",
)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("      scopes: [openid]\n", "      scopes: [openid]\n      profile: okta\n"),
            "levels[0].acr: 'urn:example:loa:1' is never asserted by okta",
        ),
        (
            ("provider: customers", "provider: partners"),
            "rules[2].provider: unknown provider 'partners'",
        ),
        (
            ("    customers:\n", "    'bad name':\n"),
            "oidc.providers.bad name: invalid provider name",
        ),
        (
            ("    customers:\n", "    default:\n"),
            "oidc.providers.default: 'default' is the provider",
        ),
        (("      client_id: gateway-rp\n", ""), "oidc.providers.customers.client_id"),
        (
            ("        - {name: password, acr: [urn:example:loa:1]}\n", ""),
            "rules[2].require.level",
        ),
    ],
)
def test_check_refuses_what_would_not_work(change: tuple[str, str], expected: str) -> None:
    assert change[0] in BASE
    problems = load(BASE.replace(*change))
    assert any(expected in problem for problem in problems), problems


def test_the_config_as_given_is_valid() -> None:
    assert load(BASE) == []


def test_check_says_what_each_provider_profile_implies(tmp_path: Any) -> None:
    from gateway.cli import main

    path = tmp_path / "several.yaml"
    # The customer provider is Okta and brings its own levels (password is one).
    assert CUSTOMER_LEVELS in BASE
    path.write_text(BASE.replace(CUSTOMER_LEVELS, "      profile: okta\n"))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check", "--config", str(path)]) == 0
    assert "provider customers: profile okta" in out.getvalue(), out.getvalue()


# -- sessions ------------------------------------------------------------------------


def sign_in(sub: str, acr: str, at: float, provider: str = "default") -> Session:
    return Session.start(
        Proof(acr, ("pwd",), at, "p1"),
        sub=sub,
        email=None,
        name=None,
        provider_sid="sid-1",
        id_token=None,
        now=at,
        provider=provider,
    )


def test_a_default_provider_session_is_written_as_before() -> None:
    session = sign_in("alice", "urn:example:loa:1", 1_700_000_000.0)
    data = session.to_dict()
    assert data["v"] == 1
    assert set(data) == {"v", "i", "s", "p", "a", "m", "at", "pr", "c", "l"}
    assert Session.from_dict(data) == session


def test_a_session_of_several_providers_is_written_as_pinned() -> None:
    # Format 2 as the cookie store writes it (compact JSON, keys in this order): a change
    # here is a change of format, which sessions already written must survive.
    workforce = Session.start(
        Proof("urn:example:loa:2", ("pwd",), 1_700_000_000.0, "p1"),
        sub="alice",
        email=None,
        name=None,
        provider_sid="sid-1",
        id_token=None,
        now=1_700_000_000.0,
        session_id="session-id",
        ip="192.0.2.1",
    )
    login = Login.first(
        Proof("urn:example:loa:1", ("pwd",), 1_700_000_100.0, "p2"),
        provider="customers",
        sub="alice",
        email="alice@example.com",
        name=None,
        provider_sid="other-sid",
        id_token=None,
        now=1_700_000_100.0,
        ip="192.0.2.2",
        binding="digest-1",
    )
    both = workforce.joined(login)
    assert json.dumps(both.to_dict(), separators=(",", ":")) == (
        '{"v":2,"i":"session-id","s":"alice","e":"alice@example.com","p":"other-sid",'
        '"a":"urn:example:loa:1","m":["pwd"],"at":1700000100,'
        '"pr":[["urn:example:loa:1",["pwd"],1700000100,"p2"]],"c":1700000000,"l":1700000000,'
        '"ip":"192.0.2.2","b":[["digest-1",1700000100]],"pv":"customers","ps":1700000100,'
        '"o":[{"pv":"default","c":1700000000,"s":"alice","p":"sid-1","a":"urn:example:loa:2",'
        '"m":["pwd"],"at":1700000000,"pr":[["urn:example:loa:2",["pwd"],1700000000,"p1"]],'
        '"ip":"192.0.2.1"}]}'
    )
    assert Session.from_dict(both.to_dict()) == both


def test_an_old_session_reads_as_the_default_provider_sign_in_only() -> None:
    old = {
        "v": 1,
        "i": "session-id",
        "s": "alice",
        "a": "urn:example:loa:2",
        "m": ["pwd", "otp"],
        "at": 1_700_000_000.0,
        "pr": [["urn:example:loa:2", ["pwd", "otp"], 1_700_000_000.0]],
        "c": 1_700_000_000.0,
        "l": 1_700_000_000.0,
    }
    session = Session.from_dict(old)
    assert session is not None
    assert session.provider == "default"
    assert session.for_provider("default") is session
    assert session.for_provider("customers") is None


def test_several_sign_ins_round_trip_and_stay_apart() -> None:
    workforce = sign_in("alice", "urn:example:loa:2", 1_700_000_000.0)
    login = Login.first(
        Proof("urn:example:loa:1", ("pwd",), 1_700_000_100.0, "p2"),
        provider="customers",
        sub="alice",
        email=None,
        name=None,
        provider_sid="other-sid",
        id_token=None,
        now=1_700_000_100.0,
    )
    both = workforce.joined(login)
    data = both.to_dict()
    assert data["v"] == 2  # a gateway that knows one provider refuses it (re-sign-in)
    again = Session.from_dict(data)
    assert again == both
    assert again is not None
    view = again.for_provider("default")
    assert view is not None and view.acr == "urn:example:loa:2" and view.provider == "default"
    customer = again.for_provider("customers")
    assert customer is not None and customer.acr == "urn:example:loa:1"
    assert customer.for_provider("default") == view
    assert again.without(frozenset({"default"})) == customer.without(frozenset({"default"}))
    # One sign-in per provider: a second copy of the same provider is malformed.
    data["o"][0]["pv"] = data["pv"]
    assert Session.from_dict(data) is None


def test_a_provider_session_is_refused_by_a_format_1_reader() -> None:
    # What a gateway from before several providers does with it: format 2 is unknown.
    data = sign_in("alice", "urn:example:loa:1", 1_700_000_000.0, provider="customers").to_dict()
    assert data["v"] == 2 and data["pv"] == "customers"
    data_as_v1 = {**data, "v": 1}
    legacy = Session.from_dict(data_as_v1)
    assert legacy is not None and legacy.provider == "default"  # why it must not say v1


def test_explain_names_the_rule_provider_and_what_it_would_ask(tmp_path: Any) -> None:
    import contextlib
    import io

    from gateway.cli import main

    path = tmp_path / "several.yaml"
    path.write_text(BASE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["explain", "--config", str(path), "GET", "http://127.0.0.1:8080/customer/orders"])
    answer = json.loads(out.getvalue())
    assert answer["rule"] == "customer"
    assert answer["provider"] == "customers"
    assert answer["issuer"] == "https://customers.example.net"
    assert answer["authorization"] == {"acr_values": "urn:example:loa:1"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["explain", "--config", str(path), "GET", "http://127.0.0.1:8080/admin/x"])
    answer = json.loads(out.getvalue())
    assert (answer["provider"], answer["issuer"]) == ("default", "https://login.example.com")


def test_an_access_token_of_the_default_issuer_is_no_proof_for_another_provider_rule() -> None:
    from gateway.decision import Allow, Challenge, decide_plain
    from gateway.tokens.claims import read_claims, session_of

    config = load_config_text(BASE, "several.yaml")
    now = time.time()
    token = read_claims(
        {
            "iss": "https://login.example.com",
            "sub": "alice",
            "aud": "https://api.example.com",
            "exp": int(now) + 60,
            "iat": int(now),
            "acr": "urn:example:loa:2",
            "auth_time": int(now),
            "client_id": "app",
        }
    )
    session = session_of(token, "t", now)
    rules = {rule.name: rule for rule in config.rules}
    admin = decide_plain(rules["admin"], session, config.assurance, now, by_token=True)
    assert isinstance(admin, Allow)
    customer = decide_plain(rules["customer"], session, config.assurance, now, by_token=True)
    assert isinstance(customer, Challenge)
