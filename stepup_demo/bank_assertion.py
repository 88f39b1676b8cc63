"""How Demo Bank checks the gateway's ``X-Auth-Assertion``: a few lines of pyjwt.

This is all an upstream behind the gateway needs to trust what the gateway asserts:
the signature against the gateway's published keys, the algorithm, audience,
issuer and times. No OpenID Connect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jwt


# The gateway signs what it asserts (ES256, keys at {gateway}/_gateway/jwks.json).
# An upstream that checks this needs no OIDC at all, just these lines:
def verify_assertion(
    token: str, jwks: jwt.PyJWKClient, *, audience: str, issuer: str, now: float | None = None
) -> dict[str, Any]:
    """The claims of an ``X-Auth-Assertion``, if the gateway signed it for us; else raises.

    ``now`` replaces the system clock for ``exp`` and ``iat`` (pyjwt reads the system
    clock; the demo's tests move the gateway's clock instead of sleeping).
    """
    signing_key = jwks.get_signing_key_from_jwt(token)  # by the "kid" in its header
    claims: dict[str, Any] = jwt.decode(
        token,
        signing_key,
        algorithms=["ES256"],  # what the gateway signs with: never trust the token's "alg"
        audience=audience,  # this upstream's name in the gateway config
        issuer=issuer,  # the gateway's public_url
        options={
            "require": ["exp", "iat", "sub"],
            "verify_exp": now is None,  # else checked below, at `now`
            "verify_iat": now is None,
        },
    )
    if now is not None:
        _check_times(claims, now)
    return claims


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    """pyjwt's own ``exp`` and ``iat`` checks (RFC 7519 4.1.4, 4.1.6), at ``now``."""
    exp, iat = claims["exp"], claims["iat"]
    if not isinstance(exp, int) or not isinstance(iat, int):
        raise jwt.DecodeError("exp and iat must be integers")
    if exp <= now:
        raise jwt.ExpiredSignatureError("Signature has expired")
    if iat > now:
        raise jwt.ImmatureSignatureError("The token is not yet valid (iat)")
