"""OpenID Connect decisions that need no network: PKCE, the authorization request,
the callback and the token response; the token checks are :mod:`gateway.oidc.tokens`
(their names are importable from here too).

Everything here is a pure function of its arguments (the clock comes in as
``now``), so the rules of OpenID Connect Core can be tested as tables. The
network half lives in :mod:`gateway.oidc.provider`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt

from gateway import errors, model
from gateway.oidc import profiles
from gateway.oidc.tokens import (
    BACKCHANNEL_LOGOUT_EVENT,
    ID_TOKEN_MAX_AGE_S,
    LOGOUT_TOKEN_MAX_AGE_S,
    MAX_AMR_VALUE_BYTES,
    MAX_AMR_VALUES,
    MAX_CLAIM_BYTES,
    MAX_ID_TOKEN_CHARS,
    IdTokenClaims,
    IdTokenError,
    LogoutClaims,
    check_header_claim,
    key_fits_alg,
    numeric_date,
    unverified_header,
    usable_algs,
    verified_email,
    verified_payload,
    verify_id_token,
    verify_logout_token,
)

# RFC 7636 4.1: 32 random octets give the 43-character verifier the spec recommends.
PKCE_VERIFIER_BYTES = 32

# RFC 6749 5.2 / A.7: error codes are printable ASCII; we only pass on the
# conservative subset so a hostile provider cannot put anything odd in our logs.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


# Its own names, and the token checks, importable from here as before they moved.
__all__ = [
    "BACKCHANNEL_LOGOUT_EVENT",
    "ID_TOKEN_MAX_AGE_S",
    "LOGOUT_TOKEN_MAX_AGE_S",
    "MAX_AMR_VALUES",
    "MAX_AMR_VALUE_BYTES",
    "MAX_CLAIM_BYTES",
    "MAX_ID_TOKEN_CHARS",
    "PKCE_VERIFIER_BYTES",
    "Callback",
    "CallbackError",
    "IdTokenClaims",
    "IdTokenError",
    "LogoutClaims",
    "ProviderMetadata",
    "authorization_url",
    "check_callback_iss",
    "check_header_claim",
    "end_session_url",
    "key_fits_alg",
    "new_pkce",
    "numeric_date",
    "parse_callback",
    "parse_metadata",
    "parse_token_response",
    "pkce_challenge",
    "random_token",
    "token_request_auth",
    "unverified_header",
    "usable_algs",
    "verified_email",
    "verified_payload",
    "verify_id_token",
    "verify_logout_token",
]

# --------------------------------------------------------------------------- errors


class CallbackError(errors.BadRequest):
    """The authorization response on the redirect URI is unusable (400)."""


# ------------------------------------------------------------------------- metadata


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of the provider's discovery document the gateway uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    userinfo_endpoint: str | None
    iss_parameter_supported: bool  # RFC 9207
    id_token_signing_algs: tuple[str, ...]
    token_endpoint_auth_methods: tuple[str, ...]
    backchannel_logout_supported: bool
    raw: Mapping[str, object]
    code_challenge_methods: tuple[str, ...] = ()
    acr_values_supported: tuple[str, ...] = ()
    introspection_endpoint: str | None = None  # RFC 8414 2 (RFC 7662)


def parse_metadata(document: object, *, issuer: str) -> ProviderMetadata:
    """Validate a discovery document (OpenID Connect Discovery 1.0, section 3).

    Raises :class:`errors.ProviderError` with a reason code when the document is
    not usable. ``issuer`` must match exactly (Discovery 4.3): no trailing-slash
    or case folding, otherwise a mix-up between providers becomes possible.
    """
    if not isinstance(document, Mapping):
        raise _bad_metadata("metadata_not_object", "is not a JSON object")
    if document.get("issuer") != issuer:
        raise _bad_metadata("issuer_mismatch", "names a different issuer than configured")
    https_only = urlsplit(issuer).scheme == "https"

    def url(name: str, *, required: bool) -> str | None:
        value = document.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not _is_absolute_url(value, https_only=https_only):
            raise _bad_metadata("metadata_invalid", f"has no usable {name}")
        return value

    def strings(name: str) -> tuple[str, ...]:
        value = document.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad_metadata("metadata_invalid", f"has a malformed {name}")
        return tuple(value)

    def flag(name: str) -> bool:
        value = document.get(name, False)
        if not isinstance(value, bool):
            raise _bad_metadata("metadata_invalid", f"has a malformed {name}")
        return value

    response_types = strings("response_types_supported")
    if response_types and "code" not in response_types:
        raise _bad_metadata("metadata_invalid", "does not offer response_type=code")
    auth_methods = strings("token_endpoint_auth_methods_supported")
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=_required(url("authorization_endpoint", required=True)),
        token_endpoint=_required(url("token_endpoint", required=True)),
        jwks_uri=_required(url("jwks_uri", required=True)),
        end_session_endpoint=url("end_session_endpoint", required=False),
        userinfo_endpoint=url("userinfo_endpoint", required=False),
        iss_parameter_supported=flag("authorization_response_iss_parameter_supported"),
        id_token_signing_algs=strings("id_token_signing_alg_values_supported"),
        # Discovery 3: "If omitted, the default is client_secret_basic".
        token_endpoint_auth_methods=auth_methods or ("client_secret_basic",),
        backchannel_logout_supported=flag("backchannel_logout_supported"),
        raw=dict(document),
        code_challenge_methods=strings("code_challenge_methods_supported"),
        acr_values_supported=strings("acr_values_supported"),
        introspection_endpoint=url("introspection_endpoint", required=False),
    )


def _required(value: str | None) -> str:
    if value is None:  # unreachable: url(required=True) raises instead
        raise _bad_metadata("metadata_invalid", "lacks a required endpoint")
    return value


def _bad_metadata(reason: str, what: str) -> errors.ProviderError:
    return errors.ProviderError(f"The identity provider's metadata {what}.", reason=reason)


def _is_absolute_url(value: str, *, https_only: bool) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    allowed = ("https",) if https_only else ("https", "http")
    return parts.scheme in allowed and bool(parts.netloc) and not parts.fragment


# ------------------------------------------------------------- authorization request


def parse_jwks(body: object) -> tuple[dict[str, Any], ...]:
    """RFC 7517 5: a JSON object with ``keys``; keep the public signing keys we can use."""
    keys = body.get("keys") if isinstance(body, Mapping) else None
    if not isinstance(keys, list):
        raise errors.ProviderError(
            "The identity provider's key set is malformed.", reason="jwks_invalid"
        )
    usable = tuple(
        dict(jwk)
        for jwk in keys
        # Symmetric keys have no place in a public key set; dropping them here
        # means no code path can ever verify a token with one.
        if isinstance(jwk, dict) and jwk.get("kty") in ("RSA", "EC", "OKP")
    )
    try:
        jwt.PyJWKSet(list(usable))  # at least one key pyjwt can load
    except jwt.PyJWTError:
        raise errors.ProviderError(
            "The identity provider's key set has no usable key.", reason="jwks_invalid"
        ) from None
    return usable


def random_token(nbytes: int = 32) -> str:
    """A URL-safe random string (state, nonce, ids)."""
    return secrets.token_urlsafe(nbytes)


def new_pkce() -> tuple[str, str]:
    """Return ``(code_verifier, code_challenge)`` for PKCE with S256 (RFC 7636 4.1-4.2)."""
    verifier = secrets.token_urlsafe(PKCE_VERIFIER_BYTES)
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    meta: ProviderMetadata,
    cfg: model.OidcConfig,
    *,
    redirect_uri: str,
    state: str,
    nonce: str,
    code_challenge: str,
    acr_values: Sequence[str] = (),
    max_age_s: int | None = None,
    login_hint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """Build the authorization request URL (OIDC Core 3.1.2.1, RFC 7636, RFC 9470).

    ``acr_values`` keeps the caller's order (strongest first); the provider profile
    (:mod:`gateway.oidc.profiles`) decides how they and ``max_age_s`` are sent.
    """
    params: dict[str, str] = {
        "response_type": "code",
        "scope": " ".join(cfg.scopes),
        "client_id": cfg.client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "nonce": nonce,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
    }
    # How the level is asked for is the provider profile's business (acr_values, an
    # essential acr or acrs in the claims parameter, max_age or prompt=login).
    params.update(
        profiles.authorization_params(
            profiles.get(cfg.profile), acr_values, max_age_s, essential_acr=cfg.essential_acr
        )
    )
    if login_hint:
        params["login_hint"] = login_hint
    for name, value in (extra or {}).items():
        params.setdefault(name, value)  # never let extras override the security params
    return _with_query(meta.authorization_endpoint, params)


def end_session_url(
    meta: ProviderMetadata,
    *,
    client_id: str,
    id_token_hint: str | None = None,
    post_logout_redirect_uri: str | None = None,
    state: str | None = None,
) -> str | None:
    """RP-Initiated Logout 1.0 request URL, or None if the provider has no endpoint."""
    if meta.end_session_endpoint is None:
        return None
    params = {"client_id": client_id}
    if id_token_hint:
        params["id_token_hint"] = id_token_hint
    if post_logout_redirect_uri:
        params["post_logout_redirect_uri"] = post_logout_redirect_uri
    if state:
        params["state"] = state
    return _with_query(meta.end_session_endpoint, params)


def _with_query(endpoint: str, params: Mapping[str, str]) -> str:
    # The endpoint may carry its own query (OIDC Core 3.1.2.1 allows it); keep it.
    parts = urlsplit(endpoint)
    existing = parse_qsl(parts.query, keep_blank_values=True)
    taken = set(params)
    query = urlencode([*((k, v) for k, v in existing if k not in taken), *params.items()])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


# ------------------------------------------------------------------------ callback


@dataclass(frozen=True, slots=True)
class Callback:
    """The authorization response: either ``code`` or ``error`` is set."""

    state: str | None
    code: str | None = None
    error: str | None = None
    error_description: str | None = None


def check_callback_iss(
    meta: ProviderMetadata, params: Mapping[str, str], *, required: bool = False
) -> None:
    """RFC 9207 mix-up defence on the authorization response.

    When the provider advertises ``authorization_response_iss_parameter_supported``
    (or ``required``: FAPI 2.0 Security Profile 5.3.3.2) the ``iss`` parameter must be
    present and equal the issuer (RFC 9207 2.4); when it does not advertise it, an
    ``iss`` that is present must still match.
    """
    iss = params.get("iss")
    if iss is None:
        if meta.iss_parameter_supported or required:
            raise CallbackError(
                "The sign-in response did not say which provider sent it.",
                reason="callback_iss_missing",
            )
        return
    if not hmac.compare_digest(iss.encode(), meta.issuer.encode()):
        raise CallbackError(
            "The sign-in response came from a different provider.",
            reason="callback_iss_mismatch",
        )


def parse_callback(
    meta: ProviderMetadata, params: Mapping[str, str], *, profile: str = "generic"
) -> Callback:
    """Read the authorization response (OIDC Core 3.1.2.5-6) after the RFC 9207 check.

    Raises :class:`CallbackError` for an unusable response. A provider error such as
    ``access_denied`` or ``unmet_authentication_requirements`` is returned, not
    raised, because what to show the user is the caller's decision. An error that the
    provider ``profile`` reads as "this user cannot meet the level" (an Entra
    Conditional Access block) comes back as ``unmet_authentication_requirements``.
    """
    check_callback_iss(meta, params, required=profile == "fapi2")
    state = params.get("state") or None
    error = params.get("error")
    if error is not None:
        code = error if _ERROR_CODE.fullmatch(error) else "invalid_error"
        if profiles.cannot_meet(profiles.get(profile), code, params.get("error_description")):
            code = profiles.UNMET
        return Callback(state=state, error=code, error_description=params.get("error_description"))
    code_value = params.get("code")
    if not code_value:
        raise CallbackError("The sign-in response carried no code.", reason="callback_no_code")
    if state is None:
        raise CallbackError("The sign-in response carried no state.", reason="callback_no_state")
    return Callback(state=state, code=code_value)


# ------------------------------------------------------------------ token response


def token_request_auth(
    cfg: model.OidcConfig,
) -> tuple[dict[str, str], dict[str, str]]:
    """Client authentication for the token request: ``(headers, form fields)``.

    ``client_secret_basic`` form-urlencodes id and secret before base64
    (RFC 6749 2.3.1 and appendix B), which matters for secrets with ``:`` or ``%``.
    """
    if cfg.client_auth == "client_secret_post":
        return {}, {"client_id": cfg.client_id, "client_secret": cfg.client_secret}
    user = _form_encode(cfg.client_id)
    password = _form_encode(cfg.client_secret)
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {credentials}"}, {}


def _form_encode(value: str) -> str:
    return urlencode({"": value})[1:]


def parse_token_response(
    status: int, body: object, *, profile: str = "generic"
) -> Mapping[str, object]:
    """Check a token endpoint answer (RFC 6749 5.1/5.2, OIDC Core 3.1.3.3).

    Raises :class:`errors.ProviderError` whose ``reason`` is the provider's error
    code (``invalid_grant`` ...) when it refused, ``token_response_invalid`` when
    the answer is not a usable token response. Never echoes the body. An error the
    ``profile`` reads as "cannot meet the level" (Entra's ``error_codes`` 53000-53004)
    has the reason ``unmet_authentication_requirements``.
    """
    if isinstance(body, Mapping) and "error" in body and status != 200:
        raw_code = body.get("error")
        code = raw_code if isinstance(raw_code, str) and _ERROR_CODE.fullmatch(raw_code) else None
        code = code or "invalid_error"
        description = body.get("error_description")
        error_codes = body.get("error_codes")
        if profiles.cannot_meet(
            profiles.get(profile),
            code,
            description if isinstance(description, str) else None,
            error_codes if isinstance(error_codes, list) else (),
        ):
            code = profiles.UNMET
        raise errors.ProviderError(
            f"The identity provider refused the sign-in ({code}).", reason=code
        )
    if status != 200 or not isinstance(body, Mapping):
        raise errors.ProviderError(
            "The identity provider sent an unusable token response.",
            reason="token_response_invalid",
        )
    id_token = body.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise errors.ProviderError(
            "The identity provider sent no ID token.", reason="token_response_no_id_token"
        )
    return dict(body)
