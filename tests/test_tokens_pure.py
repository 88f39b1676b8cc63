"""The pure token checks (gateway/tokens): thumbprints, htu, claims, nonces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.oidc.flow import IdTokenError
from gateway.tokens.claims import AccessClaims, check_claims, read_claims
from gateway.tokens.dpop import (
    access_token_hash,
    make_nonce,
    nonce_valid,
    normalised_htu,
    thumbprint,
)

NOW = 1_800_000_000


def test_thumbprint_rfc_7638_example() -> None:
    # RFC 7638 3.1: the RSA key of its example and the thumbprint it gives.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tS"
        "oc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQ"
        "R0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTW"
        "hAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("jwk", [{"kty": "oct", "k": "x"}, {"kty": "EC", "crv": "P-256", "x": "a"}])
def test_thumbprint_refuses_unusable_keys(jwk: dict[str, str]) -> None:
    with pytest.raises(IdTokenError) as info:
        thumbprint(jwk)
    assert info.value.reason == "dpop_key"


def test_ath_is_sha256_base64url() -> None:
    # RFC 9449 7.1's example token and ath.
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == (
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


@pytest.mark.parametrize(
    ("htu", "expected"),
    [
        ("https://API.Example.com/a/b", "https://api.example.com/a/b"),
        ("https://api.example.com:443/a?x=1#f", "https://api.example.com/a"),
        ("HTTPS://api.example.com./a", "https://api.example.com/a"),
        ("http://api.example.com:8080", "http://api.example.com:8080/"),
        ("https://user@api.example.com/a", None),
        ("ftp://api.example.com/a", None),
        ("https:///a", None),
        ("not a url", None),
    ],
)
def test_normalised_htu(htu: str, expected: str | None) -> None:
    assert normalised_htu(htu) == expected


@given(st.text(max_size=200))
def test_normalised_htu_never_raises(htu: str) -> None:
    result = normalised_htu(htu)
    assert result is None or result.startswith(("http://", "https://"))


def claims(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "iss": "https://op.example",
        "sub": "alice",
        "aud": ["https://api.example", "other"],
        "exp": NOW + 60,
        "iat": NOW,
        "client_id": "c",
        "acr": "phr",
        "amr": ["hwk"],
        "auth_time": NOW - 5,
        "cnf": {"jkt": "abc"},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_read_claims() -> None:
    read = read_claims(claims())
    assert read == AccessClaims(
        sub="alice",
        aud=("https://api.example", "other"),
        exp=NOW + 60,
        iat=NOW,
        client_id="c",
        acr="phr",
        amr=("hwk",),
        auth_time=NOW - 5,
        jkt="abc",
        iss="https://op.example",
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://evil"}, "iss"),
        ({"aud": "other"}, "aud"),
        ({"aud": None}, "aud"),
        ({"exp": NOW - 61}, "exp"),
        ({"nbf": NOW + 61}, "nbf"),
        ({"iat": NOW + 61}, "iat"),
        ({"auth_time": NOW + 61}, "auth_time"),
        ({"exp": "tomorrow"}, "malformed"),
        ({"exp": True}, "malformed"),
        ({"amr": "hwk"}, "malformed"),
        ({"cnf": "abc"}, "malformed"),
        ({"cnf": {"jkt": 1}}, "malformed"),
        ({"sub": ""}, "sub"),
        ({"sub": None}, "sub"),
        ({"acr": "a\r\nX-Auth-Level: admin"}, "claim_value"),
    ],
)
def test_claim_checks(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(IdTokenError) as info:
        read = read_claims(claims(**changes))
        check_claims(
            read, issuer="https://op.example", audience="https://api.example", now=NOW, skew_s=60
        )
    assert info.value.reason == reason


def test_claims_within_the_skew_pass() -> None:
    read = read_claims(claims(exp=NOW - 59, nbf=NOW + 59, iat=NOW + 59))
    check_claims(
        read, issuer="https://op.example", audience="https://api.example", now=NOW, skew_s=60
    )


def test_nonces() -> None:
    key = b"k" * 32
    nonce = make_nonce(key, NOW, 60)
    assert nonce_valid(key, nonce, NOW, 60)
    assert nonce_valid(key, nonce, NOW + 60, 60)  # the next slot still takes it
    assert not nonce_valid(key, nonce, NOW + 180, 60)
    assert not nonce_valid(b"x" * 32, nonce, NOW, 60)
    assert not nonce_valid(key, None, NOW, 60)
