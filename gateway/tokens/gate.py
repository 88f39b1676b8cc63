"""The request's access token: found, verified, bound to its DPoP key, remembered.

The I/O side of :mod:`gateway.tokens`: keys through the provider clients (the ID
token's JWKS caches and refetch rules), introspection through them too, DPoP ``jti``
records in the one-time record store (shared by every worker with Redis). Every
refusal is an :class:`errors.Unauthorized` carrying its challenge; ``gateway.app``
turns it into the response.

Several providers (``oidc.providers``): a JWT's ``iss`` names the provider that
verifies it, by a map built from the configuration alone (its keys, issuer, profile
and levels; never another provider's keys). An opaque token names nothing: it is
introspected at the provider of the rule the request matches, and only there, so
that no token is sent to a party that did not issue it on the gateway's initiative.

A verified token becomes a :class:`Session` value (one proof: its ``acr``, ``amr``
and ``auth_time``) of the provider that verified it, so the decision unit, the
``X-Auth-*`` headers and the signed assertion treat it exactly like a browser
signed in there.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog
from multidict import CIMultiDictProxy, MultiMapping

from gateway import errors, model, responses
from gateway.decision import TOKEN_NOT_ACCEPTED, log_step_up_needed
from gateway.memo import Memo
from gateway.oidc import profiles
from gateway.oidc.flow import IdTokenError
from gateway.oidc.providers import ProviderSet
from gateway.paths import canonical_host
from gateway.policy import Challenge, Decision, Deny
from gateway.rules import RuleSet
from gateway.session.aux import AuxStore
from gateway.session.model import Session
from gateway.tokens import challenges
from gateway.tokens.claims import AccessClaims, TokenError, read_by_profile, session_of
from gateway.tokens.dpop import make_nonce, nonce_valid, request_url, verify_proof
from gateway.tokens.introspection import claims_from_introspection, introspection_answer
from gateway.tokens.jwt_access import (
    access_token_header,
    looks_like_jwt,
    unverified_issuer,
    verify_access_token,
)

log = structlog.get_logger("gateway.tokens")

# RFC 6750 2.1: b64token. Anything else after "Bearer " is not a token.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A token is a few KiB at most (an RSA-signed JWT with many claims); the header limit
# bounds it anyway, this keeps the digest and the checks from seeing more.
MAX_TOKEN_CHARS = 16 * 1024
# What one cache entry holds, about: the claims, the session value, the key.
CACHE_ENTRY_BYTES = 1024
INACTIVE_ENTRY_BYTES = 64  # a digest and a time
TOKEN_SCHEMES = {"bearer": "Bearer", "dpop": "DPoP"}  # RFC 9110 11.1: case-insensitive


@dataclass(frozen=True, slots=True)
class Presented:
    """The access token a request carries: its scheme, the token, its DPoP proofs."""

    scheme: str  # "Bearer" | "DPoP"
    token: str
    proofs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verified:
    claims: AccessClaims
    session: Session
    until: float  # reused until then: the token's exp (with the skew its check allows)


@dataclass(frozen=True, slots=True)
class Issuer:
    """A provider whose access tokens are accepted, and how its tokens are read."""

    name: str  # "default" or a name under oidc.providers
    oidc: model.OidcConfig
    profile: profiles.Profile
    levels: tuple[model.Level, ...]


def issuers(config: model.Config) -> dict[str, Issuer]:
    """The providers ``api.providers`` lists (unset: every one), by name, from the config."""
    assert config.api is not None
    names = config.api.providers or config.provider_names
    return {
        name: Issuer(
            name,
            config.oidc_for(name),
            profiles.get(config.oidc_for(name).profile),
            config.assurance.for_provider(name).levels,
        )
        for name in names
    }


def issuer_for(accepted: dict[str, Issuer], iss: str, wanted: str) -> Issuer:
    """The provider whose issuer is ``iss`` (compared exactly): ``wanted`` (the rule's)
    among several that share it, else the first configured. None: ``iss`` refusal."""
    named = [issuer for issuer in accepted.values() if issuer.oidc.issuer == iss]
    if not named:
        raise TokenError("iss")
    return next((issuer for issuer in named if issuer.name == wanted), named[0])


def presented_token(headers: MultiMapping[str] | CIMultiDictProxy[str]) -> Presented | None:
    """The request's ``Authorization: Bearer|DPoP TOKEN``, or None (no such header:
    the request is judged by its session cookie). Several Authorization headers, or a
    malformed token, are refused (RFC 6750 3.1 ``invalid_request``)."""
    values = headers.getall("Authorization", [])
    ours = [v for v in values if v.partition(" ")[0].lower() in TOKEN_SCHEMES]
    if not ours:
        return None
    scheme_text, _, token = ours[0].partition(" ")
    token = token.strip(" ")
    if len(values) > 1 or len(token) > MAX_TOKEN_CHARS or not _TOKEN68.fullmatch(token):
        log.info("access_token_refused", reason="malformed_authorization")
        raise errors.Unauthorized(
            "The Authorization header must hold exactly one token.",
            reason="malformed_authorization",
            error="invalid_request",
            challenge='Bearer error="invalid_request"',
            status=400,
        )
    return Presented(
        scheme=TOKEN_SCHEMES[scheme_text.lower()],
        token=token,
        proofs=tuple(headers.getall("DPoP", [])),
    )


class TokenGate:
    """Access tokens for one configuration (rebuilt on reload, with its caches)."""

    def __init__(self, config: model.Config, rules: RuleSet) -> None:
        assert config.api is not None
        self.api = api = config.api
        # Each provider's profile reads the level from its tokens as from its ID tokens.
        self._issuers = issuers(config)
        self._rules = rules  # of the same config: the rule's provider introspects
        secret = config.session.secrets[0]
        # What a DPoP proof's htu names (judged_url): the public scheme, and public_url's
        # host for a request without one.
        public = urlsplit(config.server.public_url)
        self._scheme = public.scheme
        self._public_host = canonical_host(public.netloc, public.scheme) or ""
        # DPoP nonces: a key of their own, derived from the session secret so that every
        # worker and replica issues and accepts the same nonces.
        self._nonce_key = hmac.new(secret, b"stepup-gateway dpop-nonce", hashlib.sha256).digest()
        entries = api.cache_entries
        # Keyed by the token's digest and the provider it is judged for: one provider's
        # answer (above all an introspection's) is never another's.
        self._verified: Memo[bytes, Verified] | None = (
            Memo(max_entries=entries, max_bytes=entries * CACHE_ENTRY_BYTES) if entries else None
        )
        # Introspected inactive -> until when that answer is reused. An inactive token
        # never becomes active (RFC 7662 2.2), and without this every request with a
        # made-up token would cost the authorization server a request.
        self._inactive: Memo[bytes, float] | None = (
            Memo(max_entries=entries, max_bytes=entries * INACTIVE_ENTRY_BYTES) if entries else None
        )
        self._dpop_challenge = challenges.dpop_scheme(api)
        self.accepted = challenges.accepted_schemes(api)

    # -- the request's credential ----------------------------------------------------

    async def session_for(
        self,
        presented: Presented,
        method: str,
        host: str | None,
        path: str,
        now: float,
        providers: ProviderSet,
        aux: AuxStore,
    ) -> Session:
        """:meth:`authenticate` for a request to the canonical ``host`` (None: none
        sent) and normalised ``path``, as the rules judge it: for the provider of the
        first rule that matches (before any ``when``; none matches: ``default``)."""
        rule = self._rules.match(method, host, path)
        return await self.authenticate(
            presented,
            method=method,
            url=judged_url(self._scheme, host, self._public_host, path),
            now=now,
            providers=providers,
            aux=aux,
            wanted=rule.provider if rule is not None else model.DEFAULT_PROVIDER,
        )

    async def authenticate(
        self,
        presented: Presented,
        *,
        method: str,
        url: str,
        now: float,
        providers: ProviderSet,
        aux: AuxStore,
        wanted: str = model.DEFAULT_PROVIDER,
    ) -> Session:
        """The session-shaped value of a valid token, or :class:`errors.Unauthorized`.

        ``url`` is :func:`gateway.tokens.dpop.request_url` of the request as judged;
        ``wanted`` the provider of the rule it matches (an opaque token is introspected
        there, and only there).
        """
        api, scheme = self.api, presented.scheme
        if scheme == "DPoP" and api.dpop == "off":
            raise self.refuse("Bearer", "dpop_disabled", "This API takes bearer tokens only.")
        if scheme == "Bearer" and api.dpop == "required":
            raise self.refuse("DPoP", "dpop_required", "This API needs DPoP-bound tokens.")
        verified = await self.verified(presented.token, now, providers, scheme, wanted)
        bound_to = verified.claims.jkt
        if scheme == "Bearer":
            if bound_to is not None:
                # RFC 9449 7.1: a bound token is no bearer token; its key must prove itself.
                raise self.refuse("DPoP", "bound_token_as_bearer", "This token needs DPoP.")
            return verified.session
        if bound_to is None:
            raise self.refuse("DPoP", "token_not_bound", "This token is not DPoP-bound.")
        if len(presented.proofs) != 1:
            reason = "dpop_proof_missing" if not presented.proofs else "dpop_proofs_several"
            raise self.refuse("DPoP", reason, "Send exactly one DPoP proof.")
        try:
            proof = verify_proof(
                presented.proofs[0],
                method=method,
                url=url,
                access_token=presented.token,
                now=now,
                max_age_s=api.dpop_max_age_s,
                allowed_algs=api.dpop_algorithms,
            )
        except IdTokenError as exc:
            raise self.refuse("DPoP", exc.reason, "The DPoP proof is not valid.") from None
        if not hmac.compare_digest(proof.jkt, bound_to):
            raise self.refuse(
                "DPoP", "dpop_key_mismatch", "The DPoP proof's key is not the token's."
            )
        if api.dpop_nonce and not nonce_valid(
            self._nonce_key, proof.nonce, now, api.dpop_max_age_s
        ):
            log.info("access_token_refused", reason="dpop_nonce")
            raise errors.Unauthorized(
                "Send the DPoP proof again with the nonce given.",
                reason="dpop_nonce",
                error="use_dpop_nonce",
                challenge=f'{self._dpop_challenge}, error="use_dpop_nonce", '
                'error_description="Resource server requires nonce in DPoP proof"',
                dpop_nonce=make_nonce(self._nonce_key, now, api.dpop_max_age_s),
            )
        # RFC 9449 11.1: each proof once. Kept past the iat window on both sides, so a
        # replay is refused for as long as the proof could pass the time check.
        if not await aux.claim_once(f"dpop:{proof.jkt}:{proof.jti}", 2 * api.dpop_max_age_s + 1):
            raise self.refuse("DPoP", "dpop_replay", "This DPoP proof was used before.")
        return verified.session

    async def verified(
        self,
        token: str,
        now: float,
        providers: ProviderSet,
        scheme: str,
        wanted: str = model.DEFAULT_PROVIDER,
    ) -> Verified:
        """The token's claims and session, from the cache (by SHA-256 and ``wanted``, the
        provider it is judged for) while it lives."""
        digest_bytes = hashlib.sha256(token.encode("ascii")).digest()
        key = digest_bytes + wanted.encode("ascii")  # a fixed-length digest, then the name
        cache = self._verified
        cached = cache.get(key) if cache is not None else None
        if cached is not None and now < cached.until:
            return cached
        inactive = self._inactive
        inactive_until = inactive.get(key) if inactive is not None else None
        if inactive_until is not None and now < inactive_until:
            raise self.refuse(scheme, "inactive", self._describe("inactive"))
        try:
            claims, until, issuer = await self._verify(token, now, providers, wanted)
        except IdTokenError as exc:
            if exc.reason == "inactive" and inactive is not None:
                inactive.put(key, now + self.api.introspection_cache_s, INACTIVE_ENTRY_BYTES)
            raise self.refuse(scheme, exc.reason, self._describe(exc.reason)) from None
        claims = read_by_profile(claims, issuer.profile, issuer.levels)
        session = session_of(claims, digest_bytes.hex(), now, provider=issuer.name)
        verified = Verified(claims, session, until)
        if cache is not None and until > now:
            cache.put(key, verified, CACHE_ENTRY_BYTES)
        return verified

    async def _verify(
        self, token: str, now: float, providers: ProviderSet, wanted: str
    ) -> tuple[AccessClaims, float, Issuer]:
        api = self.api
        if "jwt" in api.tokens and (looks_like_jwt(token) or "introspection" not in api.tokens):
            header = access_token_header(token, api.algorithms)
            # The claimed iss picks the provider from the configuration; its keys alone
            # verify the token, and its issuer must match (a key of another provider
            # never vouches for this one's tokens).
            issuer = issuer_for(self._issuers, unverified_issuer(token), wanted)
            skew_s = issuer.oidc.clock_skew_s
            # No waiting for the next allowed JWKS fetch: tokens with made-up kids would
            # otherwise hold each request (and connection) for up to 5 s.
            provider = providers.get(issuer.name)
            key = await provider.key_for(header.get("kid"), header["alg"], wait=False)
            claims = verify_access_token(
                token,
                key,
                issuer=issuer.oidc.issuer,
                audience=api.audience,
                now=now,
                skew_s=skew_s,
                allowed_algs=api.algorithms,
            )
            assert claims.exp is not None  # required for JWTs
            return claims, float(claims.exp + skew_s), issuer
        # An opaque token names no issuer: asked of the rule's provider only (never
        # sent around to find one that knows it), with that provider's credentials.
        issuer_or_none = self._issuers.get(wanted)
        if issuer_or_none is None:  # api.providers leaves the rule's provider out
            raise TokenError("provider")
        issuer, skew_s = issuer_or_none, issuer_or_none.oidc.clock_skew_s
        status, body = await providers.get(wanted).introspect(token)
        claims = claims_from_introspection(
            introspection_answer(status, body),
            issuer=issuer.oidc.issuer,
            audience=api.audience,
            now=now,
            skew_s=skew_s,
        )
        # RFC 7662 4: a cached answer hides a revocation; never past exp, never long.
        until = now + api.introspection_cache_s
        if claims.exp is not None:
            until = min(until, float(claims.exp + skew_s))
        return claims, until, issuer

    # -- what the rule takes, and the challenges ----------------------------------------

    def refusal(
        self, decision: Decision, presented: Presented | None
    ) -> errors.Unauthorized | None:
        """The 401 an API client gets instead of ``decision``'s usual answer, or None.

        A token on a ``credentials: session`` rule (the decision unit's
        :data:`gateway.decision.TOKEN_NOT_ACCEPTED` denial) is refused as invalid; a
        step-up for a token, or on a token-only rule, is RFC 9470's 401, never a
        redirect: the client asks its authorization server for a new token and retries.
        """
        if isinstance(decision, Challenge):
            if self.answers_challenge(decision, presented):
                return self.step_up_needed(decision, presented)
        elif (
            isinstance(decision, Deny)
            and presented is not None
            and decision.reason == TOKEN_NOT_ACCEPTED
        ):
            return self.refuse(
                presented.scheme, TOKEN_NOT_ACCEPTED, "This address takes no access tokens."
            )
        return None

    @staticmethod
    def answers_challenge(decision: Challenge, presented: Presented | None) -> bool:
        """Whether a step-up is this module's 401 rather than the browser round trip."""
        return presented is not None or decision.rule.credentials == "token"

    def step_up_needed(
        self, decision: Challenge, presented: Presented | None
    ) -> errors.Unauthorized:
        """The RFC 9470 challenge for a token that proves too little (never a redirect:
        the client asks its authorization server for a new token and retries)."""
        rule = decision.rule
        if presented is None:  # a token-only rule and no token
            log.info("access_token_missing", rule=rule.name)
            return errors.Unauthorized(
                "This address needs an access token.",
                reason="no_token",
                error="unauthorized",
                challenge=self.accepted,
            )
        value, max_age_s = challenges.step_up(self.api, decision, presented.scheme)
        log_step_up_needed(decision, max_age_s, credential="access_token")
        return errors.Unauthorized(
            responses.describe_need(decision.required, max_age_s),
            reason=decision.reason,
            error="insufficient_user_authentication",
            challenge=value,
        )

    def refuse(self, scheme: str, reason: str, description: str) -> errors.Unauthorized:
        log.info("access_token_refused", reason=reason)
        return errors.Unauthorized(
            description,
            reason=reason,
            error="invalid_token",
            challenge=challenges.invalid_token(self.api, scheme, description),
        )

    @staticmethod
    def _describe(reason: str) -> str:
        # The reason stays in the log; the client learns what it can act on.
        if reason == "exp":
            return "The access token expired."
        return "The access token is not valid here."


def token_gate(config: model.Config, rules: RuleSet) -> TokenGate | None:
    """The resource server of ``config``'s ``api`` section (``rules``: its rules); None
    without one."""
    if config.api is None:
        return None
    return TokenGate(config, rules)


def judged_url(scheme: str, host: str | None, public_host: str, path: str) -> str:
    """The URL a DPoP proof's htu must name: the public scheme, the request's canonical
    Host (or public_url's host without one) and the normalised path."""
    return request_url(scheme, host or public_host, path)


__all__ = [
    "Issuer",
    "Presented",
    "TokenGate",
    "issuer_for",
    "issuers",
    "judged_url",
    "presented_token",
    "session_of",
    "token_gate",
]
