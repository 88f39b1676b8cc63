"""The demo identity provider and Demo Bank, through real HTTP on loopback.

A test "browser" (an aiohttp client with a cookie jar) walks each hop of a sign-in:
authorization request, the provider's pages and forms (CSRF tokens parsed from the
HTML), the redirect back, the code exchange, and the ID token's signature and
claims. Time moves with a fake clock, never by sleeping. Passkeys are made by a
small software authenticator (ES256, ``none``/``packed`` attestation) so the passkey
path runs without a browser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import cbor2
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from gateway.rules import RuleSet
from stepup_demo import DemoStack, approvals, factors, start_demo_stack
from stepup_demo import main as demo_main
from stepup_demo import risk as demo_risk
from stepup_demo.bank import DemoBank, parse_amount, verify_assertion
from stepup_demo.factors import (
    ACR_MFA,
    ACR_PASSWORD,
    ACR_PHISHING_RESISTANT,
    AcrRequest,
    Authentication,
    Factors,
    Step,
)
from stepup_demo.idp import IdentityProvider, is_loopback, refuse_public_bind
from stepup_demo.oauth import DemoClient

Server = Callable[..., Awaitable[TestServer]]

CLIENT_ID = "demo-rp"
CLIENT_SECRET = "demo-rp-secret"
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: tests read Location
POST_LOGOUT_URI = "http://127.0.0.1:9/logged-out"
START = 1_800_000_000.0
ALICE_SECRET = "BGHWJLB5ECG4WMRWV6KFKPBBHGBTMOB3"  # users.yaml


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def idp(aiohttp_server: Server, clock: Clock) -> IdentityProvider:
    port = unused_port()
    client = DemoClient(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        client_name="Demo Bank",
        redirect_uris=(REDIRECT_URI,),
        post_logout_redirect_uris=(POST_LOGOUT_URI,),
    )
    provider = IdentityProvider(issuer=f"http://127.0.0.1:{port}", clients=[client], clock=clock)
    await aiohttp_server(provider.app(), port=port)
    return provider


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: keep cookies for an IP-address host (127.0.0.1).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


# --- a relying party, a browser's hops, a software authenticator ----------------------


@dataclass
class Flow:
    """One authorization request, as a relying party makes it."""

    idp: IdentityProvider
    params: dict[str, str]
    verifier: str

    @classmethod
    def new(cls, idp: IdentityProvider, **extra: str) -> Flow:
        verifier = secrets.token_urlsafe(48)
        params = {
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "scope": "openid profile email",
            "state": secrets.token_urlsafe(16),
            "nonce": secrets.token_urlsafe(16),
            "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
            **extra,
        }
        return cls(idp, params, verifier)

    async def start(self, browser: aiohttp.ClientSession) -> aiohttp.ClientResponse:
        url = f"{self.idp.issuer}/authorize"
        return await browser.get(url, params=self.params, allow_redirects=False)

    def callback(self, response: aiohttp.ClientResponse) -> dict[str, str]:
        """The redirect back to the relying party: its query, checked for state and iss."""
        assert response.status == 302, response.status
        location = urlsplit(response.headers["Location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
        query = {k: v[0] for k, v in parse_qs(location.query).items()}
        assert query["state"] == self.params["state"]
        assert query["iss"] == self.idp.issuer  # RFC 9207
        return query

    async def redeem(
        self, browser: aiohttp.ClientSession, code: str, *, auth: str = "basic"
    ) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": self.verifier,
        }
        headers = {}
        if auth == "basic":
            headers["Authorization"] = aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)
        else:
            form |= {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        async with aiohttp.ClientSession() as rp:  # the back channel: no browser cookies
            reply = await rp.post(f"{self.idp.issuer}/token", data=form, headers=headers)
            body: dict[str, Any] = await reply.json()
            body["_status"] = reply.status
            return body

    async def id_token(
        self, browser: aiohttp.ClientSession, response: aiohttp.ClientResponse
    ) -> dict[str, Any]:
        """Finish the flow: code -> tokens -> a verified ID token's claims."""
        tokens = await self.redeem(browser, self.callback(response)["code"])
        assert tokens["_status"] == 200, tokens
        return verify_id_token(self.idp, tokens["id_token"], nonce=self.params["nonce"])


def verify_id_token(idp: IdentityProvider, token: str, *, nonce: str) -> dict[str, Any]:
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    key = jwt.PyJWKSet.from_dict(idp.jwks())[header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=CLIENT_ID,
        issuer=idp.issuer,
        # exp/iat are checked against the test's clock below, not the machine's.
        options={"verify_exp": False, "verify_iat": False, "require": ["exp", "iat", "sub"]},
    )
    assert claims["iat"] == int(idp.clock())
    assert claims["exp"] > idp.clock()
    assert claims["nonce"] == nonce
    return claims


@dataclass
class Page:
    url: str
    html: str

    def csrf(self) -> str:
        """The page's CSRF token (the passkey script reads the same from data-csrf-token)."""
        match = re.search(r'(?:name="csrf_token" value|data-csrf-token)="([^"]+)"', self.html)
        assert match, "no CSRF token on the page"
        return unescape(match.group(1))

    def action(self, suffix: str) -> str:
        for action in re.findall(r'<form method="post" action="([^"]+)"', self.html):
            if action.endswith(suffix):
                return unescape(action)
        raise AssertionError(f"no form posting to *{suffix}")

    def data(self, name: str) -> str:
        match = re.search(rf'data-{name}="([^"]*)"', self.html)
        assert match, f"no data-{name}"
        return unescape(match.group(1))

    def has(self, element_id: str) -> bool:
        return f'id="{element_id}"' in self.html


async def open_page(
    browser: aiohttp.ClientSession, idp: IdentityProvider, response: aiohttp.ClientResponse
) -> Page:
    """Follow a 303 to one of the provider's pages."""
    assert response.status == 303, (response.status, await response.text())
    url = idp.issuer + response.headers["Location"]
    reply = await browser.get(url, allow_redirects=False)
    assert reply.status == 200, (reply.status, await reply.text())
    assert reply.content_type == "text/html"
    return Page(url, await reply.text())


async def submit(
    browser: aiohttp.ClientSession,
    idp: IdentityProvider,
    page: Page,
    suffix: str,
    **fields: str,
) -> aiohttp.ClientResponse:
    data = {"csrf_token": page.csrf(), **fields}
    return await browser.post(idp.issuer + page.action(suffix), data=data, allow_redirects=False)


async def continue_to(
    browser: aiohttp.ClientSession, idp: IdentityProvider, response: aiohttp.ClientResponse
) -> aiohttp.ClientResponse:
    """After a successful step: the sign-in page, which may now send us back to the app."""
    assert response.status == 303, (response.status, await response.text())
    return await browser.get(idp.issuer + response.headers["Location"], allow_redirects=False)


async def sign_in_with_password(
    browser: aiohttp.ClientSession,
    idp: IdentityProvider,
    flow: Flow,
    username: str = "alice",
) -> aiohttp.ClientResponse:
    page = await open_page(browser, idp, await flow.start(browser))
    assert page.has("username") and page.has("password") and "Sign in" in page.html
    password = idp.users[username].password
    return await continue_to(
        browser,
        idp,
        await submit(browser, idp, page, "/password", username=username, password=password),
    )


def totp_now(clock: Clock) -> str:
    return factors.totp_code(ALICE_SECRET, clock())


@dataclass
class SoftAuthenticator:
    """A software WebAuthn authenticator: ES256 keys, ``none`` or ``packed`` self attestation."""

    attachment: str = "cross-platform"
    backup_eligible: bool = False
    user_verified: bool = True
    fmt: str = "none"
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    sign_count: int = 0

    def _flags(self, attested: bool) -> int:
        flags = 0x01  # UP
        if self.user_verified:
            flags |= 0x04  # UV
        if self.backup_eligible:
            flags |= 0x08 | 0x10  # BE, BS
        if attested:
            flags |= 0x40  # AT
        return flags

    def _client_data(self, kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}
        ).encode()

    def create(self, options: dict[str, Any], origin: str) -> dict[str, Any]:
        client_data = self._client_data("webauthn.create", options["challenge"], origin)
        numbers = self.key.public_key().public_numbers()
        cose_key = cbor2.dumps(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )
        auth_data = (
            hashlib.sha256(options["rp"]["id"].encode()).digest()
            + bytes([self._flags(attested=True)])
            + self.sign_count.to_bytes(4, "big")
            + bytes(16)  # AAGUID
            + len(self.credential_id).to_bytes(2, "big")
            + self.credential_id
            + cose_key
        )
        statement: dict[str, Any] = {}
        if self.fmt == "packed":  # self attestation: signed with the credential key itself
            signed = auth_data + hashlib.sha256(client_data).digest()
            statement = {"alg": -7, "sig": self.key.sign(signed, ec.ECDSA(hashes.SHA256()))}
        attestation = cbor2.dumps({"fmt": self.fmt, "attStmt": statement, "authData": auth_data})
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": self.attachment,
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": ["usb"] if self.attachment == "cross-platform" else ["internal"],
            },
        }

    def get(self, options: dict[str, Any], origin: str) -> dict[str, Any]:
        allowed = [unb64url(c["id"]) for c in options.get("allowCredentials", [])]
        assert self.credential_id in allowed
        assert options["userVerification"] == "required"
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        self.sign_count += 1
        auth_data = (
            hashlib.sha256(options["rpId"].encode()).digest()
            + bytes([self._flags(attested=False)])
            + self.sign_count.to_bytes(4, "big")
        )
        signed = auth_data + hashlib.sha256(client_data).digest()
        return {
            "id": b64url(self.credential_id),
            "rawId": b64url(self.credential_id),
            "type": "public-key",
            "authenticatorAttachment": self.attachment,
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(self.key.sign(signed, ec.ECDSA(hashes.SHA256()))),
                "userHandle": None,
            },
        }


async def post_json(
    browser: aiohttp.ClientSession,
    idp: IdentityProvider,
    page: Page,
    url: str,
    body: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    reply = await browser.post(idp.issuer + url, json=body, headers={"X-CSRF-Token": page.csrf()})
    return reply.status, await reply.json()


async def passkey_ceremony(
    browser: aiohttp.ClientSession,
    idp: IdentityProvider,
    page: Page,
    authenticator: SoftAuthenticator,
) -> tuple[int, dict[str, Any]]:
    """What passkey.js does when the button is pressed."""
    status, options = await post_json(browser, idp, page, page.data("options-url"), {})
    assert status == 200, options
    origin = idp.issuer
    if page.data("ceremony") == "create":
        credential = authenticator.create(options, origin)
    else:
        credential = authenticator.get(options, origin)
    return await post_json(browser, idp, page, page.data("verify-url"), {"credential": credential})


async def page_at(browser: aiohttp.ClientSession, idp: IdentityProvider, path: str) -> Page:
    reply = await browser.get(idp.issuer + path, allow_redirects=False)
    assert reply.status == 200, (reply.status, await reply.text())
    return Page(idp.issuer + path, await reply.text())


# --- discovery and keys -----------------------------------------------------------------


async def test_discovery_and_jwks(idp: IdentityProvider) -> None:
    async with aiohttp.ClientSession() as http:
        meta = await (await http.get(f"{idp.issuer}/.well-known/openid-configuration")).json()
        assert meta["issuer"] == idp.issuer
        for endpoint in ("authorization", "token", "userinfo", "end_session"):
            assert meta[f"{endpoint}_endpoint"].startswith(idp.issuer + "/")
        assert meta["authorization_response_iss_parameter_supported"] is True
        assert meta["acr_values_supported"] == [ACR_PHISHING_RESISTANT, ACR_MFA, ACR_PASSWORD]
        assert meta["claims_parameter_supported"] is True
        assert meta["authorization_details_types_supported"] == ["payment_initiation"]
        assert meta["backchannel_logout_supported"] is True
        assert meta["backchannel_logout_session_supported"] is True  # logout tokens carry sid
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert set(meta["token_endpoint_auth_methods_supported"]) == {
            "client_secret_basic",
            "client_secret_post",
        }
        jwks = await (await http.get(meta["jwks_uri"])).json()
    (key,) = jwks["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-256" and key["kid"]
    assert "d" not in key  # public part only


# --- password, TOTP, single sign-on -----------------------------------------------


@pytest.mark.parametrize("client_auth", ["basic", "post"])
async def test_password_sign_in_gives_loa1(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock, client_auth: str
) -> None:
    flow = Flow.new(idp)
    page = await open_page(browser, idp, await flow.start(browser))
    assert "Demo Bank asks you to sign in with your password" in page.html
    assert 'for="username"' in page.html and 'for="password"' in page.html
    response = await continue_to(
        browser,
        idp,
        await submit(
            browser, idp, page, "/password", username="alice", password="alice-demo-password"
        ),
    )
    tokens = await flow.redeem(browser, flow.callback(response)["code"], auth=client_auth)
    assert tokens["_status"] == 200, tokens
    claims = verify_id_token(idp, tokens["id_token"], nonce=flow.params["nonce"])
    assert claims["sub"] == "alice"
    assert claims["acr"] == ACR_PASSWORD
    assert claims["amr"] == ["pwd"]
    assert claims["auth_time"] == int(clock())
    assert claims["email"] == "alice@example.com" and claims["name"] == "Alice Adams"
    assert claims["email_verified"] is True  # or the gateway would not forward the email
    assert claims["sid"]
    async with aiohttp.ClientSession() as rp:
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        info = await (await rp.get(f"{idp.issuer}/userinfo", headers=headers)).json()
    assert info["sub"] == "alice" and info["email"] == "alice@example.com"


async def test_wrong_password_is_refused_on_the_page(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    page = await open_page(browser, idp, await Flow.new(idp).start(browser))
    reply = await submit(browser, idp, page, "/password", username="alice", password="nope")
    assert reply.status == 200
    html = await reply.text()
    assert 'role="alert"' in html and "do not match" in html
    assert 'value="alice"' in html  # what was typed stays


async def test_code_exchange_checks_secret_verifier_and_reuse(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp)
    code = flow.callback(await sign_in_with_password(browser, idp, flow))["code"]
    async with aiohttp.ClientSession() as rp:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": flow.verifier,
        }
        wrong_secret = await rp.post(
            f"{idp.issuer}/token",
            data=form,
            headers={"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, "wrong")},
        )
        assert wrong_secret.status == 401
        assert (await wrong_secret.json())["error"] == "invalid_client"
        wrong_verifier = await rp.post(
            f"{idp.issuer}/token",
            data=form | {"code_verifier": secrets.token_urlsafe(48)},
            headers={"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)},
        )
        assert (await wrong_verifier.json())["error"] == "invalid_grant"
    first = await flow.redeem(browser, code)
    assert first["_status"] == 200
    again = await flow.redeem(browser, code)
    assert again["_status"] == 400 and again["error"] == "invalid_grant"
    async with aiohttp.ClientSession() as rp:  # reuse revoked what the code bought
        headers = {"Authorization": f"Bearer {first['access_token']}"}
        assert (await rp.get(f"{idp.issuer}/userinfo", headers=headers)).status == 401


async def test_totp_step_up_gives_loa2(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    first = Flow.new(idp)
    await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    clock.advance(90)
    flow = Flow.new(idp, acr_values=f"{ACR_MFA} {ACR_PASSWORD}")
    page = await open_page(browser, idp, await flow.start(browser))
    # Signed in already: straight to the second factor, saying who asked for what.
    assert page.has("totp") and not page.has("password") and "Verify" in page.html
    assert "Demo Bank asks for a one-time code to continue" in page.html
    wrong = await submit(
        browser, idp, page, "/totp", totp="000000" if totp_now(clock) != "000000" else "111111"
    )
    assert "not right" in await wrong.text()
    response = await continue_to(
        browser, idp, await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    )
    claims = await flow.id_token(browser, response)
    assert claims["acr"] == ACR_MFA
    assert claims["amr"] == ["pwd", "otp"]
    assert claims["auth_time"] == int(clock())


async def test_totp_code_is_accepted_once_and_with_one_step_of_drift(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    code = totp_now(clock)
    clock.advance(factors.TOTP_STEP_S)  # the user typed last step's code: still fine
    flow = Flow.new(idp, acr_values=ACR_MFA)
    page = await open_page(browser, idp, await continue_to_page(browser, idp, flow))
    response = await continue_to(browser, idp, await submit(browser, idp, page, "/totp", totp=code))
    assert (await flow.id_token(browser, response))["acr"] == ACR_MFA
    # The same code again, in a new sign-in that needs a fresh one: refused (RFC 6238 5.2).
    again = Flow.new(idp, acr_values=ACR_MFA, prompt="login")
    page = await open_page(browser, idp, await again.start(browser))
    password = idp.users["alice"].password
    reply = await submit(browser, idp, page, "/password", username="alice", password=password)
    page = await open_page(browser, idp, reply)
    refused = await submit(browser, idp, page, "/totp", totp=code)
    assert "already used" in await refused.text()


async def continue_to_page(
    browser: aiohttp.ClientSession, idp: IdentityProvider, flow: Flow
) -> aiohttp.ClientResponse:
    """Start ``flow`` and sign in with alice's password: the 303 to the next step."""
    page = await open_page(browser, idp, await flow.start(browser))
    return await submit(
        browser, idp, page, "/password", username="alice", password=idp.users["alice"].password
    )


async def test_live_session_signs_in_without_a_prompt(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    first = Flow.new(idp)
    first_claims = await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    clock.advance(60)
    flow = Flow.new(idp, acr_values=ACR_PASSWORD)
    claims = await flow.id_token(browser, await flow.start(browser))  # a 302 straight back
    assert claims["auth_time"] == first_claims["auth_time"]  # no new authentication
    assert claims["sid"] == first_claims["sid"]


async def test_prompt_login_forces_reauthentication(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    first = Flow.new(idp)
    await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    clock.advance(30)
    flow = Flow.new(idp, prompt="login")
    page = await open_page(browser, idp, await flow.start(browser))
    assert page.has("password") and "sign in again" in page.html
    assert 'value="alice"' in page.html  # the session's user, prefilled
    reply = await submit(
        browser, idp, page, "/password", username="alice", password="alice-demo-password"
    )
    claims = await flow.id_token(browser, await continue_to(browser, idp, reply))
    assert claims["auth_time"] == int(clock())


async def test_max_age_is_honoured(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    first = Flow.new(idp)
    signed_in_at = (
        await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    )["auth_time"]
    clock.advance(200)
    fresh = Flow.new(idp, max_age="300")
    assert (await fresh.id_token(browser, await fresh.start(browser)))["auth_time"] == signed_in_at
    clock.advance(200)  # 400 s since sign-in now
    stale = Flow.new(idp, max_age="300")
    page = await open_page(browser, idp, await stale.start(browser))
    assert page.has("password") and "last 5 minutes" in page.html
    reply = await submit(
        browser, idp, page, "/password", username="alice", password="alice-demo-password"
    )
    claims = await stale.id_token(browser, await continue_to(browser, idp, reply))
    assert claims["auth_time"] == int(clock()) > signed_in_at


async def test_max_age_zero_is_met_by_the_sign_in_itself(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    first = Flow.new(idp)
    await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    flow = Flow.new(idp, max_age="0")
    page = await open_page(browser, idp, await flow.start(browser))  # asks again
    signed_in_at = int(clock())
    reply = await submit(
        browser, idp, page, "/password", username="alice", password="alice-demo-password"
    )
    clock.advance(2)  # the user is not instant: the proof just made must still count
    claims = await flow.id_token(browser, await continue_to(browser, idp, reply))
    assert claims["auth_time"] == signed_in_at


async def test_prompt_none_without_a_session_is_login_required(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp, prompt="none")
    assert flow.callback(await flow.start(browser))["error"] == "login_required"


@pytest.mark.parametrize(
    "extra",
    [
        {"acr_values": ACR_PHISHING_RESISTANT},
        {"acr_values": f"{ACR_PHISHING_RESISTANT} {ACR_MFA}"},
        {"claims": json.dumps({"id_token": {"acr": {"essential": True, "values": [ACR_MFA]}}})},
    ],
)
async def test_bob_cannot_meet_a_stronger_level(
    idp: IdentityProvider, browser: aiohttp.ClientSession, extra: dict[str, str]
) -> None:
    flow = Flow.new(idp, **extra)
    page = await open_page(browser, idp, await flow.start(browser))
    reply = await submit(
        browser, idp, page, "/password", username="bob", password="bob-demo-password"
    )
    query = flow.callback(await continue_to(browser, idp, reply))
    assert query["error"] == "unmet_authentication_requirements"
    assert "code" not in query


async def test_unmet_with_a_live_session_answers_at_once(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    first = Flow.new(idp)
    await first.id_token(browser, await sign_in_with_password(browser, idp, first, "bob"))
    flow = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT)
    assert flow.callback(await flow.start(browser))["error"] == "unmet_authentication_requirements"


# --- passkeys ------------------------------------------------------------------------


async def test_passkey_enrolment_needs_totp_in_the_same_sign_in(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    # Alice proved TOTP earlier, in another sign-in: that does not let her add a passkey.
    earlier = Flow.new(idp, acr_values=ACR_MFA)
    page = await open_page(browser, idp, await continue_to_page(browser, idp, earlier))
    await earlier.id_token(
        browser,
        await continue_to(
            browser, idp, await submit(browser, idp, page, "/totp", totp=totp_now(clock))
        ),
    )
    clock.advance(60)
    flow = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT)
    page = await open_page(browser, idp, await flow.start(browser))
    assert page.has("totp") and "You have no passkey yet" in page.html
    enrol_url = page.action("/totp").replace("/totp", "/enrol/options")
    status, body = await post_json(browser, idp, page, enrol_url, {})
    assert status == 403 and "one-time code" in body["error"]
    # A code in this sign-in opens enrolment, for a few minutes only.
    reply = await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    enrol = await open_page(browser, idp, reply)
    assert enrol.has("passkey-button") and "Create passkey" in enrol.html
    clock.advance(factors.ENROL_WINDOW_S + 1)
    status, body = await post_json(browser, idp, enrol, enrol.data("options-url"), {})
    assert status == 403
    assert idp.passkeys.for_user("alice") == []


async def test_passkey_enrolment_needs_the_right_page_token(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    flow = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT)
    page = await open_page(browser, idp, await continue_to_page(browser, idp, flow))
    enrol = await open_page(
        browser, idp, await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    )
    reply = await browser.post(
        idp.issuer + enrol.data("options-url"), json={}, headers={"X-CSRF-Token": "forged"}
    )
    assert reply.status == 403


@pytest.mark.parametrize(
    ("attachment", "backup_eligible", "fmt", "amr"),
    [
        ("cross-platform", False, "none", "hwk"),  # a security key
        ("cross-platform", False, "packed", "hwk"),
        ("platform", False, "none", "swk"),  # device-bound, but we can't tell it's hardware
        ("cross-platform", True, "none", "swk"),  # synced: the key leaves the device
    ],
)
async def test_passkey_sign_in_end_to_end(
    idp: IdentityProvider,
    browser: aiohttp.ClientSession,
    clock: Clock,
    attachment: str,
    backup_eligible: bool,
    fmt: str,
    amr: str,
) -> None:
    authenticator = SoftAuthenticator(
        attachment=attachment, backup_eligible=backup_eligible, fmt=fmt
    )
    flow = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT)
    page = await open_page(browser, idp, await flow.start(browser))
    assert (
        "Demo Bank asks for a passkey to continue: this action needs phishing-resistant sign-in"
        in page.html
    )
    reply = await submit(
        browser, idp, page, "/password", username="alice", password="alice-demo-password"
    )
    totp_page = await open_page(browser, idp, reply)
    enrol = await open_page(
        browser, idp, await submit(browser, idp, totp_page, "/totp", totp=totp_now(clock))
    )
    assert enrol.data("ceremony") == "create"
    status, body = await passkey_ceremony(browser, idp, enrol, authenticator)
    assert status == 200, body
    (passkey,) = idp.passkeys.for_user("alice")
    assert passkey.amr == amr
    use = await page_at(browser, idp, body["next"])
    assert use.data("ceremony") == "get" and "Use passkey" in use.html
    clock.advance(5)
    status, body = await passkey_ceremony(browser, idp, use, authenticator)
    assert status == 200, body
    response = await browser.get(idp.issuer + body["next"], allow_redirects=False)
    claims = await flow.id_token(browser, response)
    assert claims["acr"] == ACR_PHISHING_RESISTANT
    assert claims["amr"] == [amr]
    assert claims["auth_time"] == int(clock())
    # Next time: the session and the passkey, no password, no code.
    clock.advance(600)
    again = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT, max_age="300")
    use = await open_page(browser, idp, await again.start(browser))
    assert use.data("ceremony") == "get"
    status, body = await passkey_ceremony(browser, idp, use, authenticator)
    assert status == 200, body
    claims = await again.id_token(
        browser, await browser.get(idp.issuer + body["next"], allow_redirects=False)
    )
    assert claims["amr"] == [amr] and claims["auth_time"] == int(clock())


async def test_a_signed_in_user_stepping_up_is_asked_only_for_what_is_missing(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    first = Flow.new(idp)
    await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    clock.advance(60)
    # A new sign-in at phr (as a "once" rule asks): signed in with a password already,
    # alice is not asked for it again; with no passkey yet, a code, then she creates one.
    flow = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT, max_age="0", prompt="login")
    page = await open_page(browser, idp, await flow.start(browser))
    assert page.has("totp") and not page.has("password")
    assert "First, sign in with your password" not in page.html
    assert "You have no passkey yet" in page.html
    assert "a new sign-in even if you are signed in: your passkey is one" in page.html
    enrol = await open_page(
        browser, idp, await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    )
    assert enrol.data("ceremony") == "create"
    authenticator = SoftAuthenticator()
    status, body = await passkey_ceremony(browser, idp, enrol, authenticator)
    assert status == 200, body
    use = await page_at(browser, idp, body["next"])
    status, body = await passkey_ceremony(browser, idp, use, authenticator)
    assert status == 200, body
    claims = await flow.id_token(
        browser, await browser.get(idp.issuer + body["next"], allow_redirects=False)
    )
    assert (claims["acr"], claims["amr"]) == (ACR_PHISHING_RESISTANT, ["hwk"])
    # From now on: the passkey, and nothing else.
    clock.advance(60)
    again = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT, max_age="0", prompt="login")
    use = await open_page(browser, idp, await again.start(browser))
    assert use.data("ceremony") == "get"
    assert not use.has("password") and not use.has("totp")


async def _enrolled_passkey_page(
    idp: IdentityProvider,
    browser: aiohttp.ClientSession,
    clock: Clock,
    authenticator: SoftAuthenticator,
) -> Page:
    flow = Flow.new(idp, acr_values=ACR_PHISHING_RESISTANT)
    page = await open_page(browser, idp, await continue_to_page(browser, idp, flow))
    enrol = await open_page(
        browser, idp, await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    )
    status, body = await passkey_ceremony(browser, idp, enrol, authenticator)
    assert status == 200, body
    return await page_at(browser, idp, body["next"])


async def test_passkey_assertion_without_user_verification_is_refused(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    authenticator = SoftAuthenticator()
    use = await _enrolled_passkey_page(idp, browser, clock, authenticator)
    authenticator.user_verified = False  # presence only: one factor, not phr
    status, body = await passkey_ceremony(browser, idp, use, authenticator)
    assert status == 400 and "verif" in body["error"]


async def test_passkey_assertion_from_another_key_is_refused(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    authenticator = SoftAuthenticator()
    use = await _enrolled_passkey_page(idp, browser, clock, authenticator)
    impostor = SoftAuthenticator(credential_id=authenticator.credential_id)  # same id, other key
    status, body = await passkey_ceremony(browser, idp, use, impostor)
    assert status == 400 and "did not verify" in body["error"]


async def test_sign_in_is_bound_to_the_browser_that_started_it(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    response = await Flow.new(idp).start(browser)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        reply = await other.get(idp.issuer + response.headers["Location"], allow_redirects=False)
        assert reply.status == 400 and "expired" in await reply.text()


async def test_forms_need_their_csrf_token(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    page = await open_page(browser, idp, await Flow.new(idp).start(browser))
    reply = await browser.post(
        idp.issuer + page.action("/password"),
        data={"csrf_token": "forged", "username": "alice", "password": "alice-demo-password"},
        allow_redirects=False,
    )
    assert reply.status == 403


# --- approvals: authorization_details and binding_message --------------------------------


PAYMENT = [
    {"type": "payment_initiation", "amount": "250.00", "currency": "EUR", "payee": "ACME Ltd"}
]


def approval_of(page: Page) -> str:
    match = re.search(r'<p id="approval-text" class="approval-text">([^<]*)</p>', page.html)
    assert match, "no approval on the page"
    return unescape(match.group(1))


async def test_approved_details_come_back_in_the_id_token(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    # Signed in with a one-time code already: the approval still asks for the code.
    first = Flow.new(idp, acr_values=ACR_MFA)
    page = await open_page(browser, idp, await continue_to_page(browser, idp, first))
    reply = await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    plain = await first.id_token(browser, await continue_to(browser, idp, reply))
    assert "authorization_details" not in plain  # nothing asked, nothing echoed
    clock.advance(factors.TOTP_STEP_S)
    flow = Flow.new(
        idp,
        acr_values=ACR_MFA,
        authorization_details=json.dumps(PAYMENT),
        binding_message="Approve: amount 250.00, currency EUR, payee ACME Ltd",
    )
    page = await open_page(browser, idp, await flow.start(browser))  # no silent sign-on
    assert page.has("totp") and not page.has("password")
    assert approval_of(page) == "Approve transfer of 250.00 EUR to ACME Ltd"
    assert "confirm it again even if you are signed in" in page.html
    reply = await submit(browser, idp, page, "/totp", totp=totp_now(clock))
    claims = await flow.id_token(browser, await continue_to(browser, idp, reply))
    assert claims["acr"] == ACR_MFA and claims["auth_time"] == int(clock())
    assert claims["authorization_details"] == PAYMENT


async def test_the_passkey_page_shows_what_is_approved(
    idp: IdentityProvider, browser: aiohttp.ClientSession, clock: Clock
) -> None:
    authenticator = SoftAuthenticator()
    await _enrolled_passkey_page(idp, browser, clock, authenticator)
    clock.advance(60)
    details = [{**PAYMENT[0], "payee": "<b>Mallory</b> & Co", "amount": "9000.00"}]
    flow = Flow.new(
        idp,
        acr_values=ACR_PHISHING_RESISTANT,
        max_age="0",
        prompt="login",
        authorization_details=json.dumps(details),
    )
    use = await open_page(browser, idp, await flow.start(browser))
    assert use.data("ceremony") == "get"
    assert approval_of(use) == "Approve transfer of 9000.00 EUR to <b>Mallory</b> & Co"
    assert "<b>Mallory</b>" not in use.html  # escaped, never markup
    status, body = await passkey_ceremony(browser, idp, use, authenticator)
    assert status == 200, body
    response = await browser.get(idp.issuer + body["next"], allow_redirects=False)
    claims = await flow.id_token(browser, response)
    assert claims["acr"] == ACR_PHISHING_RESISTANT
    assert claims["authorization_details"] == details


async def test_other_details_are_shown_by_their_binding_message(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    details = [{"type": "payment_initiation", "amount": "250.00", "payee": "ACME"}]  # no currency
    flow = Flow.new(
        idp,
        authorization_details=json.dumps(details),
        binding_message="Approve: amount 250.00, payee ACME",
    )
    page = await open_page(browser, idp, await flow.start(browser))
    assert approval_of(page) == "Approve: amount 250.00, payee ACME"
    message_only = Flow.new(idp, binding_message="Delete tenant acme-prod")
    page = await open_page(browser, idp, await message_only.start(browser))
    assert approval_of(page) == "Delete tenant acme-prod"


async def test_an_approval_is_never_given_without_the_user(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    first = Flow.new(idp)
    await first.id_token(browser, await sign_in_with_password(browser, idp, first))
    flow = Flow.new(idp, prompt="none", authorization_details=json.dumps(PAYMENT))
    assert flow.callback(await flow.start(browser))["error"] == "login_required"


@pytest.mark.parametrize(
    ("details", "why"),
    [
        ("{not json", "not JSON"),
        (json.dumps(PAYMENT[0]), "an object, not an array"),
        ("[]", "empty"),
        ('["payment"]', "an entry that is not an object"),
        (json.dumps([{"amount": "1"}]), "no type"),
        (json.dumps([{"type": "account_information"}]), "a type this provider does not show"),
        (
            '[{"type": "payment_initiation", "amount": "1", "amount": "9000"}]',
            "a key given twice",
        ),
        (json.dumps([{**PAYMENT[0], "payee": "ACME \u202eLtd"}]), "a right-to-left override"),
        (json.dumps(PAYMENT * 6), "too many objects"),
        (json.dumps([{**PAYMENT[0], "note": "x" * 5000}]), "too long"),
    ],
)
async def test_unusable_authorization_details_are_refused(
    idp: IdentityProvider, browser: aiohttp.ClientSession, details: str, why: str
) -> None:
    flow = Flow.new(idp, authorization_details=details)
    query = flow.callback(await flow.start(browser))
    assert query["error"] == "invalid_authorization_details", why
    assert "code" not in query


async def test_an_overlong_binding_message_is_refused(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp, binding_message="x" * 201)
    assert flow.callback(await flow.start(browser))["error"] == "invalid_request"


# --- bad requests ------------------------------------------------------------------------


async def test_unregistered_redirect_uri_gets_a_page_not_a_redirect(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp, redirect_uri="http://evil.example/cb")
    response = await flow.start(browser)
    assert response.status == 400 and "Location" not in response.headers
    assert "not valid" in await response.text()


@pytest.mark.parametrize(
    ("extra", "drop"),
    [
        ({}, "code_challenge"),  # PKCE is required
        ({"code_challenge_method": "plain"}, None),
        ({"max_age": "soon"}, None),
        ({"claims": "{not json"}, None),
        ({}, "nonce"),
    ],
)
async def test_malformed_requests_go_back_as_invalid_request(
    idp: IdentityProvider, browser: aiohttp.ClientSession, extra: dict[str, str], drop: str | None
) -> None:
    flow = Flow.new(idp, **extra)
    if drop:
        del flow.params[drop]
    assert flow.callback(await flow.start(browser))["error"] == "invalid_request"


# --- logout -----------------------------------------------------------------------------


async def test_end_session_with_id_token_hint_signs_out_and_returns(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp)
    tokens = await flow.redeem(
        browser, flow.callback(await sign_in_with_password(browser, idp, flow))["code"]
    )
    params = {
        "id_token_hint": tokens["id_token"],
        "client_id": CLIENT_ID,
        "post_logout_redirect_uri": POST_LOGOUT_URI,
        "state": "bye",
    }
    reply = await browser.get(f"{idp.issuer}/end-session", params=params, allow_redirects=False)
    assert reply.status == 302
    assert reply.headers["Location"] == f"{POST_LOGOUT_URI}?state=bye"
    again = Flow.new(idp)
    assert (await again.start(browser)).status == 303  # a prompt again: the session is gone


async def test_end_session_never_redirects_to_an_unregistered_uri(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp)
    tokens = await flow.redeem(
        browser, flow.callback(await sign_in_with_password(browser, idp, flow))["code"]
    )
    params = {
        "id_token_hint": tokens["id_token"],
        "post_logout_redirect_uri": "http://evil.example/",
    }
    reply = await browser.get(f"{idp.issuer}/end-session", params=params, allow_redirects=False)
    assert reply.status == 200 and "signed out" in await reply.text()


async def test_end_session_without_hint_asks_first(
    idp: IdentityProvider, browser: aiohttp.ClientSession
) -> None:
    flow = Flow.new(idp)
    await flow.id_token(browser, await sign_in_with_password(browser, idp, flow))
    params = {"client_id": CLIENT_ID, "post_logout_redirect_uri": POST_LOGOUT_URI}
    reply = await browser.get(f"{idp.issuer}/end-session", params=params, allow_redirects=False)
    page = Page(str(reply.url), await reply.text())
    assert reply.status == 200 and page.has("sign-out")
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.html))
    confirmed = await browser.post(f"{idp.issuer}/end-session", data=fields, allow_redirects=False)
    assert confirmed.status == 302 and confirmed.headers["Location"] == POST_LOGOUT_URI


# --- Demo Bank ---------------------------------------------------------------------------


GATEWAY = "http://gateway.test"


@dataclass
class Bank:
    url: str
    key: ec.EllipticCurvePrivateKey
    kid: str

    def assertion(self, key: ec.EllipticCurvePrivateKey | None = None, **overrides: Any) -> str:
        now = int(time.time())  # pyjwt checks exp against the real clock
        claims = {
            "iss": GATEWAY,
            "aud": "bank",
            "iat": now,
            "exp": now + 60,
            "sub": "alice",
            "acr": "phr",
            "amr": ["hwk"],
            "level": "phishing-resistant",
            "rule": "transfer",
            **overrides,
        }
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"kid": self.kid})


@pytest.fixture
async def bank(aiohttp_server: Server) -> Bank:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk |= {"kid": "gateway-key", "use": "sig", "alg": "ES256"}

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    keys_app = web.Application()
    keys_app.router.add_get("/_gateway/jwks.json", jwks)
    keys = await aiohttp_server(keys_app)
    demo_bank = DemoBank(jwks_url=str(keys.make_url("/_gateway/jwks.json")), issuer=GATEWAY)
    server = await aiohttp_server(demo_bank.app())
    return Bank(str(server.make_url("")).rstrip("/"), key, "gateway-key")


def auth_headers(assertion: str) -> dict[str, str]:
    return {
        "X-Auth-Subject": "alice",
        "X-Auth-Acr": "phr",
        "X-Auth-Amr": "hwk",
        "X-Auth-Level": "phishing-resistant",
        "X-Auth-Rule": "transfer",
        "X-Auth-Assertion": assertion,
    }


async def test_bank_shows_headers_and_verifies_the_assertion(bank: Bank) -> None:
    async with aiohttp.ClientSession() as http:
        reply = await http.get(f"{bank.url}/", headers=auth_headers(bank.assertion()))
        html = await reply.text()
    assert reply.status == 200
    assert "assertion verified" in html and "X-Auth-Level" in html and "phishing-resistant" in html


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(
            lambda b: b.assertion(key=ec.generate_private_key(ec.SECP256R1())), id="other-key"
        ),
        pytest.param(lambda b: b.assertion(aud="admin"), id="other-audience"),
        pytest.param(lambda b: b.assertion(iss="http://elsewhere"), id="other-issuer"),
        pytest.param(lambda b: b.assertion(exp=1), id="expired"),
        pytest.param(
            lambda b: jwt.encode(
                {"sub": "alice", "aud": "bank"}, "k" * 32, algorithm="HS256", headers={"kid": b.kid}
            ),
            id="hmac",
        ),
        pytest.param(lambda b: "not-a-jwt", id="garbage"),
    ],
)
async def test_bank_rejects_a_forged_assertion(bank: Bank, forge: Callable[[Bank], str]) -> None:
    async with aiohttp.ClientSession() as http:
        page = await (await http.get(f"{bank.url}/", headers=auth_headers(forge(bank)))).text()
        assert "assertion not verified" in page
        form = await (
            await http.get(f"{bank.url}/transfers/new", headers=auth_headers(bank.assertion()))
        ).text()
        token = re.search(r"name='form_token' value='([^']+)'", form)
        assert token
        reply = await http.post(
            f"{bank.url}/transfers",
            headers=auth_headers(forge(bank)),
            data={"form_token": token.group(1), "payee": "Landlord Ltd", "amount": "10"},
        )
        assert reply.status == 403
        ledger = await (
            await http.get(f"{bank.url}/transfers", headers=auth_headers(bank.assertion()))
        ).text()
    assert "No transfers yet" in ledger


async def test_bank_admin_needs_a_verified_assertion(bank: Bank) -> None:
    async with aiohttp.ClientSession() as http:
        forged = await http.get(
            f"{bank.url}/admin", headers=auth_headers(bank.assertion(aud="admin"))
        )
        bare = await http.get(f"{bank.url}/admin")
        real = await http.get(f"{bank.url}/admin", headers=auth_headers(bank.assertion()))
    assert forged.status == bare.status == 403
    assert real.status == 200 and "Customers seen since start" in await real.text()


async def test_the_bank_listens_on_loopback_whatever_the_demo_host() -> None:
    # Only the gateway may reach the bank: a demo opened to a LAN must not open the bank.
    stack = await start_demo_stack(host="127.0.0.2")
    try:
        assert stack.bank_url.startswith("http://127.0.0.1:")
        assert stack.config.upstreams["bank"].url == stack.bank_url
        port = int(stack.bank_url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.2", port)
            writer.close()
    finally:
        await stack.close()


async def test_bank_transfer_confirms_what_the_gateway_asserted(bank: Bank) -> None:
    async with aiohttp.ClientSession() as http:
        headers = auth_headers(bank.assertion())
        form = await (await http.get(f"{bank.url}/transfers/new", headers=headers)).text()
        token = re.search(r"name='form_token' value='([^']+)'", form)
        assert token
        reply = await http.post(
            f"{bank.url}/transfers",
            headers=headers,
            data={
                "form_token": token.group(1),
                "payee": "Landlord Ltd",
                "amount": "25.50",
                "currency": "EUR",
            },
        )
        html = await reply.text()
        assert reply.status == 200, html
        assert "Sent EUR 25.50 to Landlord Ltd." in html
        assert "acr=phr" in html and "amr=hwk" in html
        bad_token = await http.post(
            f"{bank.url}/transfers",
            headers=headers,
            data={"form_token": "x", "payee": "Landlord Ltd", "amount": "1", "currency": "EUR"},
        )
        assert bad_token.status == 403
        public = await (await http.get(f"{bank.url}/public/about")).text()
        assert "no X-Auth-Assertion header" in public


async def form_token(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    token = re.search(
        r"name='form_token' value='([^']+)'", await (await http.get(url, headers=headers)).text()
    )
    assert token
    return token.group(1)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"payee": "Mallory", "amount": "10", "currency": "EUR"}, "Choose one of your payees."),
        ({"payee": "ACME Ltd", "amount": "10", "currency": "USD"}, "Choose a currency: EUR."),
        ({"payee": "ACME Ltd", "amount": "10000.01", "currency": "EUR"}, "Enter an amount"),
    ],
)
async def test_bank_refuses_a_transfer_it_cannot_make(
    bank: Bank, fields: dict[str, str], problem: str
) -> None:
    async with aiohttp.ClientSession() as http:
        headers = auth_headers(bank.assertion())
        token = await form_token(http, f"{bank.url}/transfers/new", headers)
        reply = await http.post(
            f"{bank.url}/transfers", headers=headers, data={"form_token": token, **fields}
        )
        assert reply.status == 400 and problem in await reply.text()
        ledger = await (await http.get(f"{bank.url}/transfers", headers=headers)).text()
    assert "No transfers yet" in ledger


@pytest.mark.parametrize(
    ("amount", "assertion", "moved"),
    [
        ("1000.00", {"acr": "urn:stepup:loa:1", "amr": ["pwd"]}, True),
        ("1500.00", {"acr": "urn:stepup:loa:1", "amr": ["pwd"]}, False),
        ("1500.00", {"acr": "phr", "auth_time": "recent"}, True),
        ("1500.00", {"acr": "phr", "auth_time": "stale"}, False),
    ],
)
async def test_bank_asks_for_a_passkey_itself_above_1000(
    bank: Bank, amount: str, assertion: dict[str, Any], moved: bool
) -> None:
    now = int(time.time())
    ages = {"recent": now - 60, "stale": now - 6 * 60}
    claims = {**assertion, "auth_time": ages.get(assertion.get("auth_time", ""), now - 30)}
    async with aiohttp.ClientSession() as http:
        headers = auth_headers(bank.assertion(**claims))
        token = await form_token(http, f"{bank.url}/savings", headers)
        reply = await http.post(
            f"{bank.url}/savings", headers=headers, data={"form_token": token, "amount": amount}
        )
        html = await reply.text()
    if moved:
        assert reply.status == 200 and f"Moved EUR {Decimal(amount):,.2f} to savings." in html
    else:
        assert reply.status == 401
        challenge = reply.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer error="insufficient_user_authentication"')
        assert 'acr_values="phr"' in challenge and challenge.endswith("max_age=300")
        assert "was not moved" in html


async def test_bank_keeps_standing_orders(bank: Bank) -> None:
    async with aiohttp.ClientSession() as http:
        headers = auth_headers(bank.assertion(acr="urn:stepup:loa:2", amr=["pwd", "otp"]))
        token = await form_token(http, f"{bank.url}/standing-orders", headers)
        fields = {
            "payee": "City Power",
            "amount": "45.00",
            "currency": "EUR",
            "frequency": "monthly",
        }
        reply = await http.post(
            f"{bank.url}/standing-orders", headers=headers, data={"form_token": token, **fields}
        )
        assert reply.status == 200
        assert "Standing order set up: EUR 45.00 to City Power, monthly." in await reply.text()
        listed = await (await http.get(f"{bank.url}/standing-orders", headers=headers)).text()
    assert listed.count("class='standing-order'") == 1 and "acr=urn:stepup:loa:2" in listed


async def test_bank_payee_names_stay_unique(bank: Bank) -> None:
    """Payments name a payee by name (that is what an approval shows): one name, one payee."""
    async with aiohttp.ClientSession() as http:
        headers = auth_headers(bank.assertion())
        token = await form_token(http, f"{bank.url}/payees", headers)
        fields = {"payee": "new", "name": "ACME Ltd", "iban": "DE89370400440532013000"}
        reply = await http.post(
            f"{bank.url}/payees", headers=headers, data={"form_token": token, **fields}
        )
        assert reply.status == 400 and "has that name already" in await reply.text()


async def test_bank_lets_form_posts_go_on_to_the_provider() -> None:
    bank = DemoBank(
        jwks_url="http://127.0.0.1:9/jwks.json", issuer=GATEWAY, form_targets=("http://idp.test",)
    )
    assert "form-action 'self' http://idp.test;" in bank.csp


@dataclass
class OneKey:
    """Stands in for PyJWKClient: every token is checked against this one key."""

    key: ec.EllipticCurvePrivateKey

    def get_signing_key_from_jwt(self, token: str) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()


@pytest.mark.parametrize(
    ("seconds_after_iat", "error"),
    [
        (0, None),
        (59, None),
        (60, jwt.ExpiredSignatureError),  # exp = iat + 60 is already too late
        (-1, jwt.ImmatureSignatureError),  # issued "in the future"
    ],
)
def test_bank_judges_assertion_times_by_its_own_clock(
    seconds_after_iat: int, error: type[Exception] | None
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    iat = int(START)  # years from the system clock: only `now` can make this valid
    claims = {"iss": GATEWAY, "aud": "bank", "sub": "alice", "iat": iat, "exp": iat + 60}
    token = jwt.encode(claims, key, algorithm="ES256")

    def check() -> dict[str, Any]:
        return verify_assertion(
            token,
            OneKey(key),  # type: ignore[arg-type]
            audience="bank",
            issuer=GATEWAY,
            now=iat + seconds_after_iat,
        )

    if error is None:
        assert check()["sub"] == "alice"
    else:
        with pytest.raises(error):
            check()


# --- the demo stack ---------------------------------------------------------------------


async def test_demo_stack_starts_with_a_gateway_config_that_fits() -> None:
    stack = await start_demo_stack()
    try:
        config = stack.config
        server = config.server
        assert server.public_url == stack.gateway_url
        assert config.oidc.issuer == stack.idp_url
        assert config.upstreams["bank"].url == stack.bank_url
        assert config.session.cookie_secure is False
        (client,) = stack.idp.store.clients.values()
        assert client.client_secret == config.oidc.client_secret
        assert client.redirect_uris == (f"{server.public_url}{server.internal_prefix}/callback",)
        levels = {level.name: level for level in config.assurance.levels}
        assert levels["phishing-resistant"].acr == (ACR_PHISHING_RESISTANT,)
        assert levels["mfa"].acr == (ACR_MFA,) and levels["password"].acr == (ACR_PASSWORD,)
        rules = RuleSet(config.rules)
        expected = {
            ("POST", "/transfers"): ("transfer", "phishing-resistant", 300),
            ("GET", "/transfers/new"): ("signed-in", "password", None),  # the form opens
            ("GET", "/transfers"): ("signed-in", "password", None),
            ("POST", "/standing-orders"): ("standing-order", "mfa", None),
            ("POST", "/savings"): ("savings", "password", None),
            ("POST", "/payees"): ("payees", "mfa", None),
            ("GET", "/payees"): ("signed-in", "password", None),
            ("GET", "/public/about"): ("public", None, None),
            ("GET", "/admin"): ("signed-in", "password", None),
        }
        for (method, path), (name, level, max_age_s) in expected.items():
            rule = rules.match(method, None, path)
            assert rule is not None
            assert (rule.name, rule.require.level, rule.require.max_age_s) == (
                name,
                level,
                max_age_s,
            )
        transfer = rules.match("POST", None, "/transfers")
        assert transfer is not None and transfer.require.once
        assert transfer.require.bind == ("amount", "currency", "payee")
        standing_order = rules.match("POST", None, "/standing-orders")
        assert standing_order is not None and standing_order.risk is not None
        assert standing_order.risk.url == stack.risk_url
        savings = rules.match("POST", None, "/savings")
        assert savings is not None and savings.upstream_challenge
        async with aiohttp.ClientSession() as http:
            meta_url = f"{stack.idp_url}/.well-known/openid-configuration"
            assert (await (await http.get(meta_url)).json())["issuer"] == stack.idp_url
            assert (await http.get(f"{stack.bank_url}/public/about")).status == 200
            facts = {"rule": "standing-order", "fields": {"amount": "1500.00"}}
            answer = await (await http.post(stack.risk_url, json=facts)).json()
            assert answer == {"require": "phishing-resistant"}
    finally:
        await stack.close()


@dataclass
class DemoGateway:
    """The demo stack with the gateway serving, for tests over plain HTTP."""

    stack: DemoStack
    browser: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.stack.gateway_url

    async def page(self, method: str, url: str, **kwargs: Any) -> Page:
        """A browser navigation (or form post): redirects followed, as a browser does.

        A form post comes from a page of the site it posts to, and says so (Origin)."""
        headers = {"Accept": "text/html", **kwargs.pop("headers", {})}
        if method != "GET":
            target = URL(url)
            headers.setdefault("Origin", f"{target.scheme}://{target.host}:{target.port}")
        reply = await self.browser.request(method, url, headers=headers, **kwargs)
        return Page(str(reply.url), await reply.text())

    async def form_token(self, path: str) -> str:
        token = re.search(
            r"name='form_token' value='([^']+)'", (await self.page("GET", self.url + path)).html
        )
        assert token
        return token.group(1)

    async def sign_in(self) -> None:
        page = await self.page("GET", f"{self.url}/")  # -> gateway -> provider
        assert page.url.startswith(self.stack.idp.issuer + "/login/")
        accounts = await self.page(
            "POST",
            self.stack.idp.issuer + page.action("/password"),
            data={
                "csrf_token": page.csrf(),
                "username": "alice",
                "password": "alice-demo-password",
            },
        )
        assert accounts.url == f"{self.url}/" and "assertion verified" in accounts.html
        assert ACR_PASSWORD in accounts.html


@pytest.fixture
async def demo_gateway() -> AsyncIterator[DemoGateway]:
    from gateway.server import run_gateway

    stack = await start_demo_stack()
    stop, ready = asyncio.Event(), asyncio.Event()
    serving = asyncio.create_task(run_gateway(stack.config, stop, on_ready=lambda _: ready.set()))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            yield DemoGateway(stack, browser)
    finally:
        stop.set()
        await serving
        await stack.close()


async def test_demo_end_to_end_through_the_gateway(demo_gateway: DemoGateway) -> None:
    """The whole demo over HTTP: sign in, open the transfer form, approve it, once."""
    demo, idp = demo_gateway, demo_gateway.stack.idp
    await demo.sign_in()
    form = await demo.page("GET", f"{demo.url}/transfers/new")  # a password is enough to look
    assert form.url == f"{demo.url}/transfers/new" and "assertion verified" in form.html
    token = await demo.form_token("/transfers/new")
    fields = {"form_token": token, "payee": "ACME Ltd", "amount": "250.00", "currency": "EUR"}
    # The post is kept; the provider asks alice to approve it with a passkey. She is
    # signed in there with her password, so it is not asked for again; she has no
    # passkey yet, so a one-time code comes first, then she creates one.
    page = await demo.page("POST", f"{demo.url}/transfers", data=fields)
    assert "Approve transfer of 250.00 EUR to ACME Ltd" in page.html
    assert page.has("totp") and not page.has("password")
    code = factors.totp_code(ALICE_SECRET, time.time())
    page = await demo.page(
        "POST", idp.issuer + page.action("/totp"), data={"csrf_token": page.csrf(), "totp": code}
    )
    authenticator = SoftAuthenticator()
    status, body = await passkey_ceremony(demo.browser, idp, page, authenticator)
    assert status == 200, body
    use = await page_at(demo.browser, idp, body["next"])
    assert "Approve transfer of 250.00 EUR to ACME Ltd" in use.html
    status, body = await passkey_ceremony(demo.browser, idp, use, authenticator)
    assert status == 200, body
    sent = await demo.page("GET", idp.issuer + body["next"])  # callback -> resume -> bank
    assert sent.url.startswith(f"{demo.url}/_gateway/resume?r=")
    assert "Sent EUR 250.00 to ACME Ltd." in sent.html and "acr=phr amr=hwk" in sent.html
    again = await demo.browser.get(sent.url, headers={"Accept": "text/html"})
    assert again.status == 410  # the kept post went once, and only once
    ledger = await demo.page("GET", f"{demo.url}/transfers")
    assert ledger.html.count("class='transfer'") == 1
    # The next transfer: the passkey, and nothing else.
    fields["form_token"] = await demo.form_token("/transfers/new")
    fields["amount"] = "40.00"
    use = await demo.page("POST", f"{demo.url}/transfers", data=fields)
    assert "Approve transfer of 40.00 EUR to ACME Ltd" in use.html
    assert use.data("ceremony") == "get"
    assert not use.has("password") and not use.has("totp")


@pytest.mark.parametrize(
    ("amount", "acr_values"),
    [("50.00", "urn:stepup:loa:2"), ("1500.00", "phr")],
)
async def test_demo_risk_service_picks_the_standing_order_step_up(
    demo_gateway: DemoGateway, amount: str, acr_values: str
) -> None:
    demo = demo_gateway
    await demo.sign_in()
    token = await demo.form_token("/standing-orders")
    fields = {
        "form_token": token,
        "payee": "City Power",
        "amount": amount,
        "currency": "EUR",
        "frequency": "monthly",
    }
    reply = await demo.browser.post(
        f"{demo.url}/standing-orders",
        data=fields,
        headers={"Accept": "text/html", "Origin": demo.url},  # a form on the bank's page
        allow_redirects=False,
    )
    assert reply.status == 302
    query = {k: v[0] for k, v in parse_qs(urlsplit(reply.headers["Location"]).query).items()}
    assert query["acr_values"] == acr_values
    assert json.loads(query["authorization_details"]) == [
        {
            "type": "payment_initiation",
            "amount": amount,
            "currency": "EUR",
            "frequency": "monthly",
            "payee": "City Power",
        }
    ]
    page = await demo.page("GET", reply.headers["Location"])
    assert f"Approve transfer of {amount} EUR to City Power, monthly" in page.html


def test_demo_refuses_a_public_address_without_the_override(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(host="0.0.0.0", port=0, i_know_this_is_not_production=False)
    assert demo_main(args) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


# --- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "reachable", "expected"),
    [
        (AcrRequest(), {ACR_PASSWORD}, ACR_PASSWORD),
        (AcrRequest((ACR_PHISHING_RESISTANT, ACR_MFA)), {ACR_PASSWORD, ACR_MFA}, ACR_MFA),
        (
            AcrRequest((ACR_MFA, ACR_PHISHING_RESISTANT)),
            {ACR_PASSWORD, ACR_MFA, ACR_PHISHING_RESISTANT},
            ACR_PHISHING_RESISTANT,
        ),
        (AcrRequest((ACR_PHISHING_RESISTANT,)), {ACR_PASSWORD}, None),
        (AcrRequest(("urn:other:gold",)), {ACR_PASSWORD}, ACR_PASSWORD),  # unknown, voluntary
        (AcrRequest(("urn:other:gold",), essential=True), {ACR_PASSWORD}, None),
    ],
)
def test_choose_acr(request_: AcrRequest, reachable: set[str], expected: str | None) -> None:
    assert factors.choose_acr(request_, reachable) == expected


PWD = Authentication(ACR_PASSWORD, ("pwd",), START)
MFA = Authentication(ACR_MFA, ("pwd", "otp"), START)
PHR = Authentication(ACR_PHISHING_RESISTANT, ("hwk",), START)
WITH_PASSKEY = Factors(totp=True, passkey=True)
NO_PASSKEY = Factors(totp=True, passkey=False)


@pytest.mark.parametrize(
    ("acr", "factors_", "session", "ceremony", "force", "max_age", "step", "approval"),
    [
        (ACR_PASSWORD, None, [], [], False, None, Step.PASSWORD, False),
        (
            ACR_PASSWORD,
            Factors(totp=False, passkey=False),
            [PWD],
            [],
            False,
            None,
            Step.DONE,
            False,
        ),
        (
            ACR_PASSWORD,
            Factors(totp=False, passkey=False),
            [PWD],
            [],
            True,
            None,
            Step.PASSWORD,
            False,
        ),
        (
            ACR_PASSWORD,
            Factors(totp=False, passkey=False),
            [PWD],
            [],
            False,
            10,
            Step.PASSWORD,
            False,
        ),
        (ACR_PASSWORD, Factors(totp=False, passkey=False), [], [PWD], True, 0, Step.DONE, False),
        (ACR_MFA, Factors(totp=True, passkey=False), [PWD], [], False, None, Step.TOTP, False),
        (ACR_MFA, Factors(totp=True, passkey=False), [MFA], [], False, None, Step.DONE, False),
        (ACR_MFA, Factors(totp=False, passkey=False), [PWD], [], False, None, Step.UNMET, False),
        (
            ACR_PHISHING_RESISTANT,
            Factors(totp=True, passkey=False),
            [MFA],
            [],
            False,
            None,
            Step.TOTP,
            False,
        ),
        (
            ACR_PHISHING_RESISTANT,
            Factors(totp=True, passkey=False),
            [],
            [MFA],
            False,
            None,
            Step.ENROL_PASSKEY,
            False,
        ),
        (
            ACR_PHISHING_RESISTANT,
            Factors(totp=True, passkey=True),
            [MFA],
            [],
            True,
            None,
            Step.PASSKEY,
            False,
        ),
        # A step-up to phr asks only for what is missing. The passkey is a whole sign-in
        # (possession and user verification): never a password before it, not even when
        # prompt=login or max_age=0 asks for a new sign-in, nor a code.
        (ACR_PHISHING_RESISTANT, WITH_PASSKEY, [PWD], [], True, 0, Step.PASSKEY, False),
        (ACR_PHISHING_RESISTANT, WITH_PASSKEY, [PWD], [], False, 10, Step.PASSKEY, False),
        (ACR_PHISHING_RESISTANT, WITH_PASSKEY, [MFA], [], True, 0, Step.PASSKEY, True),
        # ... and no password for a first passkey either: the session's (of any age) says
        # who the user is; a one-time code in this sign-in then lets her create one.
        (ACR_PHISHING_RESISTANT, NO_PASSKEY, [PWD], [], True, 0, Step.TOTP, False),
        (ACR_PHISHING_RESISTANT, NO_PASSKEY, [PWD], [], False, 10, Step.TOTP, False),
        (ACR_PHISHING_RESISTANT, NO_PASSKEY, [MFA], [], True, 0, Step.TOTP, True),
        (ACR_PHISHING_RESISTANT, NO_PASSKEY, [PWD], [MFA], True, 0, Step.ENROL_PASSKEY, True),
        # No provider session: the password says who the user is, then the passkey.
        (ACR_PHISHING_RESISTANT, None, [], [], False, None, Step.PASSWORD, False),
        (ACR_PHISHING_RESISTANT, NO_PASSKEY, [], [], False, None, Step.PASSWORD, False),
        (ACR_PHISHING_RESISTANT, WITH_PASSKEY, [], [], False, None, Step.PASSKEY, False),
        (ACR_PHISHING_RESISTANT, WITH_PASSKEY, [PHR], [], False, 60, Step.DONE, False),
        # mfa is the pair: a new sign-in asks for both again.
        (ACR_MFA, WITH_PASSKEY, [MFA], [], True, 0, Step.PASSWORD, False),
        (ACR_MFA, WITH_PASSKEY, [MFA], [PWD], True, 0, Step.TOTP, False),
        # An approval: the session vouches for the password, never for the approving factor.
        (ACR_PHISHING_RESISTANT, WITH_PASSKEY, [PHR], [], False, None, Step.PASSKEY, True),
        (ACR_MFA, Factors(totp=True, passkey=False), [MFA], [], False, None, Step.TOTP, True),
        (ACR_MFA, Factors(totp=True, passkey=False), [PWD], [MFA], False, None, Step.DONE, True),
        (
            ACR_PASSWORD,
            Factors(totp=False, passkey=False),
            [PWD],
            [],
            False,
            None,
            Step.PASSWORD,
            True,
        ),
    ],
)
def test_next_step(
    acr: str,
    factors_: Factors | None,
    session: list[Authentication],
    ceremony: list[Authentication],
    force: bool,
    max_age: int | None,
    step: Step,
    approval: bool,
) -> None:
    decision = factors.next_step(
        AcrRequest((acr,)),
        factors=factors_,
        session=session,
        ceremony=ceremony,
        force_login=force,
        max_age_s=max_age,
        now=START + 60,
        approval=approval,
    )
    assert decision.step is step


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["id_token", "userinfo", "acr", "essential", "values", "value"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(JSON | st.text(max_size=40))
def test_claims_parser_gives_strings_or_a_request_error(value: object) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        parsed = factors.parse_acr_request("urn:fallback", text)
    except factors.RequestError:
        return
    assert all(isinstance(v, str) for v in parsed.values) and isinstance(parsed.essential, bool)


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("25.50", "25.50"),
        ("1,000", "1000"),
        ("0", None),
        ("1e3", None),
        ("10000.01", None),
        ("-5", None),
    ],
)
def test_bank_amounts(text: str, amount: str | None) -> None:
    parsed = parse_amount(text)
    assert (str(parsed) if parsed is not None else None) == amount


@pytest.mark.parametrize(
    ("host", "allowed", "refused"),
    [
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("localhost", False, False),
        ("0.0.0.0", False, True),
        ("0.0.0.0", True, False),
        ("bank.example", False, True),
    ],
)
def test_only_loopback_without_the_override(host: str, allowed: bool, refused: bool) -> None:
    assert (refuse_public_bind(host, allowed) is not None) is refused
    assert is_loopback(host) is (host in ("127.0.0.1", "::1", "localhost"))


@pytest.mark.parametrize(
    ("details", "message", "text"),
    [
        (PAYMENT, None, "Approve transfer of 250.00 EUR to ACME Ltd"),
        (PAYMENT, "Approve: amount 250.00", "Approve transfer of 250.00 EUR to ACME Ltd"),
        (
            [{**PAYMENT[0], "frequency": "monthly"}],
            None,
            "Approve transfer of 250.00 EUR to ACME Ltd, monthly",
        ),
        (
            [PAYMENT[0], {**PAYMENT[0], "payee": "City Power", "amount": "5"}],
            None,
            "Approve transfer of 250.00 EUR to ACME Ltd; and transfer of 5 EUR to City Power",
        ),
        # Not a payment this provider can put in words: the relying party's message ...
        ([{"type": "payment_initiation", "amount": 250}], "Pay 250", "Pay 250"),
        # ... or, without one, the details as they are.
        ([{"type": "payment_initiation", "amount": 250}], None, "Approve: amount 250"),
        (None, "Delete tenant acme-prod", "Delete tenant acme-prod"),
        (None, None, None),
    ],
)
def test_approval_text(
    details: list[dict[str, Any]] | None, message: str | None, text: str | None
) -> None:
    assert approvals.approval_text(details, message) == text


@given(st.text(max_size=300))
def test_authorization_details_parser_gives_objects_or_an_error(text: str) -> None:
    try:
        details = approvals.parse_authorization_details(text)
    except approvals.ApprovalError as exc:
        assert exc.error == "invalid_authorization_details"
        return
    assert details is None or all(
        isinstance(d, dict) and d["type"] == "payment_initiation" for d in details
    )


@pytest.mark.parametrize(
    ("fields", "require"),
    [
        ({"amount": "50.00"}, "allow"),
        ({"amount": "1000"}, "allow"),
        ({"amount": "1000.01"}, "phishing-resistant"),
        ({"amount": "9000"}, "phishing-resistant"),
        ({"amount": "lots"}, "phishing-resistant"),  # unknown risk is high risk
        ({"amount": None}, "phishing-resistant"),
        ({}, "phishing-resistant"),
    ],
)
def test_risk_service_answers(fields: dict[str, Any], require: str) -> None:
    assert demo_risk.assess({"rule": "standing-order", "fields": fields}) == {"require": require}
