"""API clients' access tokens in forward-auth mode, through the real front proxies.

nginx (auth_request) and Caddy (forward_auth) with the configs shipped in
docs/forward-auth/, in front of the gateway (the ``api`` section on) and a real echo
upstream; tokens come from the real authorization server (node oidc-provider). The
client's Authorization and DPoP headers reach ``/auth`` only because the proxy
forwards them, and the answers reach the client only as the proxy passes them on.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import load_config_text
from tests.conftest import free_port
from tests.support.authz import (
    OPAQUE_AUDIENCE,
    AuthorizationServer,
    DpopKey,
    authorize,
    authz,
    challenge_params,
    parts,
    sign,
    start_authorization_server,
)
from tests.support.serving import serving
from tests.support.upstream import SEEN, header_values
from tests.test_access_tokens import (
    RULES,
    api_section,
    assert_password_token_forwarded,
    assert_phr_forwarded,
    stronger_token,
    transfer_challenge,
)
from tests.test_access_tokens import call as call_gateway
from tests.test_access_tokens_dpop import refused_reasons
from tests.test_forward_auth import front_proxy, gateway_config, socket_dir
from tests.test_stepup_client import dpop_transfer

__all__ = ["authz"]  # the fixture, imported for pytest

ALGS = 'DPoP algs="ES256 ES384 EdDSA PS256 RS256"'


@dataclass
class Front:
    url: str  # the proxy's, which is also the gateway's public_url
    gateway_url: str
    upstream: Any
    kind: str

    @property
    def seen(self) -> list[dict[str, Any]]:
        return list(self.upstream.app[SEEN])


@contextlib.asynccontextmanager
async def deployment(
    kind: str, issuer: str, upstream: Any, tmp_path: Path, api: str
) -> AsyncIterator[Front]:
    """The gateway (forward_auth only) behind ``kind``, the app behind both."""
    port, gateway_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    app_url = str(upstream.make_url("")).rstrip("/")
    with socket_dir() as directory:
        unix = f"{directory}/gateway.sock" if kind == "nginx" else None
        text = gateway_config(
            url, gateway_port, app_url, issuer, mode="forward_auth", rules=RULES, unix_socket=unix
        )
        text += api
        # The authorization server's clock is the real one: so is the gateway's.
        gateway = Gateway(load_config_text(text, "fa.yaml"), clock=time.time)
        async with (
            serving(gateway, gateway_port),
            front_proxy(kind, tmp_path, port, unix or gateway_port, upstream.port),
        ):
            yield Front(url, f"http://127.0.0.1:{gateway_port}", upstream, kind)


@pytest.fixture(params=["nginx", "caddy"])
async def front(
    request: pytest.FixtureRequest, authz: AuthorizationServer, upstream: Any, tmp_path: Path
) -> AsyncIterator[Front]:
    async with deployment(request.param, authz.issuer, upstream, tmp_path, api_section()) as f:
        yield f


async def call(
    front: Front, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    """:func:`tests.test_access_tokens.call` through the proxy, as an API client (JSON:
    nginx sends a browser's page load to sign in instead)."""
    sent = {"Accept": "application/json", **(headers or {})}
    return await call_gateway(front, method, path, headers=sent, **kw)


# --- the RFC 9470 conversation through the proxy ----------------------------------------


async def test_bearer_step_up_through_the_proxy(front: Front, authz: AuthorizationServer) -> None:
    # No token: the schemes the API takes, passed on to the client.
    status, headers, _ = await call(front, "GET", "/api/accounts")
    assert status == 401
    assert headers["WWW-Authenticate"] == f"Bearer, {ALGS}"

    first = await authorize(authz.issuer)  # a password login
    status, _, echoed = await call(front, "GET", "/api/accounts", token=first.access_token)
    assert status == 200
    assert_password_token_forwarded(echoed)  # the shipped configs drop Authorization
    assert header_values(echoed, "X-Auth-Rule") == ["accounts"]

    status, headers, _ = await call(front, "POST", "/api/transfers/1", token=first.access_token)
    assert status == 401
    params = transfer_challenge(headers)
    assert "Location" not in headers
    assert len(front.seen) == 1  # nothing forwarded

    token, claims = await stronger_token(authz.issuer, params)
    status, _, echoed = await call(front, "POST", "/api/transfers/1", token=token)
    assert status == 200
    assert echoed["method"] == "POST"
    assert header_values(echoed, "X-Auth-Acr") == ["phr"]
    assert_phr_forwarded(echoed, claims, time.time())  # the gateway runs on real time here


async def test_a_bad_token_is_invalid_token(front: Front, authz: AuthorizationServer) -> None:
    good = (await authorize(authz.issuer)).access_token
    header, payload = parts(good)
    expired = await sign(authz.issuer, header, {**payload, "exp": int(time.time()) - 3600})
    # Claims a phishing-resistant login, under the password token's signature.
    head, _, signature = good.split(".")
    stronger = json.dumps({**payload, "acr": "phr", "amr": ["hwk"]}).encode()
    forged = f"{head}.{base64.urlsafe_b64encode(stronger).rstrip(b'=').decode()}.{signature}"
    for token, reason in ((expired, "exp"), (forged, "bad_signature")):
        with capture_logs() as logs:
            status, headers, _ = await call(front, "POST", "/api/transfers/1", token=token)
        assert status == 401, reason
        assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"'), reason
        assert refused_reasons(logs) == [reason]
    # Not even a public route takes a bad token: a token, when sent, is the credential.
    status, headers, _ = await call(front, "GET", "/public/x", token=expired)
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert front.seen == []


async def test_a_session_only_rule_refuses_a_token(
    front: Front, authz: AuthorizationServer
) -> None:
    token = (await authorize(authz.issuer)).access_token
    with capture_logs() as logs:
        status, headers, _ = await call(front, "GET", "/app/home", token=token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert refused_reasons(logs) == ["token_not_accepted"]
    assert front.seen == []


async def test_spoofed_assurance_headers_never_reach_the_app(
    front: Front, authz: AuthorizationServer
) -> None:
    token = (await authorize(authz.issuer)).access_token
    spoofed = {
        "X-Auth-Level": "phishing-resistant",
        "X-Auth-Acr": "phr",
        "X-Auth-Subject": "admin",
        "X-Auth-Assertion": "forged",
        "X-Original-URL": f"{front.url}/public/x",
        "X-Forwarded-Uri": "/public/x",
    }
    status, _, echoed = await call(front, "GET", "/api/accounts", token=token, headers=spoofed)
    assert status == 200
    assert header_values(echoed, "X-Auth-Level") == ["password"]
    assert header_values(echoed, "X-Auth-Acr") == ["urn:example:loa:1"]
    assert header_values(echoed, "X-Auth-Subject") == ["alice"]
    assert header_values(echoed, "X-Auth-Assertion") != ["forged"]
    # The weak token does not pass the transfer for claiming to be a public page.
    status, _, _ = await call(front, "POST", "/api/transfers/1", token=token, headers=spoofed)
    assert status == 401


# --- DPoP: the proof names the original request, not /auth ------------------------------


async def test_dpop_proof_for_the_original_request(
    front: Front, authz: AuthorizationServer
) -> None:
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, dpop=key)).access_token
    url = f"{front.url}/api/accounts"

    proof = key.proof("GET", url, access_token=token)
    status, _, echoed = await call(
        front, "GET", "/api/accounts", token=token, scheme="DPoP", proof=proof
    )
    assert status == 200
    assert header_values(echoed, "X-Auth-Level") == ["password"]
    assert header_values(echoed, "DPoP") == [] and header_values(echoed, "Authorization") == []

    # The same proof again, and proofs for /auth's URLs or another method: refused.
    wrong = {
        "dpop_replay": proof,
        "dpop_htu": key.proof("GET", f"{front.url}/_gateway/auth", access_token=token),
        "dpop_htu ": key.proof("GET", f"{front.gateway_url}/_gateway/auth", access_token=token),
        "dpop_htm": key.proof("POST", url, access_token=token),
    }
    for reason, bad in wrong.items():
        with capture_logs() as logs:
            status, headers, _ = await call(
                front, "GET", "/api/accounts", token=token, scheme="DPoP", proof=bad
            )
        assert status == 401, reason
        assert headers["WWW-Authenticate"].startswith(f'{ALGS}, error="invalid_token"')
        assert refused_reasons(logs) == [reason.strip()]
    assert len(front.seen) == 1

    # A POST step-up (Caddy asks /auth with GET: the method is the described one).
    url = f"{front.url}/api/transfers/1"
    status, headers, _ = await call(
        front,
        "POST",
        "/api/transfers/1",
        token=token,
        scheme="DPoP",
        proof=key.proof("POST", url, access_token=token),
    )
    assert status == 401
    assert headers["WWW-Authenticate"].startswith(
        f'{ALGS}, error="insufficient_user_authentication"'
    )
    params = challenge_params(headers["WWW-Authenticate"])
    stronger = await authorize(
        authz.issuer, acr_values=params["acr_values"], max_age=int(params["max_age"]), dpop=key
    )
    proof = key.proof("POST", url, access_token=stronger.access_token)
    status, _, echoed = await call(
        front, "POST", "/api/transfers/1", token=stronger.access_token, scheme="DPoP", proof=proof
    )
    assert status == 200
    assert header_values(echoed, "X-Auth-Acr") == ["phr"]


async def test_dpop_nonce_reaches_the_client(
    authz: AuthorizationServer, upstream: Any, tmp_path: Path
) -> None:
    """nginx passes the DPoP-Nonce of the gateway's 401 on (the shipped config)."""
    api = api_section(dpop="required", dpop_nonce="true")
    async with deployment("nginx", authz.issuer, upstream, tmp_path, api) as front:
        key = DpopKey.generate()
        token = (await authorize(authz.issuer, dpop=key)).access_token
        url = f"{front.url}/api/accounts"
        proof = key.proof("GET", url, access_token=token)
        status, headers, _ = await call(
            front, "GET", "/api/accounts", token=token, scheme="DPoP", proof=proof
        )
        assert status == 401 and 'error="use_dpop_nonce"' in headers["WWW-Authenticate"]
        nonce = headers["DPoP-Nonce"]
        proof = key.proof("GET", url, access_token=token, nonce=nonce)
        status, _, _ = await call(
            front, "GET", "/api/accounts", token=token, scheme="DPoP", proof=proof
        )
        assert status == 200


# --- what only the nginx config decides ------------------------------------------------


@pytest.mark.parametrize("front", ["nginx"], indirect=True)
async def test_a_token_is_never_sent_to_sign_in(front: Front, authz: AuthorizationServer) -> None:
    token = (await authorize(authz.issuer)).access_token
    page = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
    status, headers, _ = await call(front, "GET", "/app/x", token=token, headers=page)
    assert status == 401 and "Location" not in headers
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    # Without a token, the same page load is sent to sign in, as before.
    status, headers, _ = await call(front, "GET", "/app/x", headers=page)
    assert status == 302 and "/_gateway/start?rd=/app/x" in headers["Location"]


async def test_introspection_outage_fails_closed(upstream: Any, tmp_path: Path) -> None:
    """Opaque tokens, its own authorization server stopped: /auth answers 503 (nginx
    turns any answer but 2xx, 401 and 403 into its own 500): never forwarded."""
    server = start_authorization_server(free_port())
    try:
        api = f"api:\n  audience: {OPAQUE_AUDIENCE}\n  tokens: [introspection]\n"
        async with deployment("caddy", server.issuer, upstream, tmp_path, api) as front:
            opaque = (await authorize(server.issuer, resource=OPAQUE_AUDIENCE)).access_token
            assert opaque.count(".") == 0
            status, _, echoed = await call(front, "GET", "/api/accounts", token=opaque)
            assert status == 200
            assert header_values(echoed, "X-Auth-Acr") == ["urn:example:loa:1"]
            second = (await authorize(server.issuer, resource=OPAQUE_AUDIENCE)).access_token
            server.stop()
            status, _, body = await call(front, "GET", "/api/accounts", token=second)
            assert status == 503 and body["error"] == "introspection_unreachable"
            assert len(front.seen) == 1
    finally:
        server.stop()


# --- examples/stepup_client.py against the forward-auth deployment ---------------------


@pytest.mark.parametrize("front", ["nginx"], indirect=True)
async def test_the_example_client_steps_up_through_nginx(
    front: Front, authz: AuthorizationServer
) -> None:
    response = await dpop_transfer(authz, front.url)
    assert response.status_code == 200
    assert dict(response.json()["headers"])["X-Auth-Level"] == "phishing-resistant"
    assert [record["method"] for record in front.seen] == ["POST"]


async def test_a_dpop_request_sent_again_byte_for_byte_is_refused(
    front: Front, authz: AuthorizationServer
) -> None:
    """A DPoP proof is single-use: the very same /auth request, sent again with every
    byte the same, is judged again (and refused), never answered from memory."""
    key = DpopKey.generate()
    token = (await authorize(authz.issuer, acr_values="phr", dpop=key)).access_token
    url = f"{front.url}/api/transfers/1"  # credentials: any, so a cookie rule could remember
    sent = {
        "X-Original-Method": "POST",
        "X-Original-URL": url,
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("POST", url, access_token=token),
    }
    statuses = []
    async with aiohttp.ClientSession() as http:  # one connection, the same bytes twice
        for _ in range(2):
            async with http.get(f"{front.gateway_url}/_gateway/auth", headers=sent) as resp:
                statuses.append(resp.status)
    assert statuses == [200, 401]
