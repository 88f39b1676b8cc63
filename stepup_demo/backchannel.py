"""Back-channel logout from the demo provider (OpenID Connect Back-Channel Logout 1.0).

When a provider session ends, each relying party that received tokens in it and
registered a ``backchannel_logout_uri`` is sent a ``logout_token``: a JWT signed with
the ID-token key, naming the user (``sub``) and the provider session (``sid``, the
same value as in the ID tokens), POSTed form-encoded straight to the relying party.

Building and signing the token are pure (:func:`logout_token_claims`,
:func:`sign_logout_token`); :class:`BackchannelLogoutSender` does the sending.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

from stepup_demo.oauth_models import ID_TOKEN_ALG, DemoClient
from stepup_demo.provider_session import ProviderSession

log = structlog.get_logger("stepup_demo.idp")

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# Section 2.4 recommends explicit typing; section 4.1: it keeps a logout token from
# passing as any other kind of JWT (and the missing nonce keeps it from passing as an
# ID token).
LOGOUT_TOKEN_TYPE = "logout+jwt"
# exp bounds how long a captured token is worth replaying. Two minutes, as OWASP
# ASVS 5.0 (10.5.5) suggests, and the age past which the gateway refuses one anyway.
LOGOUT_TOKEN_TTL_S = 120
# A relying party's logout endpoint deletes a few sessions and answers: milliseconds.
# Every client is sent its token at once, so the sign-out page waits this long at
# most however many relying parties hang.
SEND_TIMEOUT_S = 2.0
# Section 2.8: success is 200; some frameworks answer an empty 200 as 204.
SUCCESS_STATUSES = frozenset({200, 204})


def logout_token_claims(
    *, issuer: str, client_id: str, sub: str, sid: str, now: float, jti: str
) -> dict[str, Any]:
    """The claims of one client's logout token (Back-Channel Logout 1.0, 2.4).

    No ``nonce``: its absence is what tells a logout token from an ID token.
    """
    issued_at = int(now)
    return {
        "iss": issuer,
        "aud": client_id,
        "iat": issued_at,
        "exp": issued_at + LOGOUT_TOKEN_TTL_S,
        "jti": jti,
        "sub": sub,
        "sid": sid,
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }


def sign_logout_token(claims: dict[str, Any], key: ECKey) -> str:
    """``claims`` as a JWS signed with ``key``, the ID tokens' key (section 2.4)."""
    header = {"alg": ID_TOKEN_ALG, "kid": str(key.kid), "typ": LOGOUT_TOKEN_TYPE}
    return jose_jwt.encode(header, claims, key, algorithms=[ID_TOKEN_ALG])


@dataclass(frozen=True, slots=True)
class Delivery:
    """How sending one client its logout token went."""

    client_id: str
    status: int | None  # the HTTP status, None when no answer came
    error: str | None = None  # why no answer came

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS_STATUSES


class BackchannelLogoutSender:
    """Sends logout tokens to the relying parties of an ended provider session.

    Speaks :class:`stepup_demo.provider_session.LogoutNotifier`. Failures are logged and
    never raised: a relying party that is down must not keep the user signed in
    at the provider.
    """

    supported = True  # advertised as backchannel_logout_supported (and _session_)

    def __init__(
        self,
        *,
        issuer: str,
        key: ECKey,
        clock: Callable[[], float],
        timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self.issuer = issuer
        self.key = key
        self.clock = clock
        self.timeout_s = timeout_s

    async def session_ended(self, session: ProviderSession, clients: Sequence[DemoClient]) -> None:
        await self.send(session, clients)

    async def send(
        self, session: ProviderSession, clients: Sequence[DemoClient]
    ) -> tuple[Delivery, ...]:
        """Send every client with a ``backchannel_logout_uri`` its token, all at once."""
        targets = [
            (client.client_id, uri) for client in clients if (uri := client.backchannel_logout_uri)
        ]
        if not targets:
            return ()
        now = self.clock()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        # No cookies: this is the provider talking to the relying party, not a browser.
        async with aiohttp.ClientSession(
            timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
        ) as http:
            deliveries = await asyncio.gather(
                *(
                    self._deliver(http, client_id, uri, self._token(client_id, session, now))
                    for client_id, uri in targets
                )
            )
        return tuple(deliveries)

    def _token(self, client_id: str, session: ProviderSession, now: float) -> str:
        claims = logout_token_claims(
            issuer=self.issuer,
            client_id=client_id,
            sub=session.sub,
            sid=session.sid,
            now=now,
            jti=secrets.token_urlsafe(16),
        )
        return sign_logout_token(claims, self.key)

    async def _deliver(
        self, http: aiohttp.ClientSession, client_id: str, uri: str, token: str
    ) -> Delivery:
        try:
            # A redirect is no answer (section 2.8 says what is): never follow one.
            async with http.post(
                uri, data={"logout_token": token}, allow_redirects=False
            ) as response:
                delivery = Delivery(client_id, response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            delivery = Delivery(client_id, None, type(exc).__name__)
        if delivery.ok:
            log.info("idp_backchannel_logout_sent", client_id=client_id, status=delivery.status)
        else:
            log.warning(
                "idp_backchannel_logout_failed",
                client_id=client_id,
                uri=uri,
                status=delivery.status,
                error=delivery.error,
            )
        return delivery
