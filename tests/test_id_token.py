"""ID token checks (OIDC Core 3.1.3.7), pure: one broken thing per token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.oidc.flow import (
    BACKCHANNEL_LOGOUT_EVENT,
    IdTokenError,
    verified_email,
    verify_id_token,
    verify_logout_token,
)
from tests.support.op import ID_TOKEN_MISBEHAVIOURS, MISSING_AUTH_TIME, OpenIdProvider, new_key

ISSUER = "https://op.example"
CLIENT_ID = "gateway"
NONCE = "n-0S6_WzA2Mj"
NOW = 1_700_000_000
SKEW = 60
MAX_AGE = 600  # flow.ID_TOKEN_MAX_AGE_S, spelled out so a change to it shows here
ALGS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")

OP = OpenIdProvider(ISSUER)
RSA_KEY, EC_KEY = OP.keys  # the provider's stock RS256 and ES256 keys
OTHER_RSA = new_key("RSA", "other")


def jwk(key: Any, alg: str | None = None) -> jwt.PyJWK:
    return jwt.PyJWK(key.public_jwk(), algorithm=alg)


def good_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": CLIENT_ID,
        "exp": NOW + 300,
        "iat": NOW,
        "auth_time": NOW - 5,
        "nonce": NONCE,
        "acr": "urn:example:loa:2",
        "amr": ["pwd", "otp"],
        "sid": "s-1",
        "email": "alice@example.com",
        "name": "Alice",
    }
    for name, value in changes.items():
        if value is _DROP:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


_DROP = object()


def sign(claims: Any, key: Any = RSA_KEY, *, alg: str | None = None, **header: Any) -> str:
    return jwt.encode(
        claims, key.private_key, algorithm=alg or key.alg, headers={"kid": key.kid, **header}
    )


def verify(token: str, key: jwt.PyJWK | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "issuer": ISSUER,
        "client_id": CLIENT_ID,
        "nonce": NONCE,
        "now": NOW,
        "skew_s": SKEW,
        "allowed_algs": ALGS,
    }
    args.update(kw)
    return verify_id_token(token, key or jwk(RSA_KEY), **args)


def reason_of(token: str, key: jwt.PyJWK | None = None, **kw: Any) -> str:
    with pytest.raises(IdTokenError) as caught:
        verify(token, key, **kw)
    return caught.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------ good


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
def test_good_token_passes(key: Any) -> None:
    claims = verify(sign(good_claims(), key), jwk(key))

    assert claims.iss == ISSUER
    assert claims.sub == "user-1"
    assert claims.aud == (CLIENT_ID,)
    assert claims.exp == NOW + 300
    assert claims.iat == NOW
    assert claims.auth_time == NOW - 5
    assert claims.nonce == NONCE
    assert claims.acr == "urn:example:loa:2"
    assert claims.amr == ("pwd", "otp")
    assert (claims.sid, claims.email, claims.name, claims.azp) == (
        "s-1",
        "alice@example.com",
        "Alice",
        None,
    )


def test_optional_claims_may_be_absent() -> None:
    minimal = good_claims(auth_time=_DROP, acr=_DROP, amr=_DROP, sid=_DROP, email=_DROP, name=_DROP)
    claims = verify(sign(minimal))
    assert (claims.acr, claims.amr, claims.auth_time, claims.email) == (None, (), None, None)


def test_ps256_with_a_key_bound_to_ps256() -> None:
    # A JWK without "alg" can serve PS256; the provider binds the PyJWK to the header alg.
    public = {k: v for k, v in RSA_KEY.public_jwk().items() if k != "alg"}
    token = sign(good_claims(), alg="PS256")
    assert verify(token, jwt.PyJWK(public, algorithm="PS256")).sub == "user-1"


# ---------------------------------------------------------- one broken claim each

CLAIM_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("iss_other", {"iss": "https://evil.example"}, "iss"),
    ("iss_trailing_slash", {"iss": ISSUER + "/"}, "iss"),
    ("iss_case", {"iss": ISSUER.upper()}, "iss"),
    ("aud_other", {"aud": "other-rp"}, "aud"),
    ("aud_list_without_us", {"aud": ["other-rp", "third"], "azp": CLIENT_ID}, "aud"),
    ("aud_several_no_azp", {"aud": [CLIENT_ID, "other-rp"]}, "azp"),
    ("aud_several_wrong_azp", {"aud": [CLIENT_ID, "other-rp"], "azp": "other-rp"}, "azp"),
    ("aud_single_wrong_azp", {"azp": "other-rp"}, "azp"),
    ("exp_at_boundary", {"exp": NOW - SKEW}, "exp"),
    ("exp_long_ago", {"exp": NOW - 3600}, "exp"),
    ("iat_future_beyond_skew", {"iat": NOW + SKEW + 1}, "iat"),
    ("iat_older_than_10_min", {"iat": NOW - MAX_AGE - SKEW - 1}, "iat"),
    ("auth_time_future_beyond_skew", {"auth_time": NOW + SKEW + 1}, "auth_time"),
    ("nbf_future_beyond_skew", {"nbf": NOW + SKEW + 1}, "nbf"),
    ("nbf_far_future", {"nbf": NOW + 86_400}, "nbf"),
    ("iat_far_future", {"iat": NOW + 365 * 86_400, "exp": NOW + 366 * 86_400}, "iat"),
    ("auth_time_far_future", {"auth_time": NOW + 86_400}, "auth_time"),
    ("nonce_other", {"nonce": "other"}, "nonce"),
    ("nonce_missing", {"nonce": _DROP}, "nonce"),
    ("nonce_prefix", {"nonce": NONCE[:-1]}, "nonce"),
    ("sub_empty", {"sub": ""}, "sub"),
    ("sub_missing", {"sub": _DROP}, "malformed"),
    ("sub_number", {"sub": 42}, "malformed"),
    ("iss_missing", {"iss": _DROP}, "malformed"),
    ("aud_missing", {"aud": _DROP}, "malformed"),
    ("aud_empty_list", {"aud": []}, "malformed"),
    ("aud_list_of_numbers", {"aud": [1, 2]}, "malformed"),
    ("exp_missing", {"exp": _DROP}, "malformed"),
    ("exp_string", {"exp": "tomorrow"}, "malformed"),
    ("exp_bool", {"exp": True}, "malformed"),
    ("iat_missing", {"iat": _DROP}, "malformed"),
    ("iat_bool", {"iat": True}, "malformed"),
    ("iat_string", {"iat": str(NOW)}, "malformed"),
    ("iat_null", {"iat": None}, "malformed"),
    ("nbf_string", {"nbf": "yesterday"}, "malformed"),
    ("nbf_bool", {"nbf": False}, "malformed"),
    ("nbf_list", {"nbf": [NOW]}, "malformed"),
    ("auth_time_bool", {"auth_time": True}, "malformed"),
    ("exp_huge", {"exp": 2**60}, "malformed"),
    ("exp_nan", {"exp": float("nan")}, "malformed"),  # Python's JSON reads NaN
    ("exp_infinity", {"exp": float("inf")}, "malformed"),
    ("auth_time_string", {"auth_time": "now"}, "malformed"),
    ("amr_string", {"amr": "pwd"}, "malformed"),
    ("amr_numbers", {"amr": ["pwd", 1]}, "malformed"),
    ("acr_number", {"acr": 2}, "malformed"),
    ("acr_list", {"acr": ["phr"]}, "malformed"),
    ("azp_number", {"azp": 1}, "malformed"),
    ("email_object", {"email": {"a": 1}}, "malformed"),
    ("email_list", {"email": ["a@b"]}, "malformed"),
    # Claims that become X-Auth-* headers (sub, email, acr, amr).
    ("sub_crlf", {"sub": "user-1\r\nX-Auth-Level: admin"}, "claim_value"),
    ("sub_lf", {"sub": "user-1\n"}, "claim_value"),
    ("sub_nul", {"sub": "user\x00"}, "claim_value"),
    ("sub_tab", {"sub": "user\t1"}, "claim_value"),
    ("sub_del", {"sub": "user\x7f"}, "claim_value"),
    ("sub_c1_nel", {"sub": "user\x85"}, "claim_value"),
    ("sub_lone_surrogate", {"sub": "user\ud800"}, "claim_value"),
    ("sub_256_bytes", {"sub": "u" * 256}, "claim_value"),
    ("sub_256_utf8_bytes", {"sub": "é" * 128}, "claim_value"),
    ("email_cr", {"email": "a@example.com\rX: 1"}, "claim_value"),
    ("email_too_long", {"email": "a" * 249 + "@b.com"}, "claim_value"),
    ("acr_newline", {"acr": "phr\n"}, "claim_value"),
    ("acr_paragraph_separator", {"acr": "phr\u2029"}, "claim_value"),
    ("acr_too_long", {"acr": "urn:" + "x" * 125}, "claim_value"),
    ("amr_control", {"amr": ["pwd", "otp\x1b"]}, "claim_value"),
    ("amr_empty_value", {"amr": ["pwd", ""]}, "claim_value"),
    ("amr_value_too_long", {"amr": ["x" * 33]}, "claim_value"),
    ("amr_too_many", {"amr": [f"m{i}" for i in range(11)]}, "claim_value"),
    ("amr_object", {"amr": [{"pwd": 1}]}, "malformed"),
    ("sid_list", {"sid": ["s"]}, "malformed"),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [c[1:] for c in CLAIM_CASES], ids=[c[0] for c in CLAIM_CASES]
)
def test_one_bad_claim_is_rejected(changes: dict[str, Any], reason: str) -> None:
    assert reason_of(sign(good_claims(**changes))) == reason


def test_malformed_names_the_claim() -> None:
    with pytest.raises(IdTokenError) as caught:
        verify(sign(good_claims(amr="pwd")))
    assert (caught.value.reason, caught.value.claim) == ("malformed", "amr")


# ------------------------------------------------------------- the edges that pass

PASSING_EDGES: list[tuple[str, dict[str, Any]]] = [
    ("exp_just_inside_skew", {"exp": NOW - SKEW + 1}),
    ("iat_future_within_skew", {"iat": NOW + SKEW}),
    ("iat_oldest_allowed", {"iat": NOW - MAX_AGE - SKEW}),
    ("auth_time_future_within_skew", {"auth_time": NOW + SKEW}),
    ("auth_time_long_ago", {"auth_time": NOW - 30 * 24 * 3600}),
    ("aud_list_of_one", {"aud": [CLIENT_ID]}),
    ("aud_several_with_our_azp", {"aud": [CLIENT_ID, "other-rp"], "azp": CLIENT_ID}),
    ("aud_single_with_our_azp", {"azp": CLIENT_ID}),
    ("fractional_times", {"exp": NOW + 300.5, "iat": NOW + 0.25}),
    ("nbf_past", {"nbf": NOW - 3600}),
    ("nbf_now", {"nbf": NOW}),
    ("nbf_future_within_skew", {"nbf": NOW + SKEW}),
    # Non-ASCII, spaces, commas, "%": passed on, percent-encoded in headers.
    ("sub_utf8_255_bytes", {"sub": "é" * 127 + "x"}),
    ("sub_255_ascii", {"sub": "u" * 255}),
    ("sub_space_comma_percent", {"sub": "Ünïcode user, 100%"}),
    ("email_utf8", {"email": "zoë@exämple.com"}),
    ("acr_uri", {"acr": "http://schemas.openid.net/pape/policies/2007/06/multi-factor"}),
    ("amr_comma", {"amr": ["pwd", "a,b"]}),
    ("amr_ten_of_32_bytes", {"amr": [f"{i}" * 32 for i in range(10)]}),
    ("email_254_bytes", {"email": "a" * 248 + "@b.com"}),
    ("acr_128_bytes", {"acr": "urn:" + "x" * 124}),
    ("name_with_newline_is_not_a_header", {"name": "Alice\nAdams"}),
]


@pytest.mark.parametrize(
    "changes", [c[1] for c in PASSING_EDGES], ids=[c[0] for c in PASSING_EDGES]
)
def test_edges_that_pass(changes: dict[str, Any]) -> None:
    verify(sign(good_claims(**changes)))


@pytest.mark.parametrize("skew", [0, 30, 300])
def test_skew_is_the_callers(skew: int) -> None:
    assert verify(sign(good_claims(exp=NOW - skew + 1)), skew_s=skew)
    assert reason_of(sign(good_claims(exp=NOW - skew)), skew_s=skew) == "exp"
    assert verify(sign(good_claims(iat=NOW + skew)), skew_s=skew)
    assert reason_of(sign(good_claims(iat=NOW + skew + 1)), skew_s=skew) == "iat"


def test_auth_time_required_when_max_age_was_sent() -> None:
    token = sign(good_claims(auth_time=_DROP))
    assert verify(token).auth_time is None
    assert reason_of(token, require_auth_time=True) == "auth_time"


# --------------------------------------------------------- algorithms and keys


def test_alg_none_is_rejected() -> None:
    header = b64(json.dumps({"alg": "none", "kid": RSA_KEY.kid}).encode())
    payload = b64(json.dumps(good_claims()).encode())
    token = f"{header}.{payload}."
    assert reason_of(token) == "alg"
    assert reason_of(token, allowed_algs=(*ALGS, "none")) == "alg"


@pytest.mark.parametrize("allowed", [ALGS, (*ALGS, "HS256")], ids=["default", "hs256_configured"])
def test_hs256_signed_with_the_public_key_is_rejected(allowed: tuple[str, ...]) -> None:
    # The classic algorithm-confusion forgery: anyone can fetch the public PEM.
    header = b64(json.dumps({"alg": "HS256", "kid": RSA_KEY.kid, "typ": "JWT"}).encode())
    payload = b64(json.dumps(good_claims()).encode())
    mac = hmac.new(RSA_KEY.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256)
    token = f"{header}.{payload}.{b64(mac.digest())}"
    assert reason_of(token, allowed_algs=allowed) == "alg"


def test_alg_outside_the_allow_list_is_rejected() -> None:
    assert reason_of(sign(good_claims()), allowed_algs=("ES256",)) == "alg"


@pytest.mark.parametrize(
    ("token_key", "alg", "verify_key"),
    [
        (RSA_KEY, "RS256", EC_KEY),  # RSA token, EC key
        (EC_KEY, "ES256", RSA_KEY),  # EC token, RSA key
    ],
    ids=["rs256_with_ec_key", "es256_with_rsa_key"],
)
def test_key_type_must_fit_the_alg(token_key: Any, alg: str, verify_key: Any) -> None:
    assert reason_of(sign(good_claims(), token_key, alg=alg), jwk(verify_key)) == "key_type"


def test_es384_header_with_a_p256_key_is_rejected() -> None:
    forged = sign(good_claims(), EC_KEY).split(".")
    forged[0] = b64(json.dumps({"alg": "ES384", "kid": EC_KEY.kid}).encode())
    assert reason_of(".".join(forged), jwk(EC_KEY)) == "key_type"


def test_header_alg_must_match_the_keys_bound_alg() -> None:
    # The JWK says RS256; a PS256 header must not switch the verification algorithm.
    assert reason_of(sign(good_claims(), alg="PS256"), jwk(RSA_KEY)) == "alg"


def test_signature_by_another_key_is_rejected() -> None:
    assert reason_of(sign(good_claims(), OTHER_RSA, kid=RSA_KEY.kid)) == "bad_signature"


def test_tampered_payload_is_rejected() -> None:
    header, _, signature = sign(good_claims()).split(".")
    payload = b64(json.dumps(good_claims(acr="phr", amr=["hwk"])).encode())
    assert reason_of(f"{header}.{payload}.{signature}") == "bad_signature"


# ------------------------------------------------------------------- malformed

MALFORMED: list[tuple[str, str]] = [
    ("empty", ""),
    ("one_part", "abc"),
    ("two_parts", "abc.def"),
    ("four_parts", "a.b.c.d"),
    ("header_not_base64", "%%%.e30.sig"),
    ("header_not_json", f"{b64(b'nope')}.e30.sig"),
    ("header_is_a_list", f"{b64(b'[1]')}.e30.sig"),
    ("alg_missing", f"{b64(json.dumps({'kid': 'x'}).encode())}.e30.sig"),
    ("alg_number", f"{b64(json.dumps({'alg': 256}).encode())}.e30.sig"),
    ("kid_number", f"{b64(json.dumps({'alg': 'RS256', 'kid': 1}).encode())}.e30.sig"),
    ("oversized", "a" * 70_000 + ".b.c"),
]


@pytest.mark.parametrize("token", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_tokens(token: str) -> None:
    assert reason_of(token) == "malformed"


@pytest.mark.parametrize(
    "payload", [[1, 2], "a string", 42, None], ids=["list", "string", "number", "null"]
)
def test_payload_must_be_an_object(payload: Any) -> None:
    header = b64(json.dumps({"alg": "RS256", "kid": RSA_KEY.kid}).encode())
    body = b64(json.dumps(payload).encode())
    signing_input = f"{header}.{body}".encode()
    signature = jwt.get_algorithm_by_name("RS256").sign(signing_input, RSA_KEY.private_key)
    assert reason_of(f"{header}.{body}.{b64(signature)}") == "malformed"


def test_detached_payload_header_is_rejected() -> None:
    token = sign(good_claims(), b64=False, crit=["b64"])
    assert reason_of(token) == "malformed"


@given(st.text(max_size=300))
def test_any_string_is_rejected_cleanly(token: str) -> None:
    with pytest.raises(IdTokenError):
        verify(token)


@given(st.lists(st.binary(max_size=60), min_size=3, max_size=3))
def test_any_three_segments_are_rejected_cleanly(parts: list[bytes]) -> None:
    with pytest.raises(IdTokenError):
        verify(".".join(b64(p) for p in parts))


# ------------------------------------------- the test provider's misbehaviour table


@pytest.mark.parametrize(
    ("knobs", "reason"),
    [v for k, v in ID_TOKEN_MISBEHAVIOURS.items() if k != "unknown_kid"],
    ids=[k for k in ID_TOKEN_MISBEHAVIOURS if k != "unknown_kid"],
)
def test_provider_misbehaviours_fail_their_check(knobs: dict[str, Any], reason: str) -> None:
    # unknown_kid is about choosing the key: tests/test_provider.py covers it.
    op = OpenIdProvider(ISSUER)
    op.behaviour.now = lambda: NOW
    verify(op.make_id_token(nonce=NONCE))  # the same provider, behaving, passes
    for name, value in knobs.items():
        setattr(op.behaviour, name, value)
    assert reason_of(op.make_id_token(nonce=NONCE), jwk(RSA_KEY)) == reason


def test_well_behaved_provider_token_passes() -> None:
    op = OpenIdProvider(ISSUER)
    op.behaviour.now = lambda: NOW
    claims = verify(op.make_id_token(nonce=NONCE))
    assert (claims.acr, claims.amr) == ("urn:example:loa:1", ("pwd",))


def test_missing_auth_time_misbehaviour() -> None:
    knobs, reason = MISSING_AUTH_TIME
    op = OpenIdProvider(ISSUER)
    op.behaviour.now = lambda: NOW
    for name, value in knobs.items():
        setattr(op.behaviour, name, value)
    assert reason_of(op.make_id_token(nonce=NONCE), require_auth_time=True) == reason


# ------------------------------------------------------- back-channel logout tokens


def logout_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "iat": NOW,
        "jti": "j-1",
        "sub": "user-1",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    claims.update(changes)
    return claims


def logout_reason(claims: dict[str, Any]) -> str:
    with pytest.raises(IdTokenError) as caught:
        verify_logout_token(
            sign(claims),
            jwk(RSA_KEY),
            issuer=ISSUER,
            client_id=CLIENT_ID,
            now=NOW,
            skew_s=SKEW,
            allowed_algs=ALGS,
        )
    return caught.value.reason


LOGOUT_TIME_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("nbf_future_beyond_skew", {"nbf": NOW + SKEW + 1}, "nbf"),
    ("nbf_string", {"nbf": "later"}, "malformed"),
    ("exp_nan", {"exp": float("nan")}, "malformed"),  # NaN <= now is False: never expired
    ("exp_bool", {"exp": True}, "malformed"),
    ("exp_past", {"exp": NOW - SKEW}, "exp"),
    ("iat_bool", {"iat": True}, "malformed"),
    ("iat_future_beyond_skew", {"iat": NOW + SKEW + 1}, "iat"),
]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [c[1:] for c in LOGOUT_TIME_CASES],
    ids=[c[0] for c in LOGOUT_TIME_CASES],
)
def test_logout_token_times_are_checked(changes: dict[str, Any], reason: str) -> None:
    assert logout_reason(logout_claims(**changes)) == reason


def test_logout_token_with_past_nbf_and_fractional_iat_passes() -> None:
    claims = verify_logout_token(
        sign(logout_claims(nbf=NOW - 5, iat=NOW + 0.5, exp=NOW + 120)),
        jwk(RSA_KEY),
        issuer=ISSUER,
        client_id=CLIENT_ID,
        now=NOW,
        skew_s=SKEW,
        allowed_algs=ALGS,
    )
    assert (claims.sub, claims.iat) == ("user-1", NOW)


# ------------------------------------------------------------- email_verified

EMAIL_CASES: list[tuple[str, dict[str, Any], bool, str | None]] = [
    # (id, claim changes, assume_email_verified, the email the gateway forwards)
    ("verified", {"email_verified": True}, False, "alice@example.com"),
    ("unverified", {"email_verified": False}, False, None),
    ("unverified_even_when_assuming", {"email_verified": False}, True, None),
    ("not_said", {}, False, None),
    ("not_said_assumed", {}, True, "alice@example.com"),
    ("string_true_is_not_a_boolean", {"email_verified": "true"}, False, None),
    ("string_true_not_absent_either", {"email_verified": "true"}, True, None),
    ("number_one", {"email_verified": 1}, True, None),
    ("null", {"email_verified": None}, True, None),
    ("no_email", {"email": _DROP, "email_verified": True}, False, None),
]


@pytest.mark.parametrize(
    ("changes", "assume", "expected"),
    [c[1:] for c in EMAIL_CASES],
    ids=[c[0] for c in EMAIL_CASES],
)
def test_only_a_verified_email_is_vouched_for(
    changes: dict[str, Any], assume: bool, expected: str | None
) -> None:
    claims = verify(sign(good_claims(**changes)))
    assert verified_email(claims, assume_verified=assume) == expected


def test_claim_value_names_the_claim() -> None:
    with pytest.raises(IdTokenError) as caught:
        verify(sign(good_claims(email="a@example.com\r\nX-Evil: 1")))
    assert (caught.value.reason, caught.value.claim) == ("claim_value", "email")
    assert "X-Evil" not in str(caught.value)  # never the token's contents
