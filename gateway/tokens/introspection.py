"""RFC 7662 token introspection: the answer, read and checked. Pure: the request is
:meth:`gateway.oidc.provider.ProviderClient.introspect` (the gateway's client
credentials, exactly as at the token endpoint)."""

from __future__ import annotations

from collections.abc import Mapping

from gateway import errors
from gateway.tokens.claims import AccessClaims, TokenError, check_claims, read_claims

# RFC 6750 and RFC 9449: the access token types a resource server accepts. A refresh
# token, or an answer that does not say, is not one (oidc-provider omits token_type for
# refresh tokens, which introspect as active).
ACCESS_TOKEN_TYPES = frozenset({"bearer", "dpop"})


def introspection_answer(status: int, body: object) -> Mapping[str, object]:
    """The JSON object of a 200 answer; anything else is the service failing: 503, so
    that an outage never lets a request through (nor turns every client away for good)."""
    if status != 200 or not isinstance(body, Mapping):
        raise errors.ProviderUnavailable(
            "The token service is unavailable; try again shortly.",
            reason="introspection_status" if status != 200 else "introspection_invalid",
        )
    return body


def claims_from_introspection(
    answer: Mapping[str, object], *, issuer: str, audience: str, now: float, skew_s: int
) -> AccessClaims:
    """Check an introspection answer (RFC 7662 2.2) like a JWT access token's claims.

    ``active`` must be JSON ``true``; ``aud`` must name the gateway (RFC 7662 4: the
    resource server checks the audience itself); ``iss``, when given, must be the issuer.
    """
    if answer.get("active") is not True:
        raise TokenError("inactive")
    token_type = answer.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() not in ACCESS_TOKEN_TYPES:
        raise TokenError("token_type")
    claims = read_claims(answer)
    check_claims(claims, issuer=issuer, audience=audience, now=now, skew_s=skew_s)
    return claims
