"""The pure half of the OIDC client: PKCE, the authorization request, the callback,
metadata and token-response parsing."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors, model
from gateway.oidc import flow

ISSUER = "https://op.example"
CFG = model.OidcConfig(issuer=ISSUER, client_id="gateway", client_secret="secret")


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/authorize",
        "token_endpoint": f"{ISSUER}/token",
        "jwks_uri": f"{ISSUER}/jwks",
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    for name, value in changes.items():
        if value is None:
            doc.pop(name, None)
        else:
            doc[name] = value
    return doc


META = flow.parse_metadata(document(), issuer=ISSUER)


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def auth_url(cfg: model.OidcConfig = CFG, meta: flow.ProviderMetadata = META, **kw: Any) -> str:
    args: dict[str, Any] = {
        "redirect_uri": "https://gw.example/_gateway/callback",
        "state": "st",
        "nonce": "no",
        "code_challenge": "ch",
    }
    args.update(kw)
    return flow.authorization_url(meta, cfg, **args)


# ------------------------------------------------------------------------- PKCE


def test_pkce_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert flow.pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_pkce_is_random_and_well_formed() -> None:
    pairs = {flow.new_pkce() for _ in range(20)}
    assert len(pairs) == 20
    for verifier, challenge in pairs:
        assert 43 <= len(verifier) <= 128  # RFC 7636 4.1
        assert challenge == flow.pkce_challenge(verifier)
        assert len(challenge) == 43 and "=" not in challenge


def test_random_token() -> None:
    assert len({flow.random_token() for _ in range(50)}) == 50
    assert len(flow.random_token(16)) == 22


# ---------------------------------------------------------- authorization request


def test_authorization_url_carries_the_code_flow_parameters() -> None:
    q = query(auth_url())
    assert q == {
        "response_type": ["code"],
        "scope": ["openid profile email"],
        "client_id": ["gateway"],
        "redirect_uri": ["https://gw.example/_gateway/callback"],
        "state": ["st"],
        "nonce": ["no"],
        "code_challenge": ["ch"],
        "code_challenge_method": ["S256"],
    }
    assert auth_url().startswith(f"{ISSUER}/authorize?")


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"acr_values": ["phr", "urn:example:loa:2"]}, {"acr_values": ["phr urn:example:loa:2"]}),
        ({"max_age_s": 300}, {"max_age": ["300"]}),
        ({"max_age_s": 0}, {"max_age": ["0"], "prompt": ["login"]}),
        ({"login_hint": "alice@example.com"}, {"login_hint": ["alice@example.com"]}),
        ({"extra": {"ui_locales": "de"}}, {"ui_locales": ["de"]}),
    ],
    ids=["acr_values_in_order", "max_age", "max_age_zero", "login_hint", "extra"],
)
def test_optional_parameters(kw: dict[str, Any], expected: dict[str, list[str]]) -> None:
    q = query(auth_url(**kw))
    for name, value in expected.items():
        assert q[name] == value
    assert "prompt" not in q or "prompt" in expected
    assert "claims" not in q


def test_essential_acr_adds_a_claims_request() -> None:
    cfg = model.OidcConfig(
        issuer=ISSUER, client_id="gateway", client_secret="s", essential_acr=True
    )
    q = query(auth_url(cfg, acr_values=["phr", "phrh"]))
    assert json.loads(q["claims"][0]) == {
        "id_token": {"acr": {"essential": True, "values": ["phr", "phrh"]}}
    }
    assert "claims" not in query(auth_url(cfg))  # nothing asked, nothing essential


def test_extra_parameters_cannot_override_the_security_ones() -> None:
    extra = {"state": "evil", "code_challenge_method": "plain", "redirect_uri": "https://evil"}
    q = query(auth_url(extra=extra))
    assert q["state"] == ["st"]
    assert q["code_challenge_method"] == ["S256"]
    assert q["redirect_uri"] == ["https://gw.example/_gateway/callback"]


def test_endpoint_query_is_kept_but_not_duplicated() -> None:
    meta = flow.parse_metadata(
        document(authorization_endpoint=f"{ISSUER}/authorize?tenant=a&state=old"), issuer=ISSUER
    )
    q = query(auth_url(meta=meta))
    assert q["tenant"] == ["a"]
    assert q["state"] == ["st"]


def test_end_session_url() -> None:
    assert flow.end_session_url(META, client_id="gateway") is None
    meta = flow.parse_metadata(document(end_session_endpoint=f"{ISSUER}/logout"), issuer=ISSUER)
    url = flow.end_session_url(
        meta,
        client_id="gateway",
        id_token_hint="t",
        post_logout_redirect_uri="https://gw/",
        state="s",
    )
    assert url is not None
    assert query(url) == {
        "client_id": ["gateway"],
        "id_token_hint": ["t"],
        "post_logout_redirect_uri": ["https://gw/"],
        "state": ["s"],
    }


# --------------------------------------------------------------------- metadata


def test_metadata_defaults() -> None:
    assert META.token_endpoint_auth_methods == ("client_secret_basic",)  # Discovery 3
    assert META.iss_parameter_supported is False
    assert META.end_session_endpoint is None
    assert META.raw["issuer"] == ISSUER


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"issuer": ISSUER + "/"}, "issuer_mismatch"),
        ({"issuer": None}, "issuer_mismatch"),
        ({"authorization_endpoint": None}, "metadata_invalid"),
        ({"token_endpoint": "http://op.example/token"}, "metadata_invalid"),  # https issuer
        ({"jwks_uri": "jwks"}, "metadata_invalid"),
        ({"jwks_uri": 42}, "metadata_invalid"),
        ({"userinfo_endpoint": "ftp://op.example/ui"}, "metadata_invalid"),
        ({"response_types_supported": ["id_token"]}, "metadata_invalid"),
        ({"id_token_signing_alg_values_supported": "RS256"}, "metadata_invalid"),
        ({"backchannel_logout_supported": "true"}, "metadata_invalid"),
    ],
    ids=[
        "issuer_slash",
        "issuer_missing",
        "no_authorization_endpoint",
        "http_endpoint_for_https_issuer",
        "relative_jwks_uri",
        "jwks_uri_number",
        "ftp_userinfo",
        "no_code",
        "algs_not_list",
        "flag_not_bool",
    ],
)
def test_bad_metadata(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(errors.ProviderError) as caught:
        flow.parse_metadata(document(**changes), issuer=ISSUER)
    assert caught.value.reason == reason


@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_metadata_must_be_an_object(body: Any) -> None:
    with pytest.raises(errors.ProviderError):
        flow.parse_metadata(body, issuer=ISSUER)


def test_http_endpoints_are_fine_for_an_http_issuer() -> None:
    issuer = "http://127.0.0.1:9001"
    doc = {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/a",
        "token_endpoint": f"{issuer}/t",
        "jwks_uri": f"{issuer}/k",
    }
    assert flow.parse_metadata(doc, issuer=issuer).token_endpoint == f"{issuer}/t"


# --------------------------------------------------------------------- callback

ADVERTISING = flow.parse_metadata(
    document(authorization_response_iss_parameter_supported=True), issuer=ISSUER
)


@pytest.mark.parametrize(
    ("meta", "params", "reason"),
    [
        (ADVERTISING, {"code": "c", "state": "s"}, "callback_iss_missing"),
        (ADVERTISING, {"code": "c", "state": "s", "iss": "https://evil"}, "callback_iss_mismatch"),
        (META, {"code": "c", "state": "s", "iss": ISSUER + "/"}, "callback_iss_mismatch"),
        (ADVERTISING, {"error": "access_denied", "state": "s"}, "callback_iss_missing"),
        (META, {"state": "s"}, "callback_no_code"),
        (META, {"code": "", "state": "s"}, "callback_no_code"),
        (META, {"code": "c"}, "callback_no_state"),
    ],
    ids=[
        "advertised_missing",
        "advertised_wrong",
        "not_advertised_but_wrong",
        "error_without_iss",
        "no_code",
        "empty_code",
        "no_state",
    ],
)
def test_bad_callbacks(meta: flow.ProviderMetadata, params: dict[str, str], reason: str) -> None:
    with pytest.raises(flow.CallbackError) as caught:
        flow.parse_callback(meta, params)
    assert caught.value.reason == reason
    assert isinstance(caught.value, errors.BadRequest)


@pytest.mark.parametrize(
    ("meta", "params", "expected"),
    [
        (ADVERTISING, {"code": "c", "state": "s", "iss": ISSUER}, flow.Callback("s", code="c")),
        (META, {"code": "c", "state": "s"}, flow.Callback("s", code="c")),
        (META, {"code": "c", "state": "s", "iss": ISSUER}, flow.Callback("s", code="c")),
        (
            ADVERTISING,
            {"error": "login_required", "state": "s", "iss": ISSUER},
            flow.Callback("s", error="login_required"),
        ),
        (
            META,
            {"error": "no\nway", "error_description": "d"},
            flow.Callback(None, error="invalid_error", error_description="d"),
        ),
    ],
    ids=["advertised", "not_advertised", "not_advertised_but_sent", "error", "odd_error"],
)
def test_good_callbacks(
    meta: flow.ProviderMetadata, params: dict[str, str], expected: flow.Callback
) -> None:
    assert flow.parse_callback(meta, params) == expected


@given(st.dictionaries(st.sampled_from(["code", "state", "iss", "error", "x"]), st.text()))
def test_any_callback_is_parsed_or_refused_cleanly(params: dict[str, str]) -> None:
    try:
        callback = flow.parse_callback(ADVERTISING, params)
    except flow.CallbackError:
        return
    assert params["iss"] == ISSUER
    assert callback.error is not None or (callback.code and callback.state)


# --------------------------------------------------------------- token request


def test_client_secret_basic_form_encodes_first() -> None:
    cfg = model.OidcConfig(issuer=ISSUER, client_id="my app", client_secret="a:b%c+d/é")
    headers, fields = flow.token_request_auth(cfg)
    assert fields == {}
    scheme, _, value = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(value).decode().partition(":")
    assert user == "my+app"
    assert ":" not in password
    assert (unquote_plus(user), unquote_plus(password)) == ("my app", "a:b%c+d/é")


def test_client_secret_post() -> None:
    cfg = model.OidcConfig(
        issuer=ISSUER, client_id="gw", client_secret="s", client_auth="client_secret_post"
    )
    assert flow.token_request_auth(cfg) == ({}, {"client_id": "gw", "client_secret": "s"})


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, {"error": "invalid_grant", "error_description": "code reused"}, "invalid_grant"),
        (401, {"error": "invalid_client"}, "invalid_client"),
        (400, {"error": "<script>"}, "invalid_error"),
        (400, {"error": 7}, "invalid_error"),
        (400, None, "token_response_invalid"),
        (500, {"oops": 1}, "token_response_invalid"),
        (200, ["id_token"], "token_response_invalid"),
        (200, {"error": "invalid_grant"}, "token_response_no_id_token"),
        (200, {"access_token": "a"}, "token_response_no_id_token"),
        (200, {"id_token": ""}, "token_response_no_id_token"),
    ],
)
def test_bad_token_responses(status: int, body: Any, reason: str) -> None:
    with pytest.raises(errors.ProviderError) as caught:
        flow.parse_token_response(status, body)
    assert caught.value.reason == reason
    assert "code reused" not in caught.value.message


def test_good_token_response() -> None:
    body = {"id_token": "a.b.c", "access_token": "x", "token_type": "Bearer"}
    assert flow.parse_token_response(200, body) == body
