"""Each provider profile's full step-up, through the real gateway over HTTP, against a
stand-in that answers as that vendor documents (tests/support/vendors.py)."""

from __future__ import annotations

import contextlib
import json
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import load_config_text
from gateway.oidc.profiles import SIGNED_IN_ACR
from tests.conftest import CLIENT_SECRET, SESSION_SECRET, Browser, Clock, free_port
from tests.support.op import OpBehaviour, OpenIdProvider
from tests.support.serving import serving
from tests.support.upstream import SEEN
from tests.support.vendors import AUTH0_MFA, STAND_INS

RULES = """\
rules:
  - name: payees
    match: {path: /payees/**}
    require: {level: mfa}
  - name: signed-in
    match: {path: /app/**}
    require: {level: BASE}
"""

Start = Callable[..., Awaitable[tuple[str, OpenIdProvider, list[dict[str, Any]]]]]


@pytest.fixture
async def start(aiohttp_server: Any, upstream: Any, clock: Clock) -> AsyncIterator[Start]:
    """A stand-in for ``profile``'s vendor and a gateway with ``oidc.profile`` set and
    no assurance section: the profile's own levels."""
    running = contextlib.AsyncExitStack()

    async def factory(
        profile: str, *, base: str = "password", trailing_slash: bool = False
    ) -> tuple[str, OpenIdProvider, list[dict[str, Any]]]:
        op = STAND_INS[profile](behaviour=OpBehaviour(now=clock))
        server = await aiohttp_server(op.app)
        op.issuer = f"http://{server.host}:{server.port}" + ("/" if trailing_slash else "")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        text = textwrap.dedent(f"""\
            server:
              listen: 127.0.0.1:{port}
              public_url: {url}
            upstreams:
              app: {str(upstream.make_url("")).rstrip("/")}
            oidc:
              issuer: {op.issuer}
              client_id: gateway
              client_secret: {CLIENT_SECRET}
              profile: {profile}
            session:
              secret: {SESSION_SECRET}
              cookie_secure: false
            """) + RULES.replace("BASE", base)
        op.clients["gateway"].redirect_uris.append(f"{url}/_gateway/callback")
        gateway = Gateway(load_config_text(text, "test.yaml"), clock=clock)
        await running.enter_async_context(serving(gateway, port))
        return url, op, upstream.app[SEEN]

    async with running:
        yield factory


def _headers(seen: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in seen["headers"]}


async def _sign_in_then_step_up(
    browser: Browser, url: str, op: OpenIdProvider
) -> tuple[dict[str, str], dict[str, str]]:
    """Sign in at /app, then step up at /payees; the two authorization requests."""
    first = await browser.follow(f"{url}/app/home")
    assert first.status == 200, first.body
    sign_in = dict(op.authorization_requests[-1])
    final = await browser.follow(f"{url}/payees/list")
    assert len(op.authorization_requests) == 2
    return sign_in, {**op.authorization_requests[-1], "_status": str(final.status)}


async def test_entra_steps_up_with_an_authentication_context(start, browser):
    url, op, seen = await start("entra", base="signed-in")
    sign_in, step_up = await _sign_in_then_step_up(browser, url, op)
    # The plain sign-in asks for no context; the token has neither acr nor amr.
    assert "claims" not in sign_in and "acr_values" not in sign_in
    # The step-up asks for c1 the way Entra documents, and no acr_values.
    assert json.loads(step_up["claims"]) == {
        "id_token": {"acrs": {"essential": True, "value": "c1"}}
    }
    assert "acr_values" not in step_up
    assert step_up["_status"] == "200"
    headers = _headers(seen[-1])
    assert headers["x-auth-level"] == "mfa"
    assert headers["x-auth-acr"] == "c1"
    assert _headers(seen[0])["x-auth-acr"] == SIGNED_IN_ACR


async def test_entra_conditional_access_block_shows_a_clear_page(start, browser):
    url, op, seen = await start("entra", base="signed-in")
    op.vendor.reaches = set()  # type: ignore[attr-defined]
    assert (await browser.follow(f"{url}/app/home")).status == 200
    final = await browser.follow(f"{url}/payees/list")
    # Not a loop back to Entra and not a 502: a 403 saying a stronger sign-in is needed.
    assert final.status == 403
    assert "A stronger sign-in is needed" in final.body
    assert "no sign-in method strong enough" in final.body
    assert "needs the level &#x27;mfa&#x27;" in final.body or "needs the level 'mfa'" in final.body
    assert len(op.authorization_requests) == 2
    assert len(seen) == 1


async def test_entra_block_at_the_token_endpoint_shows_the_same_page(start, browser):
    # Entra can refuse at the token endpoint too: an error with numeric error_codes
    # (53003, blocked by Conditional Access), read as "cannot meet", not an outage.
    url, op, seen = await start("entra", base="signed-in")
    assert (await browser.follow(f"{url}/app/home")).status == 200
    op.behaviour.token_error = "invalid_grant"
    op.behaviour.token_error_codes = (53003,)
    final = await browser.follow(f"{url}/payees/list")
    assert final.status == 403
    assert "A stronger sign-in is needed" in final.body
    assert "no sign-in method strong enough" in final.body
    assert len(op.authorization_requests) == 2
    assert len(seen) == 1


async def test_okta_steps_up_with_its_predefined_acr_values(start, browser):
    url, op, seen = await start("okta")
    sign_in, step_up = await _sign_in_then_step_up(browser, url, op)
    assert sign_in["acr_values"].split()[0] == "urn:okta:loa:1fa:any"
    assert step_up["acr_values"] == "urn:okta:loa:2fa:any"
    assert "claims" not in step_up
    assert step_up["_status"] == "200"
    assert _headers(seen[-1])["x-auth-level"] == "mfa"
    assert _headers(seen[-1])["x-auth-amr"] == "pwd,mfa,otp"


async def test_okta_user_without_a_second_factor_is_refused(start, browser):
    url, op, seen = await start("okta")
    op.vendor.reaches = {"urn:okta:loa:1fa:any"}  # type: ignore[attr-defined]
    assert (await browser.follow(f"{url}/app/home")).status == 200
    final = await browser.follow(f"{url}/payees/list")
    assert final.status == 403
    assert "A stronger sign-in is needed" in final.body
    assert "signed you in with the level" in final.body
    assert len(seen) == 1


async def test_auth0_steps_up_with_the_mfa_acr_and_reads_amr(start, browser):
    url, op, seen = await start("auth0", base="signed-in", trailing_slash=True)
    sign_in, step_up = await _sign_in_then_step_up(browser, url, op)
    assert "acr_values" not in sign_in  # nothing to ask for a plain sign-in
    assert step_up["acr_values"] == AUTH0_MFA
    assert step_up["_status"] == "200"
    assert _headers(seen[-1])["x-auth-level"] == "mfa"
    assert _headers(seen[-1])["x-auth-amr"] == "mfa"


async def test_auth0_action_denial_is_shown_not_retried(start, browser):
    url, op, seen = await start("auth0", base="signed-in", trailing_slash=True)
    op.vendor.reaches = set()  # type: ignore[attr-defined]
    assert (await browser.follow(f"{url}/app/home")).status == 200
    final = await browser.follow(f"{url}/payees/list")
    assert final.status == 403
    assert "cancelled or refused at the identity provider" in final.body
    assert len(seen) == 1


async def test_keycloak_steps_up_with_an_essential_acr(start, browser):
    url, op, seen = await start("keycloak")
    sign_in, step_up = await _sign_in_then_step_up(browser, url, op)
    assert sign_in["acr_values"] == "1 0 silver"
    assert step_up["acr_values"] == "2 gold"
    assert json.loads(step_up["claims"]) == {
        "id_token": {"acr": {"essential": True, "values": ["2", "gold"]}}
    }
    assert step_up["_status"] == "200"
    assert _headers(seen[-1])["x-auth-level"] == "mfa"
    assert _headers(seen[-1])["x-auth-acr"] == "2"


async def test_keycloak_loa_not_reached_is_refused(start, browser):
    url, op, seen = await start("keycloak")
    op.vendor.reaches = {"1"}  # type: ignore[attr-defined]
    assert (await browser.follow(f"{url}/app/home")).status == 200
    final = await browser.follow(f"{url}/payees/list")
    assert final.status == 403
    assert "A stronger sign-in is needed" in final.body
    assert "signed you in with the level" in final.body
    assert len(seen) == 1


async def test_pingone_steps_up_with_a_sign_on_policy_name(start, browser):
    url, op, seen = await start("pingone")
    sign_in, step_up = await _sign_in_then_step_up(browser, url, op)
    assert sign_in["acr_values"] == "Single_Factor"
    assert step_up["acr_values"] == "Multi_Factor"
    assert step_up["_status"] == "200"
    assert _headers(seen[-1])["x-auth-level"] == "mfa"
    assert _headers(seen[-1])["x-auth-acr"] == "Multi_Factor"


async def test_pingone_policy_not_completed_is_refused(start, browser):
    url, op, seen = await start("pingone")
    op.vendor.reaches = {"Single_Factor"}  # type: ignore[attr-defined]
    assert (await browser.follow(f"{url}/app/home")).status == 200
    final = await browser.follow(f"{url}/payees/list")
    assert final.status == 403
    assert len(seen) == 1
