"""OpenID Connect token checks that need no network: the ID token and the logout token.

Signature (with the allowed algorithms only), issuer, audience, times, nonce,
and the claims the gateway passes on (bounded, no control characters). Pure
functions of their arguments; the clock comes in as ``now``. The rest of the
flow (metadata, PKCE, the authorization request, the callback, the token
response) is :mod:`gateway.oidc.flow`; the network half :mod:`gateway.oidc.provider`.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

# OIDC Core 3.1.3.7 (10): "The iat Claim can be used to reject tokens that were
# issued too far away from the current time". The code was exchanged moments ago,
# so an ID token minted more than this long ago is a replay, not a slow network.
ID_TOKEN_MAX_AGE_S = 10 * 60

# A signed ID token is a few KiB; anything bigger is not one we asked for, and we
# refuse it before spending CPU on base64 and JSON.
MAX_ID_TOKEN_CHARS = 64 * 1024

# Never accepted, whatever the configuration says: "none" is unsigned, and an HMAC
# alg would let anybody who knows the provider's *public* key forge tokens
# (RFC 8725 2.1, 3.1: algorithm confusion). OIDC Core 10.1 allows HS* only with
# the client secret as key, which this gateway does not support.
_FORBIDDEN_ALGS = frozenset({"none", "HS256", "HS384", "HS512"})

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_OKP_ALGS = frozenset({"EdDSA", "Ed25519", "Ed448"})

# Claims that reach the upstream in X-Auth-* headers, in bytes of UTF-8. OIDC Core 2:
# sub "MUST NOT exceed 255 ASCII characters"; RFC 5321 4.5.3.1.3 bounds an address
# at 254 octets; acr is a short URI or name (the longest in common use is ~70).
# RFC 8176 amr values are a few letters ("pwd", "hwk"), a provider's own are words.
# Together they bound the X-Auth-* headers, assertion included, to about 3 KiB for
# ASCII claims and 7.5 KiB at worst (every limit reached in percent-encoded UTF-8),
# under the 8 KiB that Jetty, Tomcat and gunicorn accept by default.
MAX_CLAIM_BYTES = {"sub": 255, "email": 254, "acr": 128}
MAX_AMR_VALUES = 10
MAX_AMR_VALUE_BYTES = 32
# Control characters (C0, DEL, C1), lone surrogates (not encodable as UTF-8) and the
# Unicode line and paragraph separators (line breaks to JavaScript): a value holding
# one is not an identifier any upstream should have to handle.
_UNSAFE_CLAIM_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


class IdTokenError(Exception):
    """An ID token (or the callback carrying it) failed a check.

    ``reason`` is a short machine code for logs and metrics: ``malformed``,
    ``alg``, ``key_type``, ``bad_signature``, ``iss``, ``aud``, ``azp``, ``exp``,
    ``nbf``, ``iat``, ``auth_time``, ``nonce``, ``kid``, ``sub``, ``claim_value`` (a
    claim the gateway would pass on holds a control character or is too long). For
    ``malformed`` and ``claim_value`` the offending claim is in ``claim``. Never
    carries token contents.
    """

    def __init__(self, reason: str, *, claim: str | None = None) -> None:
        detail = f"{reason} ({claim})" if claim else reason
        super().__init__(f"ID token rejected: {detail}")
        self.reason = reason
        self.claim = claim


# ----------------------------------------------------------------------- ID token


@dataclass(frozen=True, slots=True)
class IdTokenClaims:
    """The verified claims of an ID token that the gateway uses."""

    iss: str
    sub: str
    aud: tuple[str, ...]
    exp: int
    iat: int
    nonce: str | None
    acr: str | None
    amr: tuple[str, ...]
    auth_time: int | None
    sid: str | None
    email: str | None
    name: str | None
    azp: str | None
    nbf: int | None = None
    # OIDC Core 5.1: true, false, or None when the provider did not say. Anything but
    # a JSON boolean (a string "true", a number) is read as False: not vouched for.
    email_verified: bool | None = None
    # Entra's authentication contexts ("acrs", an array of c1..c99), read by the entra
    # profile; bounded like amr.
    acrs: tuple[str, ...] = ()


def unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, for choosing the key. Nothing in it is trusted yet."""
    if not isinstance(token, str) or len(token) > MAX_ID_TOKEN_CHARS or token.count(".") != 2:
        raise IdTokenError("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise IdTokenError("malformed") from None
    if not isinstance(header.get("alg"), str):
        raise IdTokenError("malformed", claim="alg")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise IdTokenError("malformed", claim="kid")
    return header


def usable_algs(allowed_algs: Sequence[str]) -> tuple[str, ...]:
    """The configured allow-list minus what is never acceptable."""
    return tuple(alg for alg in allowed_algs if alg not in _FORBIDDEN_ALGS and alg[:2] != "HS")


def key_fits_alg(key: jwt.PyJWK, alg: str) -> bool:
    """Does the key's type (and curve) match the algorithm? (RFC 7518 3.1, RFC 8037)."""
    public = key.key
    if alg in _RSA_ALGS:
        return isinstance(public, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return (
            isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == _EC_CURVES[alg]
        )
    if alg in _OKP_ALGS:
        if alg == "Ed448":
            return isinstance(public, ed448.Ed448PublicKey)
        if alg == "Ed25519":
            return isinstance(public, ed25519.Ed25519PublicKey)
        return isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def verified_payload(token: str, key: jwt.PyJWK, allowed_algs: Sequence[str]) -> dict[str, Any]:
    """The JSON payload of a JWS signed by ``key``, after the algorithm checks.

    Shared by ID tokens and back-channel logout tokens. Raises :class:`IdTokenError`.
    """
    header = unverified_header(token)
    alg: str = header["alg"]
    if alg not in usable_algs(allowed_algs):
        raise IdTokenError("alg")
    if not key_fits_alg(key, alg):
        raise IdTokenError("key_type")
    if key.algorithm_name != alg:
        # The JWK is bound to one algorithm (its "alg", or the one we asked
        # provider.key_for for); a different one in the header is a confusion attempt.
        # Recent pyjwt refuses this too; older releases we allow did not.
        raise IdTokenError("alg")
    try:
        decoded = jwt.PyJWS().decode_complete(token, key=key, algorithms=[alg])
    except jwt.InvalidSignatureError:
        raise IdTokenError("bad_signature") from None
    except jwt.InvalidAlgorithmError:
        raise IdTokenError("alg") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise IdTokenError("malformed") from None
    try:
        payload = json.loads(decoded["payload"])
    except (ValueError, RecursionError):
        raise IdTokenError("malformed") from None
    if not isinstance(payload, dict):
        raise IdTokenError("malformed")
    return payload


def verify_id_token(
    token: str,
    key: jwt.PyJWK,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    now: float,
    skew_s: int,
    allowed_algs: Sequence[str],
    require_auth_time: bool = False,
) -> IdTokenClaims:
    """Verify an ID token from the token endpoint (OIDC Core 3.1.3.7).

    pyjwt checks the signature only; every claim is checked here against ``now``
    so that time is the caller's. Keys named in the token (``jku``, ``jwk``,
    ``x5u``) are ignored: the key comes from the provider's JWKS via ``key``.
    Pass ``require_auth_time=True`` when the request carried ``max_age``: the
    provider must then state ``auth_time`` (OIDC Core 3.1.2.1).
    Raises :class:`IdTokenError` on the first failed check.
    """
    payload = verified_payload(token, key, allowed_algs)
    claims = _read_claims(payload)
    _check_claims(claims, issuer=issuer, client_id=client_id, nonce=nonce, now=now, skew_s=skew_s)
    if require_auth_time and claims.auth_time is None:
        raise IdTokenError("auth_time")
    return claims


def _read_claims(payload: Mapping[str, object]) -> IdTokenClaims:
    """Types first, values later: a claim of the wrong type is ``malformed``."""

    def string(name: str, *, required: bool = False) -> str | None:
        value = payload.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise IdTokenError("malformed", claim=name)
        return value

    def number(name: str, *, required: bool = False) -> int | None:
        return numeric_date(payload, name, required=required)

    aud_value = payload.get("aud")
    if isinstance(aud_value, str):
        aud: tuple[str, ...] = (aud_value,)
    elif (
        isinstance(aud_value, list)
        and aud_value
        and all(isinstance(item, str) for item in aud_value)
    ):
        aud = tuple(aud_value)
    else:
        raise IdTokenError("malformed", claim="aud")

    amr = string_list_claim(payload, "amr")
    acrs = string_list_claim(payload, "acrs")
    sub = string("sub", required=True)
    if not sub:
        raise IdTokenError("sub")
    check_string_claims(payload)
    return IdTokenClaims(
        iss=string("iss", required=True) or "",
        sub=sub,
        aud=aud,
        exp=number("exp", required=True) or 0,
        iat=number("iat", required=True) or 0,
        nonce=string("nonce"),
        acr=string("acr"),
        amr=amr,
        auth_time=number("auth_time"),
        sid=string("sid"),
        email=string("email"),
        name=string("name"),
        azp=string("azp"),
        nbf=number("nbf"),
        email_verified=(
            None if "email_verified" not in payload else payload["email_verified"] is True
        ),
        acrs=acrs,
    )


def verified_email(claims: IdTokenClaims, *, assume_verified: bool) -> str | None:
    """The ``email`` the gateway may vouch for (``X-Auth-Email``), or None.

    Only with ``email_verified: true`` (OIDC Core 5.1), or when the provider does not
    send the claim at all and the operator said to assume it (``assume_verified``).
    An explicit ``false`` is never trusted: the address is then whatever the user typed.
    """
    if claims.email is None or claims.email_verified is False:
        return None
    if claims.email_verified or assume_verified:
        return claims.email
    return None


def check_header_claim(name: str, value: str, max_bytes: int) -> None:
    """Refuse a claim the upstream would receive that no identifier should look like:
    a control character, a lone surrogate, a line separator, empty (``amr``) or over
    ``max_bytes`` of UTF-8. Raises ``IdTokenError("claim_value", claim=name)``."""
    too_long = len(value) > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes
    if too_long or _UNSAFE_CLAIM_CHARS.search(value) or (name == "amr" and not value):
        raise IdTokenError("claim_value", claim=name)


def check_string_claims(payload: Mapping[str, object]) -> None:
    """:func:`check_header_claim` on each claim of :data:`MAX_CLAIM_BYTES` that is a string
    (one of another type is left to the reader that expects it)."""
    for name, max_bytes in MAX_CLAIM_BYTES.items():
        value = payload.get(name)
        if isinstance(value, str):
            check_header_claim(name, value, max_bytes)


def string_list_claim(
    payload: Mapping[str, object], name: str, *, error: type[IdTokenError] = IdTokenError
) -> tuple[str, ...]:
    """A list-of-strings claim (``amr``, Entra's ``acrs``) as a tuple, () when absent.

    Not a list of strings: ``malformed``; more than :data:`MAX_AMR_VALUES` values:
    ``claim_value`` (both as ``error``); a value no upstream header should carry:
    :func:`check_header_claim`'s ``claim_value``.
    """
    value = payload.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise error("malformed", claim=name)
    if len(value) > MAX_AMR_VALUES:
        raise error("claim_value", claim=name)
    for item in value:
        check_header_claim(name, item, MAX_AMR_VALUE_BYTES)
    return tuple(value)


def numeric_date(payload: Mapping[str, object], name: str, *, required: bool = False) -> int | None:
    """A NumericDate claim (RFC 7519 2) as whole seconds, or None when absent and optional.

    Anything else is ``malformed``: a string, ``true`` (bool is an int in Python),
    NaN or infinity (Python's JSON parser accepts both), a number beyond JSON's exact
    integer range.
    """
    value = payload.get(name)
    if value is None and not required:
        return None
    # RFC 7519 2: NumericDate may be fractional; bool is an int in Python, not here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IdTokenError("malformed", claim=name)
    if value != value or abs(value) > 2**53:  # NaN, or beyond JSON's exact range
        raise IdTokenError("malformed", claim=name)
    return int(value)


def _check_claims(
    claims: IdTokenClaims,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    now: float,
    skew_s: int,
) -> None:
    if claims.iss != issuer:
        raise IdTokenError("iss")
    if client_id not in claims.aud:
        raise IdTokenError("aud")
    # OIDC Core 2 and 3.1.3.7 (4, 5): with several audiences azp must name us;
    # if azp is there at all it must be us.
    if claims.azp is None and len(set(claims.aud)) > 1:
        raise IdTokenError("azp")
    if claims.azp is not None and claims.azp != client_id:
        raise IdTokenError("azp")
    if not claims.exp > now - skew_s:
        raise IdTokenError("exp")
    # RFC 7519 4.1.5: not to be accepted before nbf (with the same leeway as exp).
    if claims.nbf is not None and claims.nbf > now + skew_s:
        raise IdTokenError("nbf")
    if claims.iat > now + skew_s or claims.iat < now - ID_TOKEN_MAX_AGE_S - skew_s:
        raise IdTokenError("iat")
    if claims.auth_time is not None and claims.auth_time > now + skew_s:
        raise IdTokenError("auth_time")
    # OIDC Core 3.1.3.7 (11): the nonce we sent must come back, byte for byte.
    if claims.nonce is None or not hmac.compare_digest(claims.nonce.encode(), nonce.encode()):
        raise IdTokenError("nonce")


# ------------------------------------------------------------- back-channel logout

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# Back-Channel Logout 1.0 section 2.6 leaves "recent enough" to the RP; two minutes
# bounds how long a captured token stays replayable against a fresh jti cache.
LOGOUT_TOKEN_MAX_AGE_S = 120


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    sub: str | None
    sid: str | None
    jti: str
    iat: int


def verify_logout_token(
    token: str,
    key: jwt.PyJWK,
    *,
    issuer: str,
    client_id: str,
    now: float,
    skew_s: int,
    allowed_algs: Sequence[str],
) -> LogoutClaims:
    """Validate a Back-Channel Logout token (OIDC Back-Channel Logout 1.0, 2.6).

    Signature and algorithm as for ID tokens; ``iss``, ``aud``, ``iat`` (not in the
    future, not older than :data:`LOGOUT_TOKEN_MAX_AGE_S`), ``exp`` when present,
    ``jti`` present, the ``events`` member naming the logout event with a JSON
    object, ``sub`` or ``sid`` present, and no ``nonce`` (so an ID token can never
    be replayed as a logout token). Replay of ``jti`` is the caller's check.
    """
    payload = verified_payload(token, key, allowed_algs)
    if payload.get("iss") != issuer:
        raise IdTokenError("iss")
    aud = payload.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if client_id not in audiences:
        raise IdTokenError("aud")
    iat = numeric_date(payload, "iat", required=True) or 0
    if iat > now + skew_s or iat < now - LOGOUT_TOKEN_MAX_AGE_S - skew_s:
        raise IdTokenError("iat")
    exp = numeric_date(payload, "exp")
    if exp is not None and exp <= now - skew_s:
        raise IdTokenError("exp")
    nbf = numeric_date(payload, "nbf")
    if nbf is not None and nbf > now + skew_s:
        raise IdTokenError("nbf")
    jti = payload.get("jti")
    if not isinstance(jti, str) or not jti:
        raise IdTokenError("malformed", claim="jti")
    events = payload.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
        raise IdTokenError("events")
    if "nonce" in payload:
        raise IdTokenError("nonce")
    sub = payload.get("sub")
    sid = payload.get("sid")
    if sub is not None and not isinstance(sub, str):
        raise IdTokenError("malformed", claim="sub")
    if sid is not None and not isinstance(sid, str):
        raise IdTokenError("malformed", claim="sid")
    if not sub and not sid:
        raise IdTokenError("sub")
    return LogoutClaims(sub=sub or None, sid=sid or None, jti=jti, iat=iat)
