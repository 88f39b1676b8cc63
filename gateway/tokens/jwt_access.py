"""RFC 9068 JWT access tokens: header, signature and claims. Pure: the key is passed in.

The key comes from the issuer's JWKS through :meth:`ProviderClient.key_for`, with the
same unknown-kid refetch rules as ID tokens; signature checking is the ID token's
(:func:`gateway.oidc.flow.verified_payload`: allow-list, key type, never ``none`` or HMAC).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

import jwt

from gateway.oidc.flow import unverified_header, usable_algs, verified_payload
from gateway.tokens.claims import AccessClaims, TokenError, check_claims, read_claims

# RFC 9068 2.1: typ "at+jwt"; RFC 7515 4.1.9 lets "application/" be written out, and
# media types compare case-insensitively (RFC 2045 5.1).
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})


def looks_like_jwt(token: str) -> bool:
    """A JWS compact serialisation has three parts; opaque tokens usually have none."""
    return token.count(".") == 2


def access_token_header(token: str, allowed_algs: Sequence[str]) -> dict[str, Any]:
    """The header, checked before any key is fetched (it is attacker-chosen).

    An ID token (``typ`` ``JWT`` or absent) is refused here: RFC 9068 2.1 makes
    ``typ`` the way to tell the two apart, so one cannot stand in for the other.
    """
    header = unverified_header(token)
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise TokenError("typ")
    if header["alg"] not in usable_algs(allowed_algs):
        raise TokenError("alg")
    return header


def unverified_issuer(token: str) -> str:
    """The ``iss`` a JWT claims, read before its signature is checked: it only chooses
    which configured provider's keys verify it (and that provider's issuer must then
    match, :func:`check_claims`). Not a string, or no ``iss``: ``malformed``."""
    body = token.split(".")[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise TokenError("malformed") from None
    issuer = payload.get("iss") if isinstance(payload, dict) else None
    if not isinstance(issuer, str):
        raise TokenError("malformed", claim="iss")
    return issuer


def verify_access_token(
    token: str,
    key: jwt.PyJWK,
    *,
    issuer: str,
    audience: str,
    now: float,
    skew_s: int,
    allowed_algs: Sequence[str],
) -> AccessClaims:
    """Verify a JWT access token (RFC 9068 4). Raises :class:`TokenError` on the first
    failed check; ``iss``, ``exp``, ``aud``, ``sub``, ``client_id`` and ``iat`` are
    required (RFC 9068 2.2)."""
    access_token_header(token, allowed_algs)
    payload = verified_payload(token, key, allowed_algs)
    # An ID token re-labelled at+jwt by its issuer would still carry the nonce that
    # bound it to a browser login: it is not an access token.
    if "nonce" in payload:
        raise TokenError("id_token")
    for name in ("iss", "exp", "aud", "client_id", "iat"):
        if payload.get(name) is None:
            raise TokenError("malformed", claim=name)
    claims = read_claims(payload)
    check_claims(claims, issuer=issuer, audience=audience, now=now, skew_s=skew_s)
    return claims
