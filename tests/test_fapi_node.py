"""The FAPI 2.0 client against the reference: node oidc-provider in its FAPI 2.0 Security
Profile mode (tests/oidc-provider/server.js --fapi2), which requires pushed authorization
requests, accepts only private_key_jwt with the issuer as audience, binds tokens with
DPoP and demands its own DPoP nonces, and puts ``iss`` in the authorization response.

One server per module; each test starts its own gateway on the port the server has the
callback registered for."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.cli import main as gateway_cli
from gateway.config import load_config_text
from gateway.oidc import fapi
from tests.conftest import DEFAULT_RULES, LEVELS_YAML, SESSION_SECRET, Browser, Clock, query_of
from tests.support.authz import FapiAuthorizationServer, fapi_authz, pkce_pair, public_jwk
from tests.support.serving import serving
from tests.support.upstream import SEEN

__all__ = ["fapi_authz"]  # the fixture, imported for pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class FapiStack:
    gateway: Gateway
    url: str
    config_file: Path
    key_file: Path
    upstream: Any

    @property
    def seen(self) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = self.upstream.app[SEEN]
        return seen

    def last_header(self, name: str) -> str | None:
        """A header of the last request the upstream received."""
        headers = self.seen[-1]["headers"]
        return next((v for k, v in headers if k.lower() == name.lower()), None)

    @property
    def dpop_jkt(self) -> str:
        """The RFC 7638 thumbprint of the gateway's DPoP key (one per process)."""
        key = self.gateway.provider._dpop_key  # the key itself never leaves the process
        assert key is not None
        return key.kid


def config_text(server: FapiAuthorizationServer, upstream_url: str, key_file: Path) -> str:
    return (
        textwrap.dedent(f"""\
        server:
          listen: 127.0.0.1:{server.gateway_port}
          public_url: {server.gateway_url}
        upstreams:
          app: {upstream_url}
        oidc:
          issuer: {server.issuer}
          client_id: gateway
          profile: fapi2
          client_key_file: {key_file}
        session:
          secret: {SESSION_SECRET}
          store: cookie
          cookie_secure: false
        """)
        + LEVELS_YAML
        + DEFAULT_RULES
    )


@pytest.fixture
async def fapi_stack(
    fapi_authz: FapiAuthorizationServer, upstream: Any, clock: Clock, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[FapiStack]]]:
    """Starts the gateway (``profile: fapi2``, the server's first client key) on the
    port the FAPI server expects; one per test, stopped after it."""
    running = contextlib.AsyncExitStack()

    async def factory() -> FapiStack:
        key_file = tmp_path / "client-key.pem"
        key_file.write_bytes(fapi_authz.keys[0])
        config_file = tmp_path / "gateway.yaml"
        config_file.write_text(
            config_text(fapi_authz, str(upstream.make_url("")).rstrip("/"), key_file)
        )
        config = load_config_text(config_file.read_text(), str(config_file))
        gateway = Gateway(config, clock=clock)
        await running.enter_async_context(serving(gateway, fapi_authz.gateway_port))
        return FapiStack(gateway, fapi_authz.gateway_url, config_file, key_file, upstream)

    async with running:
        yield factory


def kid_of(pem: bytes) -> str:
    kid: str = public_jwk(pem)["kid"]
    return kid


async def test_sign_in_and_step_up_against_the_reference(
    fapi_authz: FapiAuthorizationServer, fapi_stack: Any, browser: Browser
) -> None:
    stack = await fapi_stack()
    before = await fapi_authz.record()
    first = await browser.get(f"{stack.url}/app/home")
    assert first.status == 302
    assert first.headers["Location"].startswith(f"{fapi_authz.issuer}/")
    # Only client_id and request_uri travel through the browser (RFC 9126 4).
    assert set(query_of(first.headers["Location"])) == {"client_id", "request_uri"}
    signed_in = await browser.follow(first.headers["Location"])
    assert signed_in.status == 200, signed_in.body
    assert stack.last_header("X-Auth-Acr") == "urn:example:loa:1"

    stepped_up = await browser.follow(f"{stack.url}/payees/list")
    assert stepped_up.status == 200, stepped_up.body
    assert stack.seen[-1]["path_qs"] == "/payees/list"
    assert stack.last_header("X-Auth-Acr") == "urn:example:loa:2"
    # A rule with max_age: phishing-resistant, proven within five minutes.
    fresh = await browser.follow(f"{stack.url}/transfers/new")
    assert fresh.status == 200, fresh.body
    assert stack.last_header("X-Auth-Acr") == "phr"

    record = await fapi_authz.record()
    pushed = record["pushed"][len(before["pushed"]) :]
    # The level is asked for as an essential acr claim, without acr_values (which this
    # server lets override the claims parameter, making the request voluntary).
    assert [json.loads(p["claims"])["id_token"]["acr"] for p in pushed] == [
        {"essential": True, "values": ["urn:example:loa:1"]},
        {"essential": True, "values": ["urn:example:loa:2"]},
        {"essential": True, "values": ["phr", "phrh"]},
    ]
    assert [(p.get("acr_values"), p.get("max_age")) for p in pushed] == [
        (None, None),
        (None, None),
        (None, "300"),
    ]
    assert {p["code_challenge_method"] for p in pushed} == {"S256"}
    assert {p["redirect_uri"] for p in pushed} == {f"{stack.url}/_gateway/callback"}
    # Client authentication was private_key_jwt with the issuer as audience, at the
    # pushed authorization endpoint and at the token endpoint. The server demands DPoP
    # nonces: the first token request was refused for want of one and retried with it
    # (a fresh assertion), the later ones carried the nonce the gateway kept.
    assertions = record["assertions"][len(before["assertions"]) :]
    assert [a["route"] for a in assertions] == [
        "pushed_authorization_request",
        "token",
        "token",
        "pushed_authorization_request",
        "token",
        "pushed_authorization_request",
        "token",
    ]
    assert {(a["kid"], a["alg"], a["aud"]) for a in assertions} == {
        (kid_of(fapi_authz.keys[0]), "ES256", fapi_authz.issuer)
    }
    # Every token response was DPoP-bound to the gateway's key.
    tokens = record["tokens"][len(before["tokens"]) :]
    assert tokens == [{"token_type": "DPoP", "jkt": stack.dpop_jkt}] * 3


async def test_the_reference_refuses_an_authorization_request_that_was_not_pushed(
    fapi_authz: FapiAuthorizationServer, fapi_stack: Any, api: aiohttp.ClientSession
) -> None:
    stack = await fapi_stack()
    _verifier, challenge = pkce_pair()
    params = {
        "client_id": "gateway",
        "response_type": "code",
        "redirect_uri": f"{stack.url}/_gateway/callback",
        "scope": "openid",
        "state": "s",
        "nonce": "n",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "acr_values": "phr",
    }
    async with api.get(
        f"{fapi_authz.issuer}/auth?{urlencode(params)}", allow_redirects=False
    ) as resp:
        body = await resp.text()
        location = resp.headers.get("Location", "")
    answer = query_of(location) if location else {}
    assert "code" not in answer
    assert answer.get("error") == "invalid_request" or "invalid_request" in body, (location, body)
    assert "Pushed Authorization Request" in answer.get("error_description", body)


async def test_the_reference_refuses_client_secrets_and_an_endpoint_audience(
    fapi_authz: FapiAuthorizationServer, api: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """private_key_jwt is the only way in, and FAPI 2.0 wants the issuer as ``aud``:
    the audience other profiles send (the endpoint URL) is refused."""
    import time

    form = {
        "response_type": "code",
        "redirect_uri": f"{fapi_authz.gateway_url}/_gateway/callback",
        "scope": "openid",
        "code_challenge": pkce_pair()[1],
        "code_challenge_method": "S256",
    }
    endpoint = f"{fapi_authz.issuer}/request"
    secret = aiohttp.BasicAuth("gateway", "test-client-secret")
    async with api.post(endpoint, data={**form, "client_id": "gateway"}, auth=secret) as resp:
        assert (resp.status, (await resp.json())["error"]) == (401, "invalid_client")
    (key,) = fapi.load_pem_keys(fapi_authz.keys[0])
    for audience, status in ((endpoint, 401), (fapi_authz.issuer, 201)):
        fields = fapi.client_assertion_fields(
            key, client_id="gateway", audience=audience, now=time.time()
        )
        async with api.post(endpoint, data={**form, **fields}) as resp:
            assert resp.status == status, await resp.text()


async def test_a_tampered_or_missing_iss_is_refused_before_the_code_is_redeemed(
    fapi_authz: FapiAuthorizationServer, fapi_stack: Any, browser: Browser
) -> None:
    stack = await fapi_stack()
    for change in ("http://127.0.0.1:1", None):
        browser.http.cookie_jar.clear()
        hop = await browser.get(f"{stack.url}/app/home")
        while not hop.headers["Location"].startswith(f"{stack.url}/_gateway/callback"):
            hop = await browser.get(_absolute(hop.url, hop.headers["Location"]))
        callback = query_of(hop.headers["Location"])
        assert callback["iss"] == fapi_authz.issuer  # RFC 9207 2: the reference sends it
        tokens_before = len((await fapi_authz.record())["tokens"])
        if change is None:
            del callback["iss"]
        else:
            callback["iss"] = change
        parts = urlsplit(hop.headers["Location"])
        refused = await browser.get(urlunsplit(parts._replace(query=urlencode(callback))))
        assert refused.status == 400, refused.body
        assert len((await fapi_authz.record())["tokens"]) == tokens_before
    assert stack.seen == []


async def test_the_client_key_is_rotated_in_place_and_an_unknown_key_fails_closed(
    fapi_authz: FapiAuthorizationServer, fapi_stack: Any, browser: Browser
) -> None:
    stack = await fapi_stack()
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    # The server knows both keys; the file is swapped atomically, as a deploy would.
    staged = stack.key_file.with_suffix(".new")
    staged.write_bytes(fapi_authz.keys[1])
    os.replace(staged, stack.key_file)
    browser.http.cookie_jar.clear()
    before = len((await fapi_authz.record())["assertions"])
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    after = (await fapi_authz.record())["assertions"][before:]
    assert {(a["kid"], a["alg"]) for a in after} == {(kid_of(fapi_authz.keys[1]), "PS256")}
    assert len(stack.seen) == 2

    # A key the server does not know: the pushed request is refused, sign-in fails closed.
    staged.write_bytes(fapi_authz.unknown_key)
    os.replace(staged, stack.key_file)
    browser.http.cookie_jar.clear()
    with capture_logs() as logs:
        refused = await browser.get(f"{stack.url}/app/home")
    assert refused.status == 502, refused.body
    assert "Traceback" not in refused.body
    assert "refused the pushed authorization request" in refused.body
    assert {
        "event": "provider_error",
        "endpoint": "par",
        "problem": "rejected",
        "reason": "par_invalid_client",
        "log_level": "warning",
    }.items() <= next(e for e in logs if e["event"] == "provider_error").items()
    assert len(stack.seen) == 2


def test_check_passes_on_the_fapi2_config(
    fapi_authz: FapiAuthorizationServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "client-key.pem"
    key_file.write_bytes(fapi_authz.keys[0])
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(config_text(fapi_authz, "http://127.0.0.1:9", key_file))
    assert gateway_cli(["check", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out.startswith("ok (profile fapi2: ")


def _absolute(base: str, location: str) -> str:
    if location.startswith("http"):
        return location
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}{location}"
