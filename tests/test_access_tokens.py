"""API clients with access tokens, against a real authorization server (node oidc-provider).

The RFC 9470 conversation end to end: call -> challenge -> new authorization with the
challenge's acr_values and max_age (PKCE) -> token -> retry -> forwarded; bearer and
DPoP. Then every refusal, each with a token that fails exactly one check: the bad
tokens are real ones with one thing changed, signed again with the server's own key,
and an unchanged re-signed token passes (so the one change is what is refused).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.conftest import Stack, StackFactory
from tests.support.authz import (
    JWT_AUDIENCE,
    OTHER_AUDIENCE,
    AuthorizationServer,
    DpopKey,
    authorize,
    authz,
    challenge_params,
    parts,
    sign,
)
from tests.support.upstream import header_values

__all__ = ["authz"]  # the fixture, imported for pytest

RULES = """\
rules:
  - name: transfers
    match: {path: /api/transfers/**, methods: [POST]}
    require: {level: phishing-resistant, max_age: 5m}
  - name: accounts
    match: {path: /api/**}
    require: {level: password}
    credentials: token
  - name: web
    match: {path: /app/**}
    require: {level: password}
    credentials: session
  - name: public
    match: {path: /public/**}
    require: none
"""


def api_section(**keys: str) -> str:
    lines = [f"  audience: {JWT_AUDIENCE}"] + [f"  {k}: {v}" for k, v in keys.items()]
    return "api:\n" + "\n".join(lines) + "\n"


async def gateway_for(make_stack: StackFactory, authz: AuthorizationServer, **api: str) -> Stack:
    stack = await make_stack(rules=RULES, extra=api_section(**api), issuer=authz.issuer)
    stack.clock.now = time.time()  # the authorization server's clock is the real one
    return stack


async def call(
    stack: Any,  # a Stack, or anything else with the url requests go to (a front proxy)
    method: str,
    path: str,
    *,
    token: str | None = None,
    scheme: str = "Bearer",
    proof: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"{scheme} {token}"
    if proof is not None:
        sent["DPoP"] = proof
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, stack.url + path, headers=sent, allow_redirects=False) as resp,
    ):
        text = await resp.text()
        body = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, dict(resp.headers), body


# --- the RFC 9470 conversation ----------------------------------------------------------


def assert_password_token_forwarded(echoed: dict[str, Any]) -> None:
    """The app got the password login's assurance, and not the client's token."""
    assert header_values(echoed, "X-Auth-Subject") == ["alice"]
    assert header_values(echoed, "X-Auth-Level") == ["password"]
    assert header_values(echoed, "X-Auth-Acr") == ["urn:example:loa:1"]
    assert header_values(echoed, "Authorization") == []  # not passed on by default


def transfer_challenge(headers: Mapping[str, str]) -> dict[str, str]:
    """The RFC 9470 challenge for a transfer (its parameters): phr, within 5 minutes."""
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="insufficient_user_authentication"')
    params = challenge_params(challenge)
    assert params["acr_values"] == "phr phrh" and params["max_age"] == "300"
    return params


async def stronger_token(issuer: str, params: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """What the client does with the challenge: a token for exactly that, and its claims."""
    stronger = await authorize(
        issuer, acr_values=params["acr_values"], max_age=int(params["max_age"])
    )
    claims = parts(stronger.access_token)[1]
    assert claims["acr"] == "phr" and claims["amr"] == ["hwk"]
    return stronger.access_token, claims


def assert_phr_forwarded(
    echoed: dict[str, Any], claims: Mapping[str, Any], received_at: float
) -> None:
    """The app got the stronger token's assurance, and an assertion that says so. Its
    time is the token's ``auth_time``, never later than when the gateway received it
    (``received_at``: the tests' gateway clock stands still, the provider's does not)."""
    assert header_values(echoed, "X-Auth-Level") == ["phishing-resistant"]
    assert header_values(echoed, "X-Auth-Rule") == ["transfers"]
    auth_time = int(min(claims["auth_time"], received_at))
    assert header_values(echoed, "X-Auth-Time") == [str(auth_time)]
    assertion = parts(header_values(echoed, "X-Auth-Assertion")[0])[1]
    assert assertion["acr"] == "phr" and assertion["aud"] == "app"


async def test_bearer_step_up_round_trip(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    first = await authorize(authz.issuer)  # a password login
    assert first.token_type == "Bearer"
    assert parts(first.access_token)[0]["typ"] == "at+jwt"

    status, _, echoed = await call(stack, "GET", "/api/accounts", token=first.access_token)
    assert status == 200
    assert_password_token_forwarded(echoed)
    assert header_values(echoed, "X-Auth-Amr") == ["pwd"]

    # The transfer needs more: RFC 9470's challenge, never a redirect.
    status, headers, body = await call(stack, "POST", "/api/transfers/1", token=first.access_token)
    assert status == 401
    params = transfer_challenge(headers)
    assert body["error"] == "insufficient_user_authentication"
    assert len(stack.seen) == 1  # nothing forwarded

    # The client asks its authorization server for exactly that, and retries.
    token, claims = await stronger_token(authz.issuer, params)
    status, _, echoed = await call(stack, "POST", "/api/transfers/1", token=token)
    assert status == 200
    assert_phr_forwarded(echoed, claims, stack.clock.now)


async def test_weaker_login_than_asked_is_challenged_again(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    # The user could only do one-time codes: the token says so, and is not enough.
    tokens = await authorize(authz.issuer, acr_values="phr", login_hint="acr=urn:example:loa:2")
    status, headers, _ = await call(stack, "POST", "/api/transfers/1", token=tokens.access_token)
    assert status == 401
    assert 'error="insufficient_user_authentication"' in headers["WWW-Authenticate"]


async def test_dpop_step_up_round_trip(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    key = DpopKey.generate()
    first = await authorize(authz.issuer, dpop=key)
    assert first.token_type == "DPoP"
    assert parts(first.access_token)[1]["cnf"] == {"jkt": key.thumbprint}

    url = stack.url + "/api/accounts"
    proof = key.proof("GET", url, access_token=first.access_token)
    status, _, echoed = await call(
        stack, "GET", "/api/accounts", token=first.access_token, scheme="DPoP", proof=proof
    )
    assert status == 200
    assert header_values(echoed, "DPoP") == [] and header_values(echoed, "Authorization") == []

    url = stack.url + "/api/transfers/1"
    proof = key.proof("POST", url, access_token=first.access_token)
    status, headers, _ = await call(
        stack, "POST", "/api/transfers/1", token=first.access_token, scheme="DPoP", proof=proof
    )
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('DPoP algs="ES256 ES384 EdDSA PS256 RS256", ')  # RFC 9449 7.1
    params = challenge_params(challenge)
    assert params["error"] == "insufficient_user_authentication"

    stronger = await authorize(
        authz.issuer, acr_values=params["acr_values"], max_age=int(params["max_age"]), dpop=key
    )
    proof = key.proof("POST", url, access_token=stronger.access_token)
    status, _, echoed = await call(
        stack, "POST", "/api/transfers/1", token=stronger.access_token, scheme="DPoP", proof=proof
    )
    assert status == 200
    assert header_values(echoed, "X-Auth-Level") == ["phishing-resistant"]


async def test_no_credentials_names_the_schemes(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    status, headers, _ = await call(stack, "GET", "/api/accounts")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer, DPoP algs="ES256 ES384 EdDSA PS256 RS256"'
    # A token-only route never sends a browser to sign in either.
    status, headers, _ = await call(stack, "GET", "/api/accounts", headers={"Accept": "text/html"})
    assert status == 401 and "Location" not in headers


async def test_token_on_a_session_only_route_is_refused(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    tokens = await authorize(authz.issuer)
    status, _, body = await call(stack, "GET", "/app/home", token=tokens.access_token)
    assert status == 401 and body["error"] == "invalid_token"
    assert stack.seen == []


async def test_upstream_may_keep_the_authorization_header(
    make_stack: StackFactory, authz: AuthorizationServer, upstream: Any
) -> None:
    base = str(upstream.make_url("")).rstrip("/")
    stack = await make_stack(
        rules=RULES,
        extra=api_section(),
        issuer=authz.issuer,
        upstream_url=f"{{url: '{base}', pass_authorization: true}}",
    )
    stack.clock.now = time.time()
    tokens = await authorize(authz.issuer)
    status, _, echoed = await call(stack, "GET", "/api/accounts", token=tokens.access_token)
    assert status == 200
    assert header_values(echoed, "Authorization") == [f"Bearer {tokens.access_token}"]


# --- refusals: one failed check each ----------------------------------------------------


async def resigned(authz: AuthorizationServer, token: str, **changes: Any) -> str:
    """``token`` with the header/payload changes given, signed again by the server."""
    header, payload = parts(token)
    header = {**header, **changes.pop("header", {})}
    payload = {**payload, **changes}
    return await sign(authz.issuer, header, payload)


BAD_TOKENS = {
    "typ": ({"header": {"typ": "JWT"}}, "typ"),
    "typ_absent": ({"header": {"typ": None}}, "typ"),
    "iss": ({"iss": "https://evil.example.com"}, "iss"),
    "aud": ({"aud": OTHER_AUDIENCE}, "aud"),
    "exp": ({"exp": int(time.time()) - 3600}, "exp"),
    "nbf": ({"nbf": int(time.time()) + 3600}, "nbf"),
    "nonce": ({"nonce": "n-0S6_WzA2Mj"}, "id_token"),
    "sub": ({"sub": ""}, "sub"),
    "client_id": ({"client_id": None}, "malformed"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_token_failing_one_check_is_refused(
    make_stack: StackFactory, authz: AuthorizationServer, case: str
) -> None:
    stack = await gateway_for(make_stack, authz)
    good = (await authorize(authz.issuer)).access_token
    control = await resigned(authz, good)
    assert (await call(stack, "GET", "/api/accounts", token=control))[0] == 200
    changes, reason = BAD_TOKENS[case]
    bad = await resigned(authz, good, **changes)
    with capture_logs() as logs:
        status, headers, body = await call(stack, "GET", "/api/accounts", token=bad)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert body["error"] == "invalid_token"
    assert len(stack.seen) == 1  # only the control
    refused = [e for e in logs if e["event"] == "access_token_refused"]
    assert [e["reason"] for e in refused] == [reason]


async def test_bad_signature_alg_none_and_id_token_are_refused(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    tokens = await authorize(authz.issuer)
    head, body, signature = tokens.access_token.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BA")
    header, _ = parts(tokens.access_token)
    unsigned_header = {**header, "alg": "none"}
    import base64

    def enc(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    cases = {
        "bad_signature": f"{head}.{body}.{flipped}",
        "alg": f"{enc(unsigned_header)}.{body}.",
        "typ": tokens.id_token,  # an ID token: typ absent/JWT, aud = the client
    }
    for reason, bad in cases.items():
        assert bad is not None
        with capture_logs() as logs:
            status, headers, _ = await call(stack, "GET", "/api/accounts", token=bad)
        assert status == 401, reason
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert [e["reason"] for e in logs if e["event"] == "access_token_refused"] == [reason]
    assert stack.seen == []


async def test_id_token_labelled_as_access_token_is_refused(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    tokens = await authorize(authz.issuer)
    assert tokens.id_token is not None
    # Even with typ at+jwt and the API's audience, its nonce gives it away.
    _, id_claims = parts(tokens.id_token)
    forged = await sign(
        authz.issuer,
        {"typ": "at+jwt"},
        {**id_claims, "aud": JWT_AUDIENCE, "client_id": "api-client", "nonce": "abc"},
    )
    with capture_logs() as logs:
        status, _, _ = await call(stack, "GET", "/api/accounts", token=forged)
    assert status == 401
    assert [e["reason"] for e in logs if e["event"] == "access_token_refused"] == ["id_token"]


async def test_token_for_another_audience_from_the_server_is_refused(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    other = await authorize(authz.issuer, resource=OTHER_AUDIENCE)
    status, _, body = await call(stack, "GET", "/api/accounts", token=other.access_token)
    assert status == 401 and body["error"] == "invalid_token"


async def test_expired_token_by_the_gateway_clock(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    tokens = await authorize(authz.issuer)
    assert (await call(stack, "GET", "/api/accounts", token=tokens.access_token))[0] == 200
    # The cached verification ends with the token: 300 s lifetime + 60 s skew.
    stack.clock.advance(tokens.expires_in + 61)
    status, headers, _ = await call(stack, "GET", "/api/accounts", token=tokens.access_token)
    assert status == 401
    assert 'error_description="The access token expired."' in headers["WWW-Authenticate"]


async def test_malformed_authorization_is_invalid_request(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, authz)
    status, headers, body = await call(
        stack, "GET", "/api/accounts", headers={"Authorization": "Bearer a b"}
    )
    assert status == 400 and body["error"] == "invalid_request"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_request"'


async def test_upstream_challenge_reaches_a_token_client_unchanged(
    make_stack: StackFactory, authz: AuthorizationServer, aiohttp_server: Any
) -> None:
    """A rule with upstream_challenge steps browsers up for the upstream; a request with
    an access token is no browser session, even when it looks like a navigation."""
    from aiohttp import web

    asked = 'Bearer error="insufficient_user_authentication", acr_values="phr", max_age=60'

    async def challenging(request: web.Request) -> web.Response:
        return web.Response(status=401, headers={"WWW-Authenticate": asked})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", challenging)
    server = await aiohttp_server(app)
    rules = RULES.replace(
        "    credentials: token\n", "    credentials: token\n    upstream_challenge: true\n"
    )
    stack = await make_stack(
        rules=rules,
        extra=api_section(),
        issuer=authz.issuer,
        upstream_url=str(server.make_url("")).rstrip("/"),
    )
    stack.clock.now = time.time()
    tokens = await authorize(authz.issuer)
    status, headers, _ = await call(
        stack,
        "GET",
        "/api/accounts",
        token=tokens.access_token,
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
    )
    assert status == 401 and "Location" not in headers
    assert headers["WWW-Authenticate"] == asked


async def test_a_token_is_judged_never_the_cookie_beside_it(
    make_stack: StackFactory, browser: Any
) -> None:
    """A browser session proving phishing-resistant does not carry a bad token through."""
    from tests.test_gateway import COOKIE, PHR_USER, sign_in

    stack = await make_stack(rules=RULES, extra=api_section())  # the Python test provider
    stack.op.behaviour.user = PHR_USER
    await sign_in(stack, browser, "/app/home")
    cookie = browser.cookie(COOKIE)
    assert cookie
    sent = {"Cookie": f"{COOKIE}={cookie}"}
    assert (await call(stack, "POST", "/api/transfers/1", headers=sent))[0] == 200
    forwarded = len(stack.seen)
    with capture_logs() as logs:
        status, headers, body = await call(
            stack, "POST", "/api/transfers/1", token="a.b.c", headers=sent
        )
    assert status == 401 and body["error"] == "invalid_token"
    assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert len(stack.seen) == forwarded
    assert [e["reason"] for e in logs if e["event"] == "access_token_refused"] == ["malformed"]


async def test_unknown_kid_is_refused_without_waiting(
    make_stack: StackFactory, authz: AuthorizationServer
) -> None:
    """The keys were fetched at start-up, under 5 s ago: an unknown kid may not refetch
    yet, and the request is refused at once rather than held until it may."""
    stack = await gateway_for(make_stack, authz)
    good = (await authorize(authz.issuer)).access_token
    bad = await resigned(authz, good, header={"kid": "not-a-key"})
    started = time.monotonic()
    with capture_logs() as logs:
        status, _, body = await call(stack, "GET", "/api/accounts", token=bad)
    assert time.monotonic() - started < 2
    assert status == 401 and body["error"] == "invalid_token"
    assert [e["reason"] for e in logs if e["event"] == "access_token_refused"] == ["kid"]
