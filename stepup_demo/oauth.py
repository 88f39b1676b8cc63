"""authlib's framework-agnostic OpenID Provider, adapted to aiohttp.

authlib ships server integrations for Flask and Django only. This module mirrors
``authlib/integrations/flask_oauth2`` (``authorization_server.py`` and
``requests.py``): the framework supplies the request objects, turns
``(status, body, headers)`` into a response and stores clients, codes and tokens;
authlib does the protocol. One difference: aiohttp reads a request body with
``await`` while authlib is synchronous, so handlers read the request once and hand
authlib that (:mod:`stepup_demo.oauth_http`). What the server stores (clients,
codes, tokens) is :mod:`stepup_demo.oauth_models`; this module holds the grant, its
extensions and endpoints, and :class:`DemoAuthorizationServer`, which puts them
together.

What authlib does here: the authorization code grant (RFC 6749 4.1) with PKCE
(RFC 7636, ``CodeChallenge``), the OpenID Connect ``OpenIDCode`` extension (ID
tokens with nonce, ``auth_time``, ``acr``, ``amr``, ``at_hash``), client
authentication (``client_secret_basic``/``_post``), the RFC 9207 ``iss`` response
parameter (``IssuerParameter``), bearer tokens and the UserInfo endpoint (RFC 6750,
``UserInfoEndpoint``) and RP-Initiated Logout (``EndSessionEndpoint``).
"""

from __future__ import annotations

import binascii
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from authlib.oauth2 import OAuth2Error, ResourceProtector
from authlib.oauth2.rfc6749 import AuthorizationServer, InvalidRequestError
from authlib.oauth2.rfc6749.authenticate_client import authenticate_client_secret_basic
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import OpenIDCode, UserInfo, UserInfoEndpoint
from authlib.oidc.rpinitiated import EndSessionEndpoint, EndSessionRequest
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from stepup_demo.factors import DemoUser
from stepup_demo.oauth_http import AiohttpOAuth2Request, OAuthResponse, RequestData
from stepup_demo.oauth_models import (
    ACCESS_TOKEN_TTL_S,
    CLIENT_AUTH_METHODS,
    CODE_TTL_S,
    ID_TOKEN_ALG,
    ID_TOKEN_TTL_S,
    SCOPES_SUPPORTED,
    AccessToken,
    AuthorizationCode,
    DemoClient,
    GrantedUser,
    OAuthStore,
)

log = structlog.get_logger("stepup_demo.idp")


# --- grant and extensions ------------------------------------------------------


class DemoAuthorizationCodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = list(CLIENT_AUTH_METHODS)

    @property
    def store(self) -> OAuthStore:
        server: DemoAuthorizationServer = self.server
        return server.store

    def save_authorization_code(self, code: str, request: AiohttpOAuth2Request) -> None:
        granted: GrantedUser = request.user
        data = request.payload.data
        auth = granted.authentication
        self.store.save_code(
            AuthorizationCode(
                code=code,
                client_id=request.client.client_id,
                redirect_uri=request.payload.redirect_uri,
                scope=request.scope,
                username=granted.user.username,
                nonce=data.get("nonce"),
                auth_time=int(auth.auth_time),
                acr=auth.acr,
                amr=auth.amr,
                sid=granted.sid,
                code_challenge=data.get("code_challenge"),
                code_challenge_method=data.get("code_challenge_method"),
                expires_at=self.store.clock() + CODE_TTL_S,
                authorization_details=granted.authorization_details,
            )
        )

    def query_authorization_code(self, code: str, client: DemoClient) -> AuthorizationCode | None:
        return self.store.find_code(code, client.client_id)

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        self.store.redeem(authorization_code)

    def authenticate_user(self, authorization_code: AuthorizationCode) -> DemoUser | None:
        server: DemoAuthorizationServer = self.server
        return server.users.get(authorization_code.username)


class S256CodeChallenge(CodeChallenge):  # type: ignore[misc]
    """PKCE, required of every client, S256 only (RFC 9700 2.1.1; ``plain`` is refused)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: DemoAuthorizationCodeGrant, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("Missing 'code_challenge': this provider requires PKCE")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be S256")
        super().validate_code_challenge(grant, redirect_uri)

    def get_authorization_code_challenge(self, authorization_code: AuthorizationCode) -> str | None:
        return authorization_code.code_challenge

    def get_authorization_code_challenge_method(
        self, authorization_code: AuthorizationCode
    ) -> str | None:
        return authorization_code.code_challenge_method


def user_info(user: DemoUser, scope: str) -> dict[str, Any]:
    info = UserInfo(sub=user.sub, name=user.name, email=user.email, email_verified=True)
    return dict(info.filter(scope))


class DemoOpenIDCode(OpenIDCode):  # type: ignore[misc]
    """ID tokens: ES256, with the ``acr``/``amr``/``auth_time`` the sign-in really had."""

    def __init__(self, *, issuer: str, key: ECKey, store: OAuthStore) -> None:
        super().__init__(require_nonce=True)  # the gateway always sends one
        self.issuer = issuer
        self.key = key
        self.store = store

    def resolve_client_private_key(self, client: DemoClient) -> ECKey:
        return self.key

    def get_client_algorithm(self, client: DemoClient) -> str:
        return ID_TOKEN_ALG

    def get_encode_header(self, client: DemoClient) -> dict[str, str]:
        return {"alg": ID_TOKEN_ALG, "kid": str(self.key.kid), "typ": "JWT"}

    def get_client_claims(self, client: DemoClient) -> dict[str, Any]:
        now = int(self.store.clock())
        return {
            "iss": self.issuer,
            "aud": client.client_id,
            "iat": now,
            "exp": now + ID_TOKEN_TTL_S,
        }

    def exists_nonce(self, nonce: str, request: AiohttpOAuth2Request) -> bool:
        return self.store.nonce_used(request.payload.client_id, nonce)

    def generate_user_info(self, user: DemoUser, scope: str) -> dict[str, Any]:
        return user_info(user, scope)

    def get_authorization_code_claims(
        self, authorization_code: AuthorizationCode
    ) -> dict[str, Any]:
        claims: dict[str, Any] = super().get_authorization_code_claims(authorization_code)
        claims["sid"] = authorization_code.sid  # OIDC Front/Back-Channel Logout: session id
        if authorization_code.authorization_details is not None:
            # RFC 9396 7.1 puts them in the token response; in the ID token too, so a
            # relying party that only reads the ID token can check what was approved.
            claims["authorization_details"] = json.loads(authorization_code.authorization_details)
        return claims


class DemoIssuerParameter(IssuerParameter):  # type: ignore[misc]
    """RFC 9207: ``iss`` in every authorization response, errors included."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def get_issuer(self) -> str:
        return self.issuer


class DemoBearerTokenValidator(BearerTokenValidator):  # type: ignore[misc]
    def __init__(self, store: OAuthStore) -> None:
        super().__init__()
        self.store = store

    def authenticate_token(self, token_string: str) -> AccessToken | None:
        return self.store.tokens.get(token_string)


class DemoUserInfoEndpoint(UserInfoEndpoint):  # type: ignore[misc]
    def __call__(self, request: AiohttpOAuth2Request) -> tuple[int, Any, list[tuple[str, str]]]:
        # authlib's version asks the resource protector for "the current request", a
        # Flask-style context global; aiohttp has none, so pass the request explicitly.
        token: AccessToken = self.resource_protector.validate_request(["openid"], request)
        body = user_info(token.get_user(), token.get_scope())
        return 200, body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


class _HintClaims(jose_jwt.JWTClaimsRegistry):
    def validate_exp(self, value: object) -> None:
        # RP-Initiated Logout 1.0 §2: accept an expired ID token as a hint.
        return None


class DemoEndSessionEndpoint(EndSessionEndpoint):  # type: ignore[misc]
    def __init__(
        self,
        *,
        jwks: KeySet,
        clock: Callable[[], float],
        on_end_session: Callable[[EndSessionRequest], None],
    ) -> None:
        super().__init__()
        self.jwks = jwks
        self.clock = clock
        self.on_end_session = on_end_session

    def _validate_id_token_hint(self, id_token_hint: str) -> dict[str, Any]:
        # As authlib's own, but judging iat/nbf by the provider's clock, not the wall's.
        try:
            token = jose_jwt.decode(id_token_hint, self.jwks, algorithms=self.get_algorithms())
            claims = _HintClaims(now=lambda: int(self.clock()), nbf={"essential": False})
            claims.validate(token.claims)
        except JoseError as exc:
            raise InvalidRequestError(exc.description) from exc
        return dict(token.claims)

    def get_server_jwks(self) -> KeySet:
        return self.jwks

    def get_algorithms(self) -> list[str]:
        return [ID_TOKEN_ALG]

    def is_post_logout_redirect_uri_legitimate(
        self,
        request: AiohttpOAuth2Request,
        post_logout_redirect_uri: str,
        client: DemoClient,
        logout_hint: str | None,
    ) -> bool:
        # Without an id_token_hint, a registered URI is followed only after the user
        # confirmed the logout on our page (RP-Initiated Logout 1.0 §3 "other means").
        return request.logout_confirmed

    def end_session(self, end_session_request: EndSessionRequest) -> None:
        self.on_end_session(end_session_request)


def _client_secret_basic(
    query_client: Callable[[str], DemoClient | None], request: AiohttpOAuth2Request
) -> DemoClient | None:
    # authlib decodes the Basic credentials as strict UTF-8; bytes that are not become
    # "no credentials here" (a clear invalid_client) instead of an unhandled error.
    try:
        client: DemoClient | None = authenticate_client_secret_basic(query_client, request)
    except (UnicodeDecodeError, binascii.Error):
        return None
    return client


class DemoAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    """authlib's AuthorizationServer with aiohttp request/response hooks."""

    def __init__(
        self,
        *,
        issuer: str,
        store: OAuthStore,
        users: Mapping[str, DemoUser],
        key: ECKey,
        on_end_session: Callable[[EndSessionRequest], None],
    ) -> None:
        super().__init__(scopes_supported=list(SCOPES_SUPPORTED))
        self.issuer = issuer
        self.store = store
        self.users = users
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(32),
                expires_generator=ACCESS_TOKEN_TTL_S,
            ),
        )
        self.register_client_auth_method("client_secret_basic", _client_secret_basic)
        self.register_grant(
            DemoAuthorizationCodeGrant,
            [S256CodeChallenge(required=True), DemoOpenIDCode(issuer=issuer, key=key, store=store)],
        )
        self.register_extension(DemoIssuerParameter(issuer))
        protector = ResourceProtector()
        protector.register_token_validator(DemoBearerTokenValidator(store))
        self.register_endpoint(DemoUserInfoEndpoint(resource_protector=protector))
        jwks = KeySet([ECKey.import_key(key.as_dict(private=False))])
        self.register_endpoint(
            DemoEndSessionEndpoint(jwks=jwks, clock=store.clock, on_end_session=on_end_session)
        )

    def query_client(self, client_id: str) -> DemoClient | None:
        return self.store.clients.get(client_id)

    def save_token(self, token: Mapping[str, Any], request: AiohttpOAuth2Request) -> None:
        code: AuthorizationCode | None = request.authorization_code
        self.store.save_token(
            AccessToken(
                access_token=token["access_token"],
                client=request.client,
                user=request.user,
                scope=token.get("scope", ""),
                expires_at=self.store.clock() + int(token.get("expires_in", 0)),
                clock=self.store.clock,
            ),
            code,
        )

    def create_oauth2_request(
        self, request: RequestData | AiohttpOAuth2Request
    ) -> AiohttpOAuth2Request:
        if isinstance(request, AiohttpOAuth2Request):
            return request
        return AiohttpOAuth2Request(request)

    def create_json_request(self, request: RequestData) -> Any:
        raise NotImplementedError("no JSON-bodied endpoints (device flow, registration) here")

    def handle_response(
        self, status: int, body: Any, headers: Iterable[tuple[str, str]]
    ) -> OAuthResponse:
        return OAuthResponse(status, body, headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        # The Flask integration fires blinker signals here; nothing listens in the demo.
        log.debug("idp_oauth_signal", signal=name)

    def authorization_error(
        self, request: AiohttpOAuth2Request, error: OAuth2Error
    ) -> OAuthResponse:
        """An authorization-endpoint error response, with ``iss`` as RFC 9207 2 requires.

        authlib adds ``iss`` in a hook on ``create_authorization_response``; errors
        found earlier (while validating, or by our own sign-in logic) go through the
        same hook here.
        """
        response: OAuthResponse = self.handle_error_response(request, error)
        self.execute_hook("after_create_authorization_response", response)
        return response


class UnmetAuthenticationRequirements(OAuth2Error):  # type: ignore[misc]
    """OpenID Connect Core Unmet Authentication Requirements 1.0, §2."""

    error = "unmet_authentication_requirements"


class InvalidAuthorizationDetails(OAuth2Error):  # type: ignore[misc]
    """RFC 9396 5: malformed or unsupported ``authorization_details``."""

    error = "invalid_authorization_details"
