"""Access tokens from several providers (the ``api`` section with ``oidc.providers``).

Two real authorization servers (node oidc-provider, two processes with no key id in
common): the workforce one is the top-level ``oidc`` (provider ``default``), the
customer one ``customers``. Each token is verified by the provider its ``iss`` names
(its keys, its issuer, its levels) and proves a sign-in there only; an opaque token is
introspected at the provider of the rule the request matches, and nowhere else.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.cli import explain
from gateway.config import ConfigError, load_config_text
from tests.conftest import CLIENT_SECRET, Stack, StackFactory
from tests.support.authz import (
    JWT_AUDIENCE,
    OPAQUE_AUDIENCE,
    AuthorizationServer,
    authorize,
    challenge_params,
    parts,
    sign,
    start_authorization_server,
)
from tests.support.upstream import header_values
from tests.test_access_tokens import call
from tests.test_several_providers import config_text

RULES = """\
rules:
  - name: accounts
    match: {path: /api/**}
    require: {level: password}
    credentials: token
  - name: customer-transfers
    match: {path: /customer-api/transfers/**, methods: [POST]}
    require: {level: strong}
    provider: customers
    credentials: token
  - name: customer
    match: {path: /customer-api/**}
    require: {level: basic}
    provider: customers
    credentials: token
"""


def providers_block(customers: str) -> str:
    # The customer provider's own levels: its strong level is phr alone (the
    # workforce's phishing-resistant level is [phr, phrh]), so a challenge shows whose.
    return f"""\
providers:
  customers:
    issuer: {customers}
    client_id: gateway
    client_secret: {CLIENT_SECRET}
    levels:
      - {{name: basic, acr: [urn:example:loa:1]}}
      - {{name: strong, acr: [phr]}}
"""


@pytest.fixture(scope="module")
def workforce() -> Iterator[AuthorizationServer]:
    server = start_authorization_server(env={"KID_PREFIX": "wf-"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def customers() -> Iterator[AuthorizationServer]:
    server = start_authorization_server(env={"KID_PREFIX": "cu-"})
    yield server
    server.stop()


async def gateway_for(
    make_stack: StackFactory,
    workforce: AuthorizationServer,
    customers: AuthorizationServer,
    *,
    api: str = "",
    audience: str = JWT_AUDIENCE,
    server_extra: str = "",
) -> Stack:
    stack = await make_stack(
        rules=RULES,
        issuer=workforce.issuer,
        oidc_extra=providers_block(customers.issuer),
        extra=f"api:\n  audience: {audience}\n{api}",
        server_extra=server_extra,
    )
    stack.clock.now = time.time()  # the authorization servers' clocks are the real ones
    return stack


def refused(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "access_token_refused"]


async def introspected(server: AuthorizationServer) -> list[str]:
    """The digests of the tokens ``server`` was asked to introspect."""
    async with aiohttp.ClientSession() as http, http.get(f"{server.issuer}/test/introspected") as r:
        assert r.status == 200
        seen: list[str] = await r.json()
        return seen


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- JWTs: the iss names the provider -------------------------------------------------


async def test_each_providers_token_passes_on_its_own_rules(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, workforce, customers)
    customer = (await authorize(customers.issuer)).access_token
    assert parts(customer)[0]["kid"] == "cu-es-1"  # a key the workforce server lacks
    status, _, echoed = await call(stack, "GET", "/customer-api/orders", token=customer)
    assert status == 200
    assert header_values(echoed, "X-Auth-Subject") == ["alice"]
    assert header_values(echoed, "X-Auth-Level") == ["basic"]  # the customer levels
    assert header_values(echoed, "X-Auth-Rule") == ["customer"]
    assertion = parts(header_values(echoed, "X-Auth-Assertion")[0])[1]
    assert assertion["idp"] == customers.issuer

    employee = (await authorize(workforce.issuer)).access_token
    status, _, echoed = await call(stack, "GET", "/api/accounts", token=employee)
    assert status == 200
    assert header_values(echoed, "X-Auth-Level") == ["password"]
    assert parts(header_values(echoed, "X-Auth-Assertion")[0])[1]["idp"] == workforce.issuer


async def test_a_token_never_stands_for_another_providers_sign_in(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, workforce, customers)
    # A phishing-resistant workforce token: more than the customer rule asks, of the
    # wrong provider. RFC 9470's challenge names what the customer provider needs.
    strong_employee = (await authorize(workforce.issuer, acr_values="phr")).access_token
    status, headers, body = await call(
        stack, "POST", "/customer-api/transfers/1", token=strong_employee
    )
    assert status == 401
    assert body["error"] == "insufficient_user_authentication"
    assert challenge_params(headers["WWW-Authenticate"])["acr_values"] == "phr"
    status, headers, _ = await call(stack, "GET", "/customer-api/orders", token=strong_employee)
    assert status == 401
    assert challenge_params(headers["WWW-Authenticate"])["acr_values"] == "urn:example:loa:1"

    # And the other way round: a customer token at its strongest on a workforce rule.
    strong_customer = (await authorize(customers.issuer, acr_values="phr")).access_token
    status, _, echoed = await call(
        stack, "POST", "/customer-api/transfers/1", token=strong_customer
    )
    assert status == 200  # the customer's strong level, at the customer rule
    assert header_values(echoed, "X-Auth-Level") == ["strong"]
    status, headers, _ = await call(stack, "GET", "/api/accounts", token=strong_customer)
    assert status == 401
    assert challenge_params(headers["WWW-Authenticate"])["acr_values"] == "urn:example:loa:1"
    assert len(stack.seen) == 1


async def test_a_token_is_verified_by_its_issuers_keys_only(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, workforce, customers)
    header, payload = parts((await authorize(workforce.issuer)).access_token)
    # The workforce's own token, signed again by it: passes (so only the key differs below).
    again = await sign(workforce.issuer, header, payload)
    assert (await call(stack, "GET", "/api/accounts", token=again))[0] == 200
    # The customer server signs a token claiming the workforce issuer: its key (known
    # to the gateway, as the customer provider's) vouches for nothing the workforce says.
    for kid, reason in (("cu-es-1", "kid"), ("wf-es-1", "bad_signature")):
        forged = await sign(customers.issuer, {**header, "kid": kid}, payload)
        for path in ("/api/accounts", "/customer-api/orders"):
            with capture_logs() as logs:
                status, headers, body = await call(stack, "GET", path, token=forged)
            assert status == 401, (kid, path)
            assert body["error"] == "invalid_token"
            assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
            assert refused(logs) == [reason]
    assert len(stack.seen) == 1


async def test_an_unknown_or_unlisted_issuer_is_invalid_token(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await gateway_for(make_stack, workforce, customers)
    header, payload = parts((await authorize(customers.issuer)).access_token)
    for iss in ("https://login.example.org", customers.issuer + "/", None):
        changed = {k: v for k, v in payload.items() if k != "iss"}
        if iss is not None:
            changed["iss"] = iss
        token = await sign(customers.issuer, header, changed)
        with capture_logs() as logs:
            status, _, body = await call(stack, "GET", "/customer-api/orders", token=token)
        assert (status, body["error"]) == (401, "invalid_token")
        assert refused(logs) == ["iss" if iss is not None else "malformed"]

    # api.providers leaves the customers out: their genuine tokens are unknown issuers.
    listed = await gateway_for(make_stack, workforce, customers, api="  providers: [default]\n")
    genuine = (await authorize(customers.issuer)).access_token
    assert (await call(stack, "GET", "/customer-api/orders", token=genuine))[0] == 200
    with capture_logs() as logs:
        status, _, _ = await call(listed, "GET", "/customer-api/orders", token=genuine)
    assert status == 401 and refused(logs) == ["iss"]
    employee = (await authorize(workforce.issuer)).access_token
    assert (await call(listed, "GET", "/api/accounts", token=employee))[0] == 200


# --- opaque tokens: introspected at the rule's provider only ------------------------------


async def introspecting_gateway(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> Stack:
    """Both providers, opaque tokens only: each introspected at its provider."""
    return await gateway_for(
        make_stack,
        workforce,
        customers,
        api="  tokens: [introspection]\n",
        audience=OPAQUE_AUDIENCE,
    )


async def opaque_token(provider: AuthorizationServer) -> str:
    return (await authorize(provider.issuer, resource=OPAQUE_AUDIENCE)).access_token


async def test_an_opaque_token_is_introspected_at_the_rules_provider_only(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await introspecting_gateway(make_stack, workforce, customers)
    customer = await opaque_token(customers)
    employee = await opaque_token(workforce)
    assert customer.count(".") == 0 and employee.count(".") == 0  # opaque

    status, _, echoed = await call(stack, "GET", "/customer-api/orders", token=customer)
    assert status == 200
    assert header_values(echoed, "X-Auth-Level") == ["basic"]
    status, _, echoed = await call(stack, "GET", "/api/accounts", token=employee)
    assert status == 200
    assert header_values(echoed, "X-Auth-Level") == ["password"]
    # Neither token went to the provider that did not issue it.
    assert digest(customer) not in await introspected(workforce)
    assert digest(employee) not in await introspected(customers)
    assert (await introspected(customers)).count(digest(customer)) == 1


async def test_cached_answers_are_kept_per_provider(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await introspecting_gateway(make_stack, workforce, customers)
    customer = await opaque_token(customers)
    # Sent to a workforce rule, the customer token is asked of the workforce provider
    # (the client sent it there), which does not know it: inactive, and remembered so ...
    for _ in range(2):
        with capture_logs() as logs:
            status, _, _ = await call(stack, "GET", "/api/accounts", token=customer)
        assert status == 401 and refused(logs) == ["inactive"]
    assert (await introspected(workforce)).count(digest(customer)) == 1
    # ... for the workforce provider only: at the customer rule it is active.
    for _ in range(2):
        status, _, echoed = await call(stack, "GET", "/customer-api/orders", token=customer)
        assert status == 200
        assert header_values(echoed, "X-Auth-Level") == ["basic"]
    assert (await introspected(customers)).count(digest(customer)) == 1  # then cached
    # The customer's active answer is no workforce answer either.
    with capture_logs() as logs:
        status, _, _ = await call(stack, "GET", "/api/accounts", token=customer)
    assert status == 401 and refused(logs) == ["inactive"]


# --- forward-auth -------------------------------------------------------------------------


async def test_forward_auth_judges_each_providers_token(
    make_stack: StackFactory, workforce: AuthorizationServer, customers: AuthorizationServer
) -> None:
    stack = await gateway_for(
        make_stack,
        workforce,
        customers,
        server_extra="mode: both\ntrusted_proxies: [127.0.0.1/32]\n",
    )
    customer = (await authorize(customers.issuer)).access_token
    employee = (await authorize(workforce.issuer, acr_values="phr")).access_token

    async def auth(path: str, token: str) -> tuple[int, dict[str, str]]:
        sent = {
            "X-Original-Method": "GET",
            "X-Original-URL": f"{stack.url}{path}",
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{stack.url}/_gateway/auth", headers=sent) as resp,
        ):
            return resp.status, dict(resp.headers)

    status, headers = await auth("/customer-api/orders", customer)
    assert status == 200
    assert headers["X-Auth-Level"] == "basic" and headers["X-Auth-Rule"] == "customer"
    assert parts(headers["X-Auth-Assertion"])[1]["idp"] == customers.issuer
    status, headers = await auth("/customer-api/orders", employee)
    assert status == 401
    params = challenge_params(headers["WWW-Authenticate"])
    assert params["error"] == "insufficient_user_authentication"
    assert params["acr_values"] == "urn:example:loa:1"
    status, headers = await auth("/api/accounts", employee)
    assert status == 200 and headers["X-Auth-Level"] == "phishing-resistant"


# --- explain --------------------------------------------------------------------------------


def test_explain_judges_a_token_by_the_provider_its_iss_names() -> None:

    workforce, customers = "https://login.example.com", "https://customers.example.com"
    text = config_text(8443, workforce, customers, "http://127.0.0.1:9000", "cookie")
    config = load_config_text(text + f"api:\n  audience: {JWT_AUDIENCE}\n", "c.yaml")
    now = 1_800_000_000
    claims = {
        "sub": "alice",
        "aud": JWT_AUDIENCE,
        "client_id": "app",
        "iat": now - 10,
        "exp": now + 300,
        "acr": "urn:example:loa:2",
        "amr": ["pwd", "otp"],
        "auth_time": now - 60,
    }

    def judged(path: str, **changes: object) -> dict[str, object]:
        result, status = explain(config, "GET", path, token_claims={**claims, **changes}, now=now)
        assert status == 0
        token = result["token"]
        assert isinstance(token, dict)
        return token

    assert judged("/customer/settings/x", iss=customers) == {
        "level": "mfa",
        "provider": "customers",
        "decision": "allow",
        "status": 200,
    }
    # The workforce's token: judged by the workforce, so no sign-in at the customers.
    other = judged("/customer/settings/x", iss=workforce)
    assert other["provider"] == "default" and other["decision"] == "challenge"
    assert judged("/admin/x", iss=workforce)["decision"] == "allow"
    assert judged("/admin/x", iss=customers)["decision"] == "challenge"
    assert judged("/admin/x", iss="https://elsewhere.example")["reason"] == "iss"
    # No iss (an introspection answer's may lack one): the rule's provider judges it.
    assert judged("/customer/x")["provider"] == "customers"


# --- configuration --------------------------------------------------------------------------


def test_api_providers_names_configured_providers_only() -> None:

    text = config_text(
        8443, "https://login.example.com", "https://c.example.com", "http://a", "cookie"
    )
    api = f"api:\n  audience: {JWT_AUDIENCE}\n"
    every = load_config_text(text + api, "c.yaml").api
    assert every is not None and every.providers is None
    listed = load_config_text(text + api + "  providers: [customers]\n", "c.yaml").api
    assert listed is not None and listed.providers == ("customers",)
    with pytest.raises(ConfigError) as refused:
        load_config_text(text + api + "  providers: [default, partners]\n", "c.yaml")
    assert "api.providers[1]" in str(refused.value)
    assert "unknown provider 'partners'" in str(refused.value)
    # Each accepted provider's keys are looked up under its own algorithms.
    narrow = text.replace(
        "      scopes: [openid]\n", "      scopes: [openid]\n      algorithms: [RS256]\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_config_text(narrow + api + "  algorithms: [ES256]\n", "c.yaml")
    assert "not in oidc.providers.customers.algorithms" in str(refused.value)
    load_config_text(narrow + api + "  algorithms: [ES256]\n  providers: [default]\n", "c.yaml")
