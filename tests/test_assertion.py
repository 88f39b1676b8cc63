"""X-Auth-Assertion signing (gateway.assertion): reuse within half the TTL, never across claims."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.assertion import MAX_TTL_S, REUSE_WHILE_LEFT, AssertionSigner

NOW = 1_700_000_000.0
ISSUER = "https://gw.example.com"
CLAIMS: dict[str, Any] = {
    "sub": "user-1",
    "acr": "urn:example:loa:1",
    "amr": ["pwd"],
    "auth_time": 1_699_999_000,
    "level": "password",
    "rule": "app",
    "email": "alice@example.com",
}


@pytest.fixture(scope="module")
def signer() -> AssertionSigner:
    return AssertionSigner(ec.generate_private_key(ec.SECP256R1()), ISSUER)


def decode(signer: AssertionSigner, token: str, audience: str = "app") -> dict[str, Any]:
    key = jwt.PyJWK(signer.jwks()["keys"][0]).key
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=audience,
        issuer=ISSUER,
        options={"verify_exp": False},
    )
    return claims


def test_a_token_is_reused_while_half_its_life_is_left(signer: AssertionSigner) -> None:
    fresh = AssertionSigner(ec.generate_private_key(ec.SECP256R1()), ISSUER)
    first = fresh.sign(dict(CLAIMS), audience="app", now=NOW)
    reuse_s = MAX_TTL_S * REUSE_WHILE_LEFT
    assert fresh.sign(dict(CLAIMS), audience="app", now=NOW + reuse_s - 1) == first
    later = fresh.sign(dict(CLAIMS), audience="app", now=NOW + reuse_s)
    assert later != first
    assert decode(fresh, later)["iat"] == int(NOW + reuse_s)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sub", "user-2"),
        ("acr", None),
        ("amr", ["pwd", "otp"]),
        ("amr", []),
        ("auth_time", 1_699_999_001),
        ("auth_time", 1_699_999_000.0),  # equal as numbers, not as JSON
        ("level", "mfa"),
        ("rule", "other"),
        ("email", "mallory@example.com"),
    ],
)
def test_a_token_is_never_reused_for_other_claims(
    signer: AssertionSigner, name: str, value: Any
) -> None:
    original = signer.sign(dict(CLAIMS), audience="app", now=NOW)
    changed = {**CLAIMS, name: value}
    token = signer.sign(changed, audience="app", now=NOW)
    assert token != original
    assert decode(signer, token)[name] == value
    assert type(decode(signer, token)[name]) is type(value)


def test_a_token_is_never_reused_for_another_audience(signer: AssertionSigner) -> None:
    for_app = signer.sign(dict(CLAIMS), audience="app", now=NOW)
    for_backoffice = signer.sign(dict(CLAIMS), audience="backoffice", now=NOW)
    assert for_app != for_backoffice
    assert decode(signer, for_backoffice, audience="backoffice")["sub"] == "user-1"


def test_one_and_true_are_different_claims(signer: AssertionSigner) -> None:
    as_int = signer.sign({**CLAIMS, "flag": 1}, audience="app", now=NOW)
    as_bool = signer.sign({**CLAIMS, "flag": True}, audience="app", now=NOW)
    assert decode(signer, as_int)["flag"] == 1 and decode(signer, as_int)["flag"] is not True
    assert decode(signer, as_bool)["flag"] is True
