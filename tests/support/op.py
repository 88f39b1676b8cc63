"""A small, real OpenID Provider that can be told to misbehave.

It speaks enough OpenID Connect for the gateway: discovery, JWKS (RSA and EC
keys, with rotation), ``/authorize`` (code flow, PKCE S256 required, RFC 9207
``iss``), ``/token`` (client_secret_basic or client_secret_post, single-use
codes), ``/userinfo`` and ``/end_session``. There is no login page: the "user"
is whoever :class:`OpBehaviour` says, and ``/authorize`` redirects straight back.

The ID token asserts what the user knob says (``acr``/``amr``), not what the
client asked for, unless ``honour_acr_values`` is set. That is what a real
provider does when it cannot (or will not) do the requested step-up, and the
gateway must not take a password login for a phishing-resistant one.

In tests::

    op = await start_op(aiohttp_server)            # issuer = its loopback URL
    op.behaviour.exp_delta_s = -3600               # next ID token is expired
    op.clients["gateway"].redirect_uris.append(callback_url)

As a process (prints only its URL)::

    python -m tests.support.op --port 9001 --redirect-uri http://127.0.0.1:8080/_gateway/callback
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

CODE_TTL_S = 60  # RFC 6749 4.1.2: "A maximum authorization code lifetime of 10 minutes is
# RECOMMENDED"; a test provider can be stricter.
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 4.1
_PKCE_CHALLENGE = re.compile(r"[A-Za-z0-9\-_]{43}")  # base64url(SHA-256), no padding


# ----------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class OpKey:
    kid: str
    alg: str  # RS256 or ES256
    private_key: PrivateKey

    @property
    def kty(self) -> str:
        return "RSA" if isinstance(self.private_key, rsa.RSAPrivateKey) else "EC"

    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def new_key(kty: str = "RSA", kid: str | None = None) -> OpKey:
    """A fresh signing key (RSA 2048 / RS256 or P-256 / ES256)."""
    kid = kid or f"{kty.lower()}-{secrets.token_hex(4)}"
    if kty == "RSA":
        return OpKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return OpKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@cache
def _stock_key(kty: str, kid: str) -> OpKey:
    # RSA key generation costs tens of milliseconds; every provider in a test run
    # starts from the same stock keys so that cost is paid once.
    return new_key(kty, kid)


# ------------------------------------------------------------------------ the knobs


@dataclass
class OpClient:
    """A registered relying party. Lists are mutable so tests can add their URLs."""

    client_id: str = "gateway"
    client_secret: str = "test-client-secret"  # a test fixture, not a real secret
    redirect_uris: list[str] = field(default_factory=list)
    auth_method: str = "client_secret_basic"  # client_secret_post | private_key_jwt
    post_logout_redirect_uris: list[str] = field(default_factory=list)
    # private_key_jwt (RFC 7523): the registered public keys, as JWKs with a kid.
    jwks: list[dict[str, Any]] = field(default_factory=list)
    require_par: bool = False  # RFC 9126 5: refuse an authorization request not pushed
    require_dpop: bool = False  # RFC 9449: refuse a token request without a DPoP proof


@dataclass
class OpUser:
    """Who signs in, and how the provider says they did."""

    sub: str = "user-1"
    email: str | None = "alice@example.com"
    email_verified: bool | None = True  # None leaves the claim out (as Entra ID does)
    name: str | None = "Alice Example"
    acr: str | None = "urn:example:loa:1"
    amr: list[str] | None = field(default_factory=lambda: ["pwd"])


def requested_acr(params: Mapping[str, str]) -> list[str]:
    """The acr values a request asks for: ``acr_values``, else the values of an
    essential ``acr`` in the claims parameter (OIDC Core 5.5.1.1)."""
    asked = params.get("acr_values", "").split()
    if asked or "claims" not in params:
        return asked
    try:
        acr = json.loads(params["claims"]).get("id_token", {}).get("acr", {})
    except (ValueError, AttributeError):
        return []
    if not isinstance(acr, dict) or not acr.get("essential"):
        return []
    values = acr.get("values", [acr["value"]] if "value" in acr else [])
    return [v for v in values if isinstance(v, str)]


@dataclass
class OpBehaviour:
    """Every way the provider can misbehave. All default to a correct provider."""

    now: Callable[[], float] = time.time  # the provider's clock (tests move it)
    user: OpUser = field(default_factory=OpUser)
    # assert the first requested acr_values entry (or essential acr claim value)
    honour_acr_values: bool = False
    # --- signing
    sign_with: str = "RSA"  # which current key signs: "RSA" or "EC"
    wrong_signature_key: bool = False  # sign with an unpublished key, name a published kid
    alg_none: bool = False  # unsigned token, alg "none"
    hs256_with_public_key: bool = False  # HS256 keyed with the signing key's public PEM
    unknown_kid: bool = False  # a fresh random kid in every token's header
    omit_kid: bool = False
    # --- claims (deltas in seconds, relative to the provider's clock)
    iss: str | None = None  # replaces the issuer in the token
    aud: str | list[str] | None = None  # replaces the audience
    extra_audiences: list[str] = field(default_factory=list)  # aud = [client_id, *these]
    azp: str | None = None  # included when set
    exp_delta_s: float = 300
    iat_delta_s: float = 0
    nbf_delta_s: float | None = None  # nbf is included when set
    auth_time_delta_s: float = 0  # relative to when /authorize ran
    omit_auth_time: bool = False
    clock_offset_s: float = 0  # shifts iat, exp and auth_time together
    nonce: str | None = None  # replaces the nonce from the request
    extra_claims: dict[str, Any] = field(default_factory=dict)  # merged last (None drops)
    # --- authorization response
    authorize_error: str | None = None  # access_denied, login_required, unmet_authentication_...
    advertise_iss_parameter: bool = True  # RFC 9207 in discovery
    omit_callback_iss: bool = False
    callback_iss: str | None = None  # replaces iss on the redirect back
    # --- token endpoint
    token_error: str | None = None  # e.g. "invalid_grant", answered with 400
    token_error_codes: tuple[int, ...] = ()  # Entra's numeric "error_codes" beside it
    token_status: int = 200  # anything else: that status with a plain-text body
    token_response: dict[str, Any] | None = None  # replaces a successful response body
    # --- discovery / JWKS
    discovery_status: int = 200
    jwks_status: int = 200
    discovery_overrides: dict[str, Any] = field(default_factory=dict)  # None drops a member
    # --- DPoP (RFC 9449 8): demand this nonce in proofs (use_dpop_nonce until it comes)
    dpop_nonce: str | None = None


# Name -> (knobs, the IdTokenError.reason the gateway must answer with). One check
# each; shared by the gateway's own tests so every misbehaviour is walked end to end.
ID_TOKEN_MISBEHAVIOURS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong_signature_key": ({"wrong_signature_key": True}, "bad_signature"),
    "alg_none": ({"alg_none": True}, "alg"),
    "hs256_with_public_key": ({"hs256_with_public_key": True}, "alg"),
    "wrong_iss": ({"iss": "https://evil.example"}, "iss"),
    "wrong_aud": ({"aud": "someone-else"}, "aud"),
    "multi_aud_without_azp": ({"extra_audiences": ["other-rp"]}, "azp"),
    "multi_aud_wrong_azp": ({"extra_audiences": ["other-rp"], "azp": "other-rp"}, "azp"),
    "expired": ({"exp_delta_s": -3600}, "exp"),
    "iat_in_future": ({"iat_delta_s": 3600}, "iat"),
    "iat_too_old": ({"iat_delta_s": -3600, "exp_delta_s": 300}, "iat"),
    "nbf_in_future": ({"nbf_delta_s": 3600}, "nbf"),
    "auth_time_in_future": ({"auth_time_delta_s": 3600}, "auth_time"),
    "wrong_nonce": ({"nonce": "not-the-nonce-we-sent"}, "nonce"),
    "unknown_kid": ({"unknown_kid": True}, "kid"),
    "clock_ahead_beyond_skew": ({"clock_offset_s": 3600}, "iat"),
    # Claims that reach the upstream's headers: one header each, nothing smuggled.
    "sub_with_crlf": ({"user": OpUser(sub="user-1\r\nX-Auth-Level: admin")}, "claim_value"),
    "email_with_lf": ({"user": OpUser(email="a@example.com\nX-Evil: 1")}, "claim_value"),
    "amr_with_nul": ({"user": OpUser(amr=["pwd\x00"])}, "claim_value"),
    "acr_with_line_separator": ({"user": OpUser(acr="phr\u2028x")}, "claim_value"),
    "sub_too_long": ({"user": OpUser(sub="u" * 256)}, "claim_value"),
}
# Needs max_age in the request (auth_time is then REQUIRED, OIDC Core 3.1.2.1).
MISSING_AUTH_TIME: tuple[dict[str, Any], str] = ({"omit_auth_time": True}, "auth_time")
# Name -> (knobs, the CallbackError.reason).
CALLBACK_MISBEHAVIOURS: dict[str, tuple[dict[str, Any], str]] = {
    "missing_callback_iss": ({"omit_callback_iss": True}, "callback_iss_missing"),
    "wrong_callback_iss": ({"callback_iss": "https://evil.example"}, "callback_iss_mismatch"),
}


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    acr_values: list[str]
    authenticated_at: float
    sid: str
    issued_at: float
    request: dict[str, str] = field(default_factory=dict)  # the authorization request


# ------------------------------------------------------------------------ the OP

OP_KEY: web.AppKey[OpenIdProvider] = web.AppKey("op")


class OpenIdProvider:
    """The provider: state, knobs, recorded requests, and its aiohttp app."""

    def __init__(
        self,
        issuer: str = "",
        *,
        clients: list[OpClient] | None = None,
        behaviour: OpBehaviour | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.clients = {c.client_id: c for c in (clients or [OpClient()])}
        self.behaviour = behaviour or OpBehaviour()
        self.keys: list[OpKey] = [_stock_key("RSA", "rsa-1"), _stock_key("EC", "ec-1")]
        self._rogue = {"RSA": _stock_key("RSA", "rogue"), "EC": _stock_key("EC", "rogue")}
        self.hits: Counter[str] = Counter()
        self.authorization_requests: list[dict[str, str]] = []
        self.token_requests: list[dict[str, str]] = []  # client_secret removed
        self.end_session_requests: list[dict[str, str]] = []
        self._codes: dict[str, _Grant] = {}
        self.pushed_requests: list[dict[str, str]] = []  # client assertion removed
        self._pushed: dict[str, tuple[str, dict[str, str], float]] = {}  # uri -> client, params
        self._seen_jti: set[str] = set()  # client assertions and DPoP proofs: used once
        self.dpop_jkt: list[str | None] = []  # per token response, the key it was bound to
        self.assertion_kids: list[str | None] = []  # per accepted client assertion
        self._access_tokens: dict[str, str] = {}  # token -> sub
        self.traceparents: list[tuple[str, str | None]] = []  # (path, traceparent) per request
        self.server: Any = None  # the TestServer, when started with start_op()
        self.app = self._make_app()

    # ----------------------------------------------------------------- test helpers

    @property
    def last_authorization(self) -> dict[str, str] | None:
        return self.authorization_requests[-1] if self.authorization_requests else None

    def now(self) -> float:
        return self.behaviour.now() + self.behaviour.clock_offset_s

    def signing_key(self) -> OpKey:
        """The newest published key of the ``sign_with`` type."""
        for key in reversed(self.keys):
            if key.kty == self.behaviour.sign_with:
                return key
        raise LookupError(f"no {self.behaviour.sign_with} key")

    def rotate_keys(self, kty: str = "RSA", *, retire_old: bool = False) -> OpKey:
        """Publish a new key and sign with it from now on; return it."""
        key = new_key(kty)
        if retire_old:
            self.keys = [k for k in self.keys if k.kty != kty]
        self.keys.append(key)
        self.behaviour.sign_with = kty
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    def discovery(self) -> dict[str, Any]:
        base = self.issuer
        doc: dict[str, Any] = {
            "issuer": base,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "jwks_uri": f"{base}/jwks",
            "userinfo_endpoint": f"{base}/userinfo",
            "end_session_endpoint": f"{base}/end_session",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "grant_types_supported": ["authorization_code"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": ["ES256", "PS256"],
            "pushed_authorization_request_endpoint": f"{base}/par",
            "require_pushed_authorization_requests": False,
            "dpop_signing_alg_values_supported": ["ES256", "PS256"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "profile", "email"],
            "claims_supported": ["sub", "iss", "acr", "amr", "auth_time", "email", "name", "sid"],
            "claims_parameter_supported": True,
            "acr_values_supported": ["urn:example:loa:1", "urn:example:loa:2", "phr", "phrh"],
            "authorization_response_iss_parameter_supported": (
                self.behaviour.advertise_iss_parameter
            ),
            "backchannel_logout_supported": False,
        }
        for name, value in self.behaviour.discovery_overrides.items():
            if value is None:
                doc.pop(name, None)
            else:
                doc[name] = value
        return doc

    def id_token_claims(
        self,
        *,
        client_id: str = "gateway",
        nonce: str | None = None,
        acr_values: list[str] | None = None,
        authenticated_at: float | None = None,
        sid: str | None = None,
        request: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The claims the next ID token gets, after every knob is applied. ``request``
        is the authorization request, for vendor stand-ins that answer from it."""
        b = self.behaviour
        now = self.now()
        aud: str | list[str]
        if b.aud is not None:
            aud = b.aud
        elif b.extra_audiences:
            aud = [client_id, *b.extra_audiences]
        else:
            aud = client_id
        claims: dict[str, Any] = {
            "iss": b.iss if b.iss is not None else self.issuer,
            "sub": b.user.sub,
            "aud": aud,
            "exp": int(now + b.exp_delta_s),
            "iat": int(now + b.iat_delta_s),
            "sid": sid or secrets.token_urlsafe(8),
        }
        if b.azp is not None:
            claims["azp"] = b.azp
        if b.nbf_delta_s is not None:
            claims["nbf"] = int(now + b.nbf_delta_s)
        if b.nonce is not None or nonce is not None:
            claims["nonce"] = b.nonce if b.nonce is not None else nonce
        if not b.omit_auth_time:
            started = now if authenticated_at is None else authenticated_at
            claims["auth_time"] = int(started + b.auth_time_delta_s)
        acr = b.user.acr
        if b.honour_acr_values and acr_values:
            acr = acr_values[0]
        if acr is not None:
            claims["acr"] = acr
        if b.user.amr is not None:
            claims["amr"] = list(b.user.amr)
        if b.user.email is not None:
            claims["email"] = b.user.email
            if b.user.email_verified is not None:
                claims["email_verified"] = b.user.email_verified
        if b.user.name is not None:
            claims["name"] = b.user.name
        for name, value in b.extra_claims.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def make_id_token(self, *, nonce: str | None, client_id: str = "gateway", **kw: Any) -> str:
        """An ID token as ``/token`` would issue it now (knobs applied), for direct use."""
        return self.sign(self.id_token_claims(client_id=client_id, nonce=nonce, **kw))

    def sign(self, claims: Mapping[str, Any], *, key: OpKey | None = None) -> str:
        """Sign claims as the provider would, honouring the signing knobs."""
        b = self.behaviour
        key = key or self.signing_key()
        header: dict[str, Any] = {"typ": "JWT", "kid": key.kid}
        if b.unknown_kid:
            header["kid"] = f"unknown-{secrets.token_hex(8)}"
        if b.omit_kid:
            del header["kid"]
        if b.alg_none:
            return _compact({**header, "alg": "none"}, claims, lambda _: b"")
        if b.hs256_with_public_key:
            secret = key.public_pem()
            return _compact(
                {**header, "alg": "HS256"},
                claims,
                lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
            )
        signer = self._rogue[key.kty] if b.wrong_signature_key else key
        return jwt.encode(dict(claims), signer.private_key, algorithm=key.alg, headers=header)

    # ---------------------------------------------------------------------- the app

    def _make_app(self) -> web.Application:
        @web.middleware
        async def record_traceparent(request: web.Request, handler: Any) -> web.StreamResponse:
            # W3C Trace Context: what the gateway sent as the parent of this call.
            self.traceparents.append((request.path, request.headers.get("traceparent")))
            return await handler(request)

        app = web.Application(middlewares=[record_traceparent])
        app[OP_KEY] = self
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_route("*", "/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/par", self._par)
        app.router.add_route("*", "/userinfo", self._userinfo)
        app.router.add_route("*", "/end_session", self._end_session)
        return app

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self.hits["discovery"] += 1
        if self.behaviour.discovery_status != 200:
            return web.Response(status=self.behaviour.discovery_status, text="unavailable")
        return web.json_response(self.discovery())

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits["jwks"] += 1
        if self.behaviour.jwks_status != 200:
            return web.Response(status=self.behaviour.jwks_status, text="unavailable")
        return web.json_response(self.jwks())

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        self.hits["authorize"] += 1
        params = await _params(request)
        client = self.clients.get(params.get("client_id", ""))
        if client is None:
            self.authorization_requests.append(params)
            return web.Response(status=400, text="unknown client_id")
        if "request_uri" in params:
            # RFC 9126 4: the pushed parameters, once, for the client that pushed them.
            pushed = self._pushed.pop(params["request_uri"], None)
            if pushed is None or pushed[0] != client.client_id or self.now() > pushed[2]:
                self.authorization_requests.append(params)
                return web.Response(status=400, text="unknown or expired request_uri")
            params = {**pushed[1], "client_id": client.client_id, "_pushed": "1"}
        elif client.require_par:
            self.authorization_requests.append(params)
            return web.Response(status=400, text="pushed authorization request required")
        self.authorization_requests.append(params)
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            # RFC 6749 4.1.2.1: never redirect to an unregistered URI.
            return web.Response(status=400, text="redirect_uri is not registered")
        state = params.get("state")

        def back(**answer: str) -> web.StreamResponse:
            iss = self.behaviour.callback_iss or self.issuer
            if not self.behaviour.omit_callback_iss:
                answer["iss"] = iss
            if state is not None:
                answer["state"] = state
            return _redirect(_add_query(redirect_uri, answer))

        if params.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if "openid" not in params.get("scope", "").split():
            return back(error="invalid_scope")
        challenge = params.get("code_challenge", "")
        if params.get("code_challenge_method") != "S256" or not _PKCE_CHALLENGE.fullmatch(
            challenge
        ):
            return back(error="invalid_request", error_description="PKCE with S256 is required")
        if self.behaviour.authorize_error:
            return back(error=self.behaviour.authorize_error)
        refusal = self.refuse_authorization(params)
        if refusal is not None:
            return back(**refusal)
        code = secrets.token_urlsafe(24)
        now = self.now()
        self._codes[code] = _Grant(
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            code_challenge=challenge,
            nonce=params.get("nonce"),
            acr_values=requested_acr(params),
            authenticated_at=now,
            sid=secrets.token_urlsafe(8),
            issued_at=now,
            request=dict(params),
        )
        return back(code=code)

    def refuse_authorization(self, params: Mapping[str, str]) -> dict[str, str] | None:
        """An error answer (``error``, ``error_description``) for this request, or None.
        Vendor stand-ins (tests/support/vendors.py) refuse what their vendor refuses."""
        return None

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.hits["token"] += 1
        form = dict(await request.post())
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        client, method, problem = self._authenticate_client(request, fields)
        recorded = _recorded(fields, method)
        recorded["dpop"] = "yes" if "DPoP" in request.headers else "no"
        self.token_requests.append(recorded)
        if client is None:
            headers = {"WWW-Authenticate": 'Basic realm="op"'} if method == "basic" else {}
            return _oauth_error(problem or "invalid_client", status=401, headers=headers)
        jkt, dpop_error = self._check_dpop(request)
        if dpop_error == "use_dpop_nonce":
            return _oauth_error(
                "use_dpop_nonce", headers={"DPoP-Nonce": self.behaviour.dpop_nonce or ""}
            )
        if dpop_error is not None or (client.require_dpop and jkt is None):
            return _oauth_error("invalid_dpop_proof")
        if self.behaviour.token_status != 200:
            return web.Response(status=self.behaviour.token_status, text="unavailable")
        if self.behaviour.token_error:
            return _oauth_error(self.behaviour.token_error, codes=self.behaviour.token_error_codes)
        if fields.get("grant_type") != "authorization_code":
            return _oauth_error("unsupported_grant_type")
        grant = self._codes.pop(fields.get("code", ""), None)  # single use
        if grant is None or self.now() - grant.issued_at > CODE_TTL_S:
            return _oauth_error("invalid_grant", "unknown, used or expired code")
        if grant.client_id != client.client_id:
            return _oauth_error("invalid_grant", "code was issued to another client")
        if fields.get("redirect_uri") != grant.redirect_uri:
            return _oauth_error("invalid_grant", "redirect_uri differs from the request")
        verifier = fields.get("code_verifier", "")
        if not _PKCE_VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
            _s256(verifier), grant.code_challenge
        ):
            return _oauth_error("invalid_grant", "PKCE verification failed")
        id_token = self.make_id_token(
            client_id=client.client_id,
            nonce=grant.nonce,
            acr_values=grant.acr_values,
            authenticated_at=grant.authenticated_at,
            sid=grant.sid,
            request=grant.request,
        )
        access_token = secrets.token_urlsafe(24)
        self._access_tokens[access_token] = self.behaviour.user.sub
        self.dpop_jkt.append(jkt)
        body = self.behaviour.token_response or {
            "access_token": access_token,
            "token_type": "DPoP" if jkt is not None else "Bearer",
            "expires_in": 300,
            "id_token": id_token,
            "scope": "openid profile email",
        }
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def _par(self, request: web.Request) -> web.StreamResponse:
        """RFC 9126 2: authenticate the client, keep the parameters, answer 201."""
        self.hits["par"] += 1
        form = dict(await request.post())
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        client, method, problem = self._authenticate_client(request, fields)
        recorded = _recorded(fields, method)
        self.pushed_requests.append(recorded)
        if client is None:
            return _oauth_error(problem or "invalid_client", status=401)
        if "request_uri" in fields:  # RFC 9126 2.1: MUST NOT be pushed
            return _oauth_error("invalid_request", "request_uri is not allowed here")
        redirect_uri = fields.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            return _oauth_error("invalid_request", "redirect_uri is not registered")
        params = {
            k: v
            for k, v in fields.items()
            if k not in ("client_secret", "client_assertion", "client_assertion_type", "client_id")
        }
        uri = f"urn:ietf:params:oauth:request_uri:{secrets.token_urlsafe(16)}"
        self._pushed[uri] = (client.client_id, params, self.now() + 60)
        return web.json_response({"request_uri": uri, "expires_in": 60}, status=201)

    def _check_client_assertion(self, fields: Mapping[str, str]) -> OpClient | None:
        """RFC 7523 3 / OIDC Core 9: signature by a registered key, iss = sub = the
        client, aud this provider, unexpired, jti never seen before."""
        if fields.get("client_assertion_type") != (
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ):
            return None
        assertion = fields.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        client = self.clients.get(str(unverified.get("iss", "")))
        if client is None or client.auth_method != "private_key_jwt":
            return None
        if fields.get("client_id", client.client_id) != client.client_id:
            return None
        for jwk in client.jwks:
            if header.get("kid") not in (None, jwk.get("kid")):
                continue
            try:
                claims = jwt.decode(
                    assertion,
                    jwt.PyJWK(jwk).key,
                    algorithms=[header.get("alg", "")]
                    if header.get("alg") in ("ES256", "PS256")
                    else [],
                    audience=[self.issuer, f"{self.issuer}/token", f"{self.issuer}/par"],
                    issuer=client.client_id,
                    options={"require": ["exp", "jti", "sub", "aud", "iss"]},
                    leeway=5,
                )
            except jwt.PyJWTError:
                continue
            if claims["sub"] != client.client_id or claims["jti"] in self._seen_jti:
                return None
            self._seen_jti.add(claims["jti"])
            self.assertion_kids.append(header.get("kid"))
            return client
        return None

    def _check_dpop(self, request: web.Request) -> tuple[str | None, str | None]:
        """(JWK thumbprint of a valid DPoP proof, or None; the error, or None)."""
        proof = request.headers.get("DPoP")
        if proof is None:
            return None, None
        try:
            header = jwt.get_unverified_header(proof)
            if header.get("typ") != "dpop+jwt" or header.get("alg") not in ("ES256", "PS256"):
                return None, "invalid_dpop_proof"
            jwk = header.get("jwk")
            claims = jwt.decode(proof, jwt.PyJWK(jwk).key, algorithms=[header["alg"]])
        except (jwt.PyJWTError, TypeError, KeyError):
            return None, "invalid_dpop_proof"
        if (
            claims.get("htm") != "POST"
            or claims.get("htu") != f"{self.issuer}/token"
            or abs(self.now() - float(claims.get("iat", 0))) > 60
            or claims.get("jti") in self._seen_jti
        ):
            return None, "invalid_dpop_proof"
        if (
            self.behaviour.dpop_nonce is not None
            and claims.get("nonce") != self.behaviour.dpop_nonce
        ):
            return None, "use_dpop_nonce"
        self._seen_jti.add(claims["jti"])
        required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
        canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
        return _b64(hashlib.sha256(canonical.encode()).digest()), None

    def _authenticate_client(
        self, request: web.Request, fields: Mapping[str, str]
    ) -> tuple[OpClient | None, str | None, str | None]:
        """(client, "basic"|"post"|"private_key_jwt"|None, error) per RFC 6749 2.3.1."""
        if "client_assertion" in fields:
            client = self._check_client_assertion(fields)
            return client, "private_key_jwt", None if client else "invalid_client"
        header = request.headers.get("Authorization", "")
        has_post = "client_secret" in fields
        if header[:6].lower() == "basic ":
            if has_post:
                return None, "basic", "invalid_request"  # 2.3: only one method per request
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
                raw_id, raw_secret = decoded.split(":", 1)
            except ValueError:
                return None, "basic", "invalid_client"
            client_id, secret, method = unquote_plus(raw_id), unquote_plus(raw_secret), "basic"
        elif has_post:
            client_id, secret = fields.get("client_id", ""), fields["client_secret"]
            method = "post"
        else:
            return None, None, "invalid_client"
        client = self.clients.get(client_id)
        if (
            client is None
            or client.auth_method != f"client_secret_{method}"
            or not hmac.compare_digest(secret.encode(), client.client_secret.encode())
        ):
            return None, method, "invalid_client"
        return client, method, None

    async def _userinfo(self, request: web.Request) -> web.StreamResponse:
        self.hits["userinfo"] += 1
        header = request.headers.get("Authorization", "")
        sub = self._access_tokens.get(header[7:]) if header[:7].lower() == "bearer " else None
        if sub is None:
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        user = self.behaviour.user
        info = {"sub": sub, "email": user.email, "name": user.name}
        return web.json_response({k: v for k, v in info.items() if v is not None})

    async def _end_session(self, request: web.Request) -> web.StreamResponse:
        self.hits["end_session"] += 1
        params = await _params(request)
        self.end_session_requests.append(params)
        target = params.get("post_logout_redirect_uri")
        if target is None:
            return web.Response(text="You are signed out.")
        client = self.clients.get(params.get("client_id", ""))
        hint = params.get("id_token_hint")
        if client is None and hint:
            try:
                aud = jwt.decode(hint, options={"verify_signature": False}).get("aud")
            except jwt.PyJWTError:
                aud = None
            first = aud[0] if isinstance(aud, list) and aud else aud
            client = self.clients.get(first) if isinstance(first, str) else None
        if client is None or target not in client.post_logout_redirect_uris:
            return web.Response(status=400, text="post_logout_redirect_uri is not registered")
        answer = {"state": params["state"]} if "state" in params else {}
        return _redirect(_add_query(target, answer))


async def start_op(
    aiohttp_server: Callable[..., Awaitable[Any]],
    *,
    clients: list[OpClient] | None = None,
    behaviour: OpBehaviour | None = None,
) -> OpenIdProvider:
    """Start a provider on loopback with pytest-aiohttp's ``aiohttp_server``;
    its issuer is its own URL. The server is reachable as ``op.server``."""
    op = OpenIdProvider(clients=clients, behaviour=behaviour)
    server = await aiohttp_server(op.app)
    op.issuer = f"http://{server.host}:{server.port}"
    op.server = server
    return op


# ----------------------------------------------------------------------- helpers


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact(
    header: Mapping[str, Any], claims: Mapping[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    return f"{signing_input}.{_b64(sign(signing_input.encode('ascii')))}"


def _s256(verifier: str) -> str:
    return _b64(hashlib.sha256(verifier.encode("ascii")).digest())


def _add_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), *params.items()])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def _recorded(fields: Mapping[str, str], method: str | None) -> dict[str, str]:
    """A client's request as the tests see it: without its secret or assertion."""
    recorded = {k: v for k, v in fields.items() if k not in ("client_secret", "client_assertion")}
    recorded["auth_method"] = method or "none"
    return recorded


def _oauth_error(
    code: str,
    description: str | None = None,
    *,
    status: int = 400,
    headers: Mapping[str, str] | None = None,
    codes: tuple[int, ...] = (),
) -> web.Response:
    body: dict[str, Any] = {"error": code}
    if description:
        body["error_description"] = description
    if codes:
        body["error_codes"] = list(codes)
    return web.json_response(
        body, status=status, headers={"Cache-Control": "no-store", **(headers or {})}
    )


async def _params(request: web.Request) -> dict[str, str]:
    """Query for GET, form for POST (OIDC Core 3.1.2.1 allows both)."""
    if request.method == "POST":
        form = await request.post()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    return dict(request.query)


# -------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Test OpenID Provider (never for production)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer", help="default: http://HOST:PORT")
    parser.add_argument("--client-id", default="gateway")
    parser.add_argument(
        "--client-secret-env",
        default="OP_CLIENT_SECRET",
        help="environment variable holding the client secret (read, never printed)",
    )
    parser.add_argument(
        "--client-auth",
        default="client_secret_basic",
        choices=["client_secret_basic", "client_secret_post"],
    )
    parser.add_argument("--redirect-uri", action="append", default=[], required=True)
    parser.add_argument("--post-logout-redirect-uri", action="append", default=[])
    parser.add_argument("--acr", default="urn:example:loa:1", help="acr the user signs in with")
    parser.add_argument("--amr", default="pwd", help="comma-separated amr values")
    parser.add_argument("--honour-acr-values", action="store_true")
    args = parser.parse_args(argv)

    client = OpClient(
        client_id=args.client_id,
        client_secret=os.environ.get(args.client_secret_env, OpClient.client_secret),
        redirect_uris=list(args.redirect_uri),
        auth_method=args.client_auth,
        post_logout_redirect_uris=list(args.post_logout_redirect_uri),
    )
    behaviour = OpBehaviour(
        user=OpUser(acr=args.acr or None, amr=[a for a in args.amr.split(",") if a]),
        honour_acr_values=args.honour_acr_values,
    )
    issuer = args.issuer or f"http://{args.host}:{args.port}"
    op = OpenIdProvider(issuer, clients=[client], behaviour=behaviour)
    asyncio.run(_serve(op, args.host, args.port))


async def _serve(op: OpenIdProvider, host: str, port: int) -> None:
    runner = web.AppRunner(op.app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    # Printed once the socket is bound, so a parent process can wait for this line.
    print(f"test OpenID Provider on http://{host}:{port} issuer={op.issuer}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
