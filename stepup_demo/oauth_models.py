"""What the demo provider's authlib server keeps: clients, codes and tokens.

The models authlib asks a framework for (``ClientMixin``, ``AuthorizationCodeMixin``,
``TokenMixin``), the user a code is granted to (:class:`GrantedUser`), and
:class:`OAuthStore`, which keeps them in memory for their lifetimes (below).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin
from authlib.oidc.core import AuthorizationCodeMixin

from stepup_demo.factors import Authentication, DemoUser

log = structlog.get_logger("stepup_demo.idp")

ID_TOKEN_ALG = "ES256"
ID_TOKEN_TTL_S = 5 * 60  # only read once, at the callback; short keeps leaks short-lived
ACCESS_TOKEN_TTL_S = 10 * 60  # used for /userinfo right after the code exchange, if at all
# RFC 6749 4.1.2: "A maximum authorization code lifetime of 10 minutes is RECOMMENDED";
# a relying party redeems it within a second or two of the redirect.
CODE_TTL_S = 60
SCOPES_SUPPORTED = ("openid", "profile", "email")
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")


@dataclass(frozen=True)
class DemoClient(ClientMixin):  # type: ignore[misc]
    """A registered relying party (OIDC Registration 1.0 metadata, statically)."""

    client_id: str
    client_secret: str
    client_name: str
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()
    # Where its logout_token is POSTed when a provider session it took part in ends
    # (OIDC Back-Channel Logout 1.0 2.2); see stepup_demo.backchannel.
    backchannel_logout_uri: str | None = None
    scopes: tuple[str, ...] = SCOPES_SUPPORTED

    @property
    def client_metadata(self) -> dict[str, Any]:
        return {
            "client_name": self.client_name,
            "redirect_uris": list(self.redirect_uris),
            "post_logout_redirect_uris": list(self.post_logout_redirect_uris),
            "backchannel_logout_uri": self.backchannel_logout_uri,
            "token_endpoint_auth_method": CLIENT_AUTH_METHODS[0],
            "id_token_signed_response_alg": ID_TOKEN_ALG,
        }

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None  # OIDC Core 3.1.2.1: redirect_uri is REQUIRED

    def get_allowed_scope(self, scope: str | None) -> str:
        return " ".join(s for s in (scope or "").split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris  # exact match, OAuth 2.0 Security BCP 4.1.3

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in CLIENT_AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass(frozen=True)
class GrantedUser:
    """The ``grant_user`` handed to authlib: who signed in, and how."""

    user: DemoUser
    authentication: Authentication
    sid: str
    # RFC 9396: the authorization_details the user approved in this sign-in (JSON text).
    authorization_details: str | None = None


@dataclass(frozen=True)
class AuthorizationCode(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    username: str
    nonce: str | None
    auth_time: int
    acr: str
    amr: tuple[str, ...]
    sid: str
    code_challenge: str | None
    code_challenge_method: str | None
    expires_at: float
    authorization_details: str | None = None  # JSON text, echoed in the ID token

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> str:
        return self.acr

    def get_amr(self) -> list[str]:
        return list(self.amr)


@dataclass
class AccessToken(TokenMixin):  # type: ignore[misc]
    access_token: str
    client: DemoClient
    user: DemoUser
    scope: str
    expires_at: float
    clock: Callable[[], float] = field(repr=False)
    revoked: bool = False

    def check_client(self, client: DemoClient) -> bool:
        return client.client_id == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.expires_at - self.clock()))

    def is_expired(self) -> bool:
        return self.clock() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> DemoUser:
        return self.user

    def get_client(self) -> DemoClient:
        return self.client


class OAuthStore:
    """Clients, authorization codes and access tokens, in memory."""

    def __init__(self, clients: Iterable[DemoClient], clock: Callable[[], float]) -> None:
        self.clients = {client.client_id: client for client in clients}
        self.clock = clock
        self.codes: dict[str, AuthorizationCode] = {}
        # A redeemed code, until it would have expired: the tokens it bought. A second
        # redemption revokes them (RFC 6749 4.1.2: "SHOULD revoke ... all tokens").
        self.redeemed: dict[str, tuple[float, list[AccessToken]]] = {}
        self.tokens: dict[str, AccessToken] = {}
        self.nonces: dict[tuple[str, str], float] = {}

    def purge(self) -> None:
        now = self.clock()
        self.codes = {k: v for k, v in self.codes.items() if v.expires_at > now}
        self.redeemed = {k: v for k, v in self.redeemed.items() if v[0] > now}
        self.tokens = {k: v for k, v in self.tokens.items() if v.expires_at > now}
        self.nonces = {k: v for k, v in self.nonces.items() if v > now}

    def save_code(self, code: AuthorizationCode) -> None:
        self.purge()
        self.codes[code.code] = code
        if code.nonce:
            # OIDC Core 15.5.2: a nonce is used once; remember it while ID tokens live.
            key = (code.client_id, code.nonce)
            self.nonces[key] = self.clock() + CODE_TTL_S + ID_TOKEN_TTL_S

    def find_code(self, code: str, client_id: str) -> AuthorizationCode | None:
        if code in self.redeemed:
            for token in self.redeemed[code][1]:
                token.revoked = True
            log.warning("idp_code_reused", client_id=client_id)
            return None
        found = self.codes.get(code)
        if found is None or found.client_id != client_id or found.expires_at <= self.clock():
            return None
        return found

    def redeem(self, code: AuthorizationCode) -> None:
        self.codes.pop(code.code, None)
        self.redeemed.setdefault(code.code, (code.expires_at, []))

    def save_token(self, token: AccessToken, code: AuthorizationCode | None) -> None:
        self.tokens[token.access_token] = token
        if code is not None:
            self.redeemed.setdefault(code.code, (code.expires_at, []))[1].append(token)

    def nonce_used(self, client_id: str, nonce: str) -> bool:
        expires_at = self.nonces.get((client_id, nonce))
        return expires_at is not None and expires_at > self.clock()
