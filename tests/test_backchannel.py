"""Back-channel logout from the demo provider, over real HTTP.

The demo provider sends a logout token (OpenID Connect Back-Channel Logout 1.0) to
each relying party of a provider session that ends.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port
from structlog.testing import capture_logs

from gateway.demo.backchannel import (
    BACKCHANNEL_LOGOUT_EVENT,
    BackchannelLogoutSender,
    logout_token_claims,
    sign_logout_token,
)
from gateway.demo.idp import IdentityProvider, ProviderSession
from gateway.demo.oauth import DemoClient
from gateway.oidc.flow import verify_logout_token
from tests.conftest import Browser, Clock, Hop, free_port
from tests.test_demo_idp import (
    CLIENT_ID,
    CLIENT_SECRET,
    POST_LOGOUT_URI,
    REDIRECT_URI,
    START,
    Flow,
    Page,
    sign_in_with_password,
)

SKEW_S = 60  # the gateway's default oidc.clock_skew


async def sign_out_at_the_provider(browser: Browser, idp_url: str, client_id: str) -> Hop:
    """The provider's own sign-out: end-session without a hint, then its Sign out button."""
    hop = await browser.get(f"{idp_url}/end-session?client_id={client_id}")
    page = Page(hop.url, hop.body)
    assert hop.status == 200 and page.has("sign-out"), hop
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.html))
    return await browser.request("POST", f"{idp_url}/end-session", data=fields)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# --- the logout token ----------------------------------------------------------------


def test_logout_token_is_one_the_gateway_accepts() -> None:
    idp = IdentityProvider(issuer="http://127.0.0.1:9", clients=[])
    claims = logout_token_claims(
        issuer=idp.issuer, client_id="rp", sub="alice", sid="op-sid", now=START + 0.7, jti="j-1"
    )
    assert claims == {
        "iss": idp.issuer,
        "aud": "rp",
        "iat": int(START),
        "exp": int(START) + 120,
        "jti": "j-1",
        "sub": "alice",
        "sid": "op-sid",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }  # and no nonce, ever: that is what keeps it from passing as an ID token
    token = sign_logout_token(claims, idp.key)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": idp.key.kid, "typ": "logout+jwt"}
    key = jwt.PyJWK(idp.jwks()["keys"][0])
    verified = verify_logout_token(
        token,
        key,
        issuer=idp.issuer,
        client_id="rp",
        now=START,
        skew_s=SKEW_S,
        allowed_algs=["ES256"],
    )
    assert (verified.sub, verified.sid, verified.jti) == ("alice", "op-sid", "j-1")


# --- the provider's side, against a relying party that records what it is sent --------


@dataclass
class Received:
    path: str
    content_type: str
    form: dict[str, str]


@dataclass
class RelyingParty:
    """Back-channel logout endpoints: /ok answers 200, /fail 500, /hang never."""

    url: str
    received: list[Received]
    release: asyncio.Event  # lets the /hang handler return once the test is over


@pytest.fixture
async def relying_party(aiohttp_server: Any) -> AsyncIterator[RelyingParty]:
    received: list[Received] = []
    release = asyncio.Event()

    async def endpoint(request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        received.append(Received(request.path, request.content_type, form))
        if request.path == "/hang":
            await release.wait()
        status = 500 if request.path == "/fail" else 200
        return web.Response(status=status, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_post("/{name}", endpoint)
    server = await aiohttp_server(app)
    rp = RelyingParty(str(server.make_url("")).rstrip("/"), received, release)
    yield rp
    release.set()


def demo_client(client_id: str, backchannel_logout_uri: str | None) -> DemoClient:
    return DemoClient(
        client_id=client_id,
        client_secret=CLIENT_SECRET,
        client_name="Demo Bank",
        redirect_uris=(REDIRECT_URI,),
        post_logout_redirect_uris=(POST_LOGOUT_URI,),
        backchannel_logout_uri=backchannel_logout_uri,
    )


async def provider(aiohttp_server: Any, clock: Clock, *clients: DemoClient) -> IdentityProvider:
    port = unused_port()
    idp = IdentityProvider(issuer=f"http://127.0.0.1:{port}", clients=clients, clock=clock)
    await aiohttp_server(idp.app(), port=port)
    return idp


def verified(idp: IdentityProvider, received: Received, client_id: str) -> dict[str, Any]:
    """The logout token's claims, checked as the gateway checks them, and its header."""
    assert received.content_type == "application/x-www-form-urlencoded"
    assert set(received.form) == {"logout_token"}
    token = received.form["logout_token"]
    assert jwt.get_unverified_header(token)["typ"] == "logout+jwt"
    key = jwt.PyJWK(idp.jwks()["keys"][0])
    verify_logout_token(
        token,
        key,
        issuer=idp.issuer,
        client_id=client_id,
        now=idp.clock(),
        skew_s=SKEW_S,
        allowed_algs=["ES256"],
    )
    # The signature and the claims passed just above; read them.
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def test_ending_a_session_tells_the_clients_that_took_part_in_it(
    aiohttp_server: Any, relying_party: RelyingParty
) -> None:
    clock = Clock(START)
    idp = await provider(
        aiohttp_server,
        clock,
        demo_client(CLIENT_ID, f"{relying_party.url}/ok"),
        demo_client("bystander", f"{relying_party.url}/bystander"),  # never signed in
    )
    discovery = idp.discovery()
    assert discovery["backchannel_logout_supported"] is True
    assert discovery["backchannel_logout_session_supported"] is True
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        flow = Flow.new(idp)
        reply = await sign_in_with_password(browser, idp, flow)
        tokens = await flow.redeem(browser, flow.callback(reply)["code"])
        id_claims = jwt.decode(tokens["id_token"], options={"verify_signature": False})
        clock.advance(30)
        params = {
            "id_token_hint": tokens["id_token"],
            "client_id": CLIENT_ID,
            "post_logout_redirect_uri": POST_LOGOUT_URI,
        }
        with capture_logs() as logs:
            reply = await browser.get(
                f"{idp.issuer}/end-session", params=params, allow_redirects=False
            )
        assert reply.status == 302 and reply.headers["Location"] == POST_LOGOUT_URI
    (received,) = relying_party.received  # the bystander got nothing
    assert received.path == "/ok"
    claims = verified(idp, received, CLIENT_ID)
    assert claims["sub"] == "alice" and claims["sid"] == id_claims["sid"]
    assert claims["iat"] == int(clock()) and "nonce" not in claims
    assert [(e["client_id"], e["status"]) for e in events(logs, "idp_backchannel_logout_sent")] == [
        (CLIENT_ID, 200)
    ]


async def test_another_user_signing_in_on_the_browser_ends_the_old_session(
    aiohttp_server: Any, relying_party: RelyingParty
) -> None:
    idp = await provider(
        aiohttp_server, Clock(START), demo_client(CLIENT_ID, relying_party.url + "/ok")
    )
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        alice = Flow.new(idp)
        alice_claims = await alice.id_token(
            browser, await sign_in_with_password(browser, idp, alice)
        )
        assert relying_party.received == []
        bob = Flow.new(idp, prompt="login")
        bob_claims = await bob.id_token(
            browser, await sign_in_with_password(browser, idp, bob, username="bob")
        )
    assert bob_claims["sub"] == "bob" and bob_claims["sid"] != alice_claims["sid"]
    (received,) = relying_party.received
    claims = verified(idp, received, CLIENT_ID)
    assert (claims["sub"], claims["sid"]) == ("alice", alice_claims["sid"])


@pytest.mark.parametrize("failure", ["fail", "hang", "refused"])
async def test_a_relying_party_that_fails_never_holds_up_the_others(
    relying_party: RelyingParty, failure: str
) -> None:
    idp = IdentityProvider(issuer="http://127.0.0.1:9", clients=[], clock=Clock(START))
    timeout_s = 0.3
    sender = BackchannelLogoutSender(
        issuer=idp.issuer, key=idp.key, clock=idp.clock, timeout_s=timeout_s
    )
    broken = (
        f"http://127.0.0.1:{free_port()}/nobody-listens"
        if failure == "refused"
        else f"{relying_party.url}/{failure}"
    )
    clients = [demo_client("broken", broken), demo_client("fine", f"{relying_party.url}/ok")]
    session = ProviderSession(sid="op-sid", username="alice", sub="alice", created_at=START)
    started = time.monotonic()
    with capture_logs() as logs:
        deliveries = await sender.send(session, clients)
    assert time.monotonic() - started < timeout_s + 1.0
    assert [(d.client_id, d.ok) for d in deliveries] == [("broken", False), ("fine", True)]
    assert deliveries[0].status == (500 if failure == "fail" else None)
    (failed,) = events(logs, "idp_backchannel_logout_failed")
    assert failed["client_id"] == "broken"
    assert "logout_token" not in str(failed)
    assert any(r.path == "/ok" for r in relying_party.received)


async def test_a_failing_relying_party_does_not_stop_the_sign_out(
    aiohttp_server: Any,
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/backchannel-logout"
    idp = await provider(aiohttp_server, Clock(START), demo_client(CLIENT_ID, nobody))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        browser = Browser(http)
        flow = Flow.new(idp)
        await flow.id_token(http, await sign_in_with_password(http, idp, flow))
        with capture_logs() as logs:
            hop = await sign_out_at_the_provider(browser, idp.issuer, CLIENT_ID)
    assert hop.status == 200 and "signed out" in hop.body
    assert idp.sessions == {}
    assert events(logs, "idp_backchannel_logout_failed")[0]["client_id"] == CLIENT_ID
