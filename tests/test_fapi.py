"""The FAPI 2.0 client parts end to end: pushed authorization requests (RFC 9126),
private_key_jwt (RFC 7523) with a key file rotated in place, DPoP-bound tokens
(RFC 9449), against the test provider enforcing each of them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import load_config_text
from gateway.errors import ConfigError
from gateway.oidc import fapi
from gateway.oidc.client_keys import ClientKeyFile
from tests.conftest import query_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write_key(path: Path, *keys: object) -> list[fapi.SigningKey]:
    pem = b"".join(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for key in keys
    )
    path.write_bytes(pem)
    return list(fapi.load_pem_keys(pem))


def register(op, *keys: fapi.SigningKey, par: bool = True, dpop: bool = True) -> None:
    client = op.clients["gateway"]
    client.auth_method = "private_key_jwt"
    client.jwks = [{**key.public_jwk, "kid": key.kid} for key in keys]
    client.require_par = par
    client.require_dpop = dpop


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "client-key.pem"


async def test_fapi2_signs_in_with_par_private_key_jwt_and_dpop(make_stack, browser, key_file):
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    stack = await make_stack(oidc_extra=f"profile: fapi2\nclient_key_file: {key_file}\n")
    register(stack.op, key)
    stack.op.behaviour.honour_acr_values = True
    first = await browser.get(f"{stack.url}/payees/list")
    assert first.status == 302
    # Only client_id and request_uri travel through the browser: no acr_values to edit.
    assert set(query_of(first.headers["Location"])) == {"client_id", "request_uri"}
    final = await browser.follow(first.headers["Location"])
    assert final.status == 200, final.body
    pushed = stack.op.pushed_requests[-1]
    assert pushed["auth_method"] == "private_key_jwt"
    # An essential acr claim, no acr_values (which would make the request voluntary).
    assert json.loads(pushed["claims"]) == {
        "id_token": {"acr": {"essential": True, "values": ["urn:example:loa:2"]}}
    }
    assert "acr_values" not in pushed
    assert pushed["code_challenge_method"] == "S256"
    assert stack.op.authorization_requests[-1]["_pushed"] == "1"
    token = stack.op.token_requests[-1]
    assert (token["auth_method"], token["dpop"]) == ("private_key_jwt", "yes")
    assert stack.op.dpop_jkt[-1] is not None
    assert stack.op.assertion_kids == [key.kid, key.kid]


async def test_the_provider_refuses_an_authorization_request_that_was_not_pushed(
    make_stack, browser, key_file
):
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    stack = await make_stack(
        oidc_extra=f"client_auth: private_key_jwt\nclient_key_file: {key_file}\n"
    )
    register(stack.op, key, dpop=False)
    hop = await browser.get(f"{stack.url}/app/home")
    assert "request_uri" not in query_of(hop.headers["Location"])
    refused = await browser.get(hop.headers["Location"])
    assert refused.status == 400
    assert "pushed authorization request required" in refused.body


async def test_a_key_the_provider_does_not_know_is_refused(make_stack, browser, key_file):
    write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    stack = await make_stack(oidc_extra=f"profile: fapi2\nclient_key_file: {key_file}\n")
    (other,) = fapi.load_pem_keys(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    register(stack.op, other)
    hop = await browser.get(f"{stack.url}/app/home")
    assert hop.status >= 500  # the push was refused: no redirect to the provider
    assert stack.op.pushed_requests[-1]["auth_method"] == "private_key_jwt"
    assert stack.op.assertion_kids == []


async def test_the_key_file_is_rotated_without_a_restart(make_stack, browser, key_file):
    old, new = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    (old_key,) = write_key(key_file, old)
    stack = await make_stack(oidc_extra=f"profile: fapi2\nclient_key_file: {key_file}\n")
    new_key = write_key(key_file.with_suffix(".new"), new, old)[0]
    register(stack.op, old_key, new_key)
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    os.replace(key_file.with_suffix(".new"), key_file)  # atomically, as a deploy would
    browser.http.cookie_jar.clear()
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    assert stack.op.assertion_kids == [old_key.kid] * 2 + [new_key.kid] * 2
    assert new_key.alg == "PS256"


async def test_a_dpop_nonce_is_used_on_the_retry(make_stack, browser, key_file):
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    stack = await make_stack(oidc_extra=f"profile: fapi2\nclient_key_file: {key_file}\n")
    register(stack.op, key)
    stack.op.behaviour.dpop_nonce = "server-nonce-1"
    assert (await browser.follow(f"{stack.url}/app/home")).status == 200
    assert [t["dpop"] for t in stack.op.token_requests] == ["yes", "yes"]
    assert stack.op.dpop_jkt == [stack.op.dpop_jkt[0]] and stack.op.dpop_jkt[0]


async def test_a_bearer_answer_to_a_dpop_request_is_refused(make_stack, browser, key_file):
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    stack = await make_stack(oidc_extra=f"profile: fapi2\nclient_key_file: {key_file}\n")
    register(stack.op, key)
    stack.op.behaviour.token_response = {"id_token": "x", "token_type": "Bearer"}
    final = await browser.follow(f"{stack.url}/app/home")
    assert final.status >= 500
    assert stack.seen == []


async def test_the_test_provider_refuses_a_replayed_client_assertion(op, api, key_file):
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    register(op, key)
    op.clients["gateway"].redirect_uris.append("http://127.0.0.1:1/cb")
    form = {
        "response_type": "code",
        "redirect_uri": "http://127.0.0.1:1/cb",
        **fapi.client_assertion_fields(
            key, client_id="gateway", audience=op.issuer, now=time.time()
        ),
    }
    async with api.post(f"{op.issuer}/par", data=form) as first:
        assert first.status == 201
    async with api.post(f"{op.issuer}/par", data=form) as replay:
        assert replay.status == 401


BASE = """\
server: {listen: 127.0.0.1:8080, public_url: https://gw.example.com}
upstreams: {app: http://127.0.0.1:9000}
oidc:
  issuer: https://op.example.com
  client_id: gateway
  profile: fapi2
  client_key_file: KEY
EXTRA
session: {secret: 0123456789abcdef0123456789abcdef}
assurance:
  levels:
    - {name: password, acr: [loa1]}
rules:
  - {name: all, match: {path: /**}, require: {level: password}}
"""


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        (
            "  client_auth: client_secret_basic\n  client_secret: s",
            "oidc.client_auth",
            "private_key_jwt",
        ),
        ("  par: false", "oidc.par", "par: true"),
        ("  dpop: false", "oidc.dpop", "dpop: true"),
    ],
)
def test_check_refuses_weaker_settings_under_fapi2(key_file, extra, path, words) -> None:
    write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    text = BASE.replace("KEY", str(key_file)).replace("EXTRA\n", extra + "\n")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.yaml", {})
    found = {p.key_path: p.message for p in info.value.problems}
    assert words in found[path], found


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "no PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", "not an unencrypted"),
    ],
)
def test_a_broken_key_file_is_a_config_error(key_file, content, words) -> None:
    key_file.write_bytes(content)
    text = BASE.replace("KEY", str(key_file)).replace("EXTRA\n", "")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.yaml", {})
    found = {p.key_path: p.message for p in info.value.problems}
    assert words in found["oidc.client_key_file"], found


def test_weak_keys_are_refused() -> None:
    with pytest.raises(fapi.ClientKeyError):
        fapi.signing_key(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(fapi.ClientKeyError):
        fapi.signing_key(rsa.generate_private_key(65537, 1024))


def test_a_half_written_key_file_keeps_the_last_good_key(key_file) -> None:
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    keys = ClientKeyFile(str(key_file))
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ntruncat")
    assert keys.current().kid == key.kid


async def test_fapi2_needs_iss_on_the_callback_even_when_not_advertised(
    make_stack, browser, key_file
):
    (key,) = write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    stack = await make_stack(oidc_extra=f"profile: fapi2\nclient_key_file: {key_file}\n")
    register(stack.op, key)
    stack.op.behaviour.advertise_iss_parameter = False
    stack.op.behaviour.omit_callback_iss = True
    final = await browser.follow(f"{stack.url}/app/home")
    assert final.status == 400
    assert stack.op.token_requests == []  # refused before the code was redeemed
    assert stack.seen == []


def test_a_broken_key_is_logged_once_and_a_fixed_one_taken(key_file) -> None:
    from structlog.testing import capture_logs

    write_key(key_file, ec.generate_private_key(ec.SECP256R1()))
    keys = ClientKeyFile(str(key_file))
    key_file.write_bytes(b"not a key at all")
    with capture_logs() as logs:
        keys.current()
        keys.current()
    assert [entry["event"] for entry in logs] == ["client_key_reload_failed"]
    (fixed,) = write_key(key_file, rsa.generate_private_key(65537, 2048))
    with capture_logs() as logs:
        assert keys.current().kid == fixed.kid
    assert [entry["event"] for entry in logs] == ["client_key_reloaded"]
