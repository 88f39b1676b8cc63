"""What an access token says: read with types checked, then checked against the config.

Pure. Shared by JWT access tokens (RFC 9068 2.2) and introspection answers (RFC 7662
2.2), which carry the same claims. The claim readers are the ID token's
(:mod:`gateway.oidc.flow`): the same strict NumericDate and the same limits on what
reaches the upstream's headers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from gateway import assurance
from gateway.model import DEFAULT_PROVIDER, Level
from gateway.oidc import profiles
from gateway.oidc.flow import IdTokenError, numeric_date
from gateway.oidc.tokens import check_string_claims, string_list_claim
from gateway.session.model import Proof, Session

# RFC 7638 thumbprints are 43 characters; the bound keeps odd values out of logs and keys.
MAX_JKT_CHARS = 128
MAX_CLIENT_ID_CHARS = 255


class TokenError(IdTokenError):
    """An access token (or its DPoP proof) failed a check.

    ``reason`` is a short code for logs: the ID token's (``malformed``, ``alg``,
    ``bad_signature``, ``iss``, ``aud``, ``exp``, ``nbf``, ``iat``, ``auth_time``,
    ``kid``, ``sub``, ``claim_value``) and ``typ``, ``id_token``, ``inactive``,
    ``client_id``, ``dpop_*``. Never carries token contents.
    """

    def __init__(self, reason: str, *, claim: str | None = None) -> None:
        super().__init__(reason, claim=claim)
        detail = f"{reason} ({claim})" if claim else reason
        self.args = (f"access token rejected: {detail}",)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token that the gateway uses."""

    sub: str
    aud: tuple[str, ...]
    exp: int | None  # None: an introspection answer that gave none (RFC 7662: optional)
    iat: int | None
    client_id: str | None
    acr: str | None
    amr: tuple[str, ...]
    auth_time: int | None
    jkt: str | None  # cnf.jkt: the DPoP key the token is bound to (RFC 9449 6)
    iss: str | None = None
    nbf: int | None = None
    jti: str | None = None
    acrs: tuple[str, ...] = ()  # Entra's authentication contexts (c1..c99)


def read_claims(payload: Mapping[str, object]) -> AccessClaims:
    """Types first (a claim of the wrong type is ``malformed``), values in :func:`check_claims`."""

    def string(name: str, *, max_chars: int | None = None) -> str | None:
        value = payload.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or (max_chars is not None and len(value) > max_chars):
            raise TokenError("malformed", claim=name)
        return value

    aud_value = payload.get("aud")
    if aud_value is None:
        aud: tuple[str, ...] = ()
    elif isinstance(aud_value, str):
        aud = (aud_value,)
    elif isinstance(aud_value, list) and all(isinstance(item, str) for item in aud_value):
        aud = tuple(aud_value)
    else:
        raise TokenError("malformed", claim="aud")

    amr = string_list_claim(payload, "amr", error=TokenError)
    acrs = string_list_claim(payload, "acrs", error=TokenError)
    cnf = payload.get("cnf")
    jkt: str | None = None
    if cnf is not None:
        if not isinstance(cnf, Mapping):
            raise TokenError("malformed", claim="cnf")
        raw_jkt = cnf.get("jkt")
        if raw_jkt is not None and (not isinstance(raw_jkt, str) or len(raw_jkt) > MAX_JKT_CHARS):
            raise TokenError("malformed", claim="cnf")
        jkt = raw_jkt
    sub = string("sub")
    if not sub:
        raise TokenError("sub")
    check_string_claims(payload)
    return AccessClaims(
        sub=sub,
        aud=aud,
        exp=numeric_date(payload, "exp"),
        iat=numeric_date(payload, "iat"),
        client_id=string("client_id", max_chars=MAX_CLIENT_ID_CHARS),
        acr=string("acr"),
        amr=amr,
        auth_time=numeric_date(payload, "auth_time"),
        jkt=jkt,
        iss=string("iss"),
        nbf=numeric_date(payload, "nbf"),
        jti=string("jti", max_chars=MAX_CLIENT_ID_CHARS),
        acrs=acrs,
    )


def read_by_profile(
    claims: AccessClaims, profile: profiles.Profile, levels: Sequence[Level]
) -> AccessClaims:
    """``claims`` with the acr the provider's profile reads from them, as for ID tokens
    (:func:`gateway.oidc.profiles.asserted_acr`): Entra's ``acrs`` in access tokens,
    Okta's and Keycloak's ``acr``. The generic profile reads ``acr`` as it is.

    Unlike an ID token, an access token without an ``acr`` proves no sign-in at all
    (Entra's app-only tokens, from the client credentials grant, carry neither), so the
    profile's "signed in" stand-in is never given to one: no level, fail closed."""
    acr = profiles.asserted_acr(profile, claims.acr, claims.acrs, levels)
    if acr == profiles.SIGNED_IN_ACR:
        acr = claims.acr
    return claims if acr == claims.acr else replace(claims, acr=acr)


def check_claims(
    claims: AccessClaims, *, issuer: str, audience: str, now: float, skew_s: int
) -> None:
    """The checks both token kinds share (RFC 9068 4, RFC 7662 4). ``exp``, ``nbf``,
    ``iat`` and ``auth_time`` get ``skew_s`` of leeway, as ID tokens do."""
    if claims.iss is not None and claims.iss != issuer:
        raise TokenError("iss")
    # RFC 9068 4: the resource server MUST check that aud names it.
    if audience not in claims.aud:
        raise TokenError("aud")
    if claims.exp is not None and not claims.exp > now - skew_s:
        raise TokenError("exp")
    if claims.nbf is not None and claims.nbf > now + skew_s:
        raise TokenError("nbf")
    if claims.iat is not None and claims.iat > now + skew_s:
        raise TokenError("iat")
    if claims.auth_time is not None and claims.auth_time > now + skew_s:
        raise TokenError("auth_time")


def session_of(
    claims: AccessClaims, digest: str, received_at: float, *, provider: str = DEFAULT_PROVIDER
) -> Session:
    """The session-shaped value the decision unit judges: a sign-in at ``provider``
    (the one that verified the token). Without ``auth_time`` the authentication is
    dated at the epoch: no ``max_age`` is met (fail closed), levels without one still are."""
    auth_time = (
        assurance.proven_at(claims.auth_time, received_at) if claims.auth_time is not None else 0.0
    )
    # One proof per token: a one-time rule consumes the token (its id names it).
    proof = Proof(acr=claims.acr, amr=claims.amr, auth_time=auth_time, id=f"at:{digest[:32]}")
    created = float(claims.iat) if claims.iat is not None else received_at
    return Session(
        id=f"at-{digest[:22]}",
        sub=claims.sub,
        email=None,  # an access token vouches for no address (RFC 9068 has no email_verified)
        name=None,
        provider_sid=None,
        id_token=None,
        acr=claims.acr,
        amr=claims.amr,
        auth_time=auth_time,
        proofs=(proof,),
        created_at=created,
        last_seen=received_at,
        provider=provider,
    )
