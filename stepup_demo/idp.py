"""A development OpenID Provider with password, TOTP and passkey sign-in.

DEVELOPMENT ONLY: its users' passwords and TOTP secrets ship with the source code.
It exists so that ``stepup-gateway demo`` and the tests have a real provider to talk
to, one that answers step-up requests truthfully:

=====================  ===================  ===============
factor                 ``acr``              ``amr``
=====================  ===================  ===============
password               ``urn:stepup:loa:1``  ``[pwd]``
password + TOTP        ``urn:stepup:loa:2``  ``[pwd, otp]``
passkey, user verified ``phr``              ``[hwk]`` or ``[swk]``
=====================  ===================  ===============

It honours ``acr_values`` and the ``claims`` parameter's ``acr`` (prompting for the
strongest requested level the user can reach, or answering
``unmet_authentication_requirements``), ``max_age``, ``prompt=login``/``none``,
``login_hint`` and ``id_token_hint``; a provider session (its own cookie) that
already meets a request signs the user in without a prompt, and a step-up asks only
for what the session lacks: a signed-in user asked for ``phr`` is asked for a passkey
and nothing else, since a user-verified passkey is a whole sign-in on its own. A user
without a passkey may create one only after a one-time code in the same sign-in.

A request with RFC 9396 ``authorization_details`` or a ``binding_message`` asks the
user to approve something: every page of that sign-in says what ("Approve transfer
of 250.00 EUR to ACME Ltd"), the requested factor is asked for again even when the
session holds it, and the ID token echoes the approved ``authorization_details``
(:mod:`stepup_demo.approvals`).

The OAuth/OIDC protocol work is authlib's (see :mod:`stepup_demo.oauth`); the
sign-in decisions are pure functions in :mod:`stepup_demo.factors`; passkeys are
:mod:`stepup_demo.passkeys`. This module holds the state and the aiohttp handlers.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import AccessDeniedError, InvalidRequestError
from authlib.oidc.core.errors import LoginRequiredError
from authlib.oidc.rpinitiated import EndSessionRequest
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from stepup_demo import pages
from stepup_demo.approvals import SUPPORTED_TYPES, Approval, ApprovalError, approval_from_request
from stepup_demo.backchannel import BackchannelLogoutSender
from stepup_demo.factors import (
    ACR_MFA,
    ACR_PASSWORD,
    ACR_PHISHING_RESISTANT,
    ACR_STRENGTH,
    ACR_WORDS,
    AMR_OTP,
    AMR_PASSWORD,
    AcrRequest,
    Authentication,
    Decision,
    DemoUser,
    Factors,
    RequestError,
    Step,
    choose_acr,
    load_users_text,
    match_totp,
    next_step,
    parse_acr_request,
)
from stepup_demo.oauth import (
    CLIENT_AUTH_METHODS,
    ID_TOKEN_ALG,
    SCOPES_SUPPORTED,
    AiohttpOAuth2Request,
    DemoAuthorizationServer,
    DemoClient,
    GrantedUser,
    InvalidAuthorizationDetails,
    OAuthResponse,
    OAuthStore,
    UnmetAuthenticationRequirements,
    read_request,
    replayed_request,
)
from stepup_demo.passkeys import (
    CEREMONY_TIMEOUT_MS,
    PasskeyError,
    PasskeyStore,
    authentication_options,
    new_challenge,
    registration_options,
    verify_authentication,
    verify_registration,
)
from stepup_demo.provider_session import LogoutNotifier, ProviderSession

log = structlog.get_logger("stepup_demo.idp")

BROWSER_COOKIE = "demo_idp_browser"
SIGN_IN_TTL_S = 10 * 60  # one sign-in (authorization request -> code), like a code's max life
SESSION_LIFETIME_S = 12 * 60 * 60  # the provider session, as long as a gateway session
CHALLENGE_TTL_S = CEREMONY_TIMEOUT_MS // 1000
MAX_FAILURES_PER_SIGN_IN = 5
MAX_SIGN_INS = 10_000
# Per user, across sign-ins: a password alone must not allow guessing one-time codes
# (RFC 4226 7.3 asks for throttling; NIST SP 800-63B-4 3.2.2 for rate limiting).
TOTP_LOCKOUT_FAILURES = 5
TOTP_LOCKOUT_S = 5 * 60
RP_NAME = "Stepup demo identity provider"
CLAIMS_SUPPORTED = (
    *("sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "sid"),
    *("name", "email", "email_verified"),
)
STATIC_FILES = {"passkey.js": "text/javascript", "demo.css": "text/css"}
# Pages run only our own script; nothing may frame them (clickjacking). form-action
# is left out: Chrome applies it to the redirect back to the relying party too.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)

DEV_BANNER = """\
############################################################################
#  DEVELOPMENT ONLY: demo identity provider with published passwords and   #
#  TOTP secrets. It is not secure. Never expose it to a network or use it  #
#  for real accounts.                                                      #
############################################################################"""


# --- state -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingChallenge:
    kind: str  # "register" | "authenticate"
    challenge: bytes
    issued_at: float


@dataclass
class SignIn:
    """One authorization request being worked through, bound to one browser."""

    id: str
    browser_id: str
    params: tuple[tuple[str, str], ...]
    client: DemoClient
    acr_request: AcrRequest
    max_age_s: int | None
    force_login: bool
    username: str | None
    username_hint: str | None
    created_at: float
    approval: Approval | None = None  # what the user is asked to approve, if anything
    completed: list[Authentication] = field(default_factory=list)
    failures: int = 0
    challenge: PendingChallenge | None = None


def default_users() -> dict[str, DemoUser]:
    text = resources.files("stepup_demo").joinpath("users.yaml").read_text(encoding="utf-8")
    return load_users_text(text, "users.yaml")


def _random_id() -> str:
    return secrets.token_urlsafe(32)


# --- the provider ------------------------------------------------------------------


class IdentityProvider:
    """The development OpenID Provider; :meth:`app` is its aiohttp application."""

    def __init__(
        self,
        *,
        issuer: str,
        clients: Sequence[DemoClient],
        users: Mapping[str, DemoUser] | None = None,
        clock: Callable[[], float] = time.time,
        passkeys: PasskeyStore | None = None,
        logout_notifier: LogoutNotifier | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        parts = urlsplit(self.issuer)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"issuer must be an http(s) URL, got {issuer!r}")
        # WebAuthn: the RP ID is the host (browsers refuse IP addresses: use localhost).
        self.rp_id = parts.hostname
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.secure_cookies = parts.scheme == "https"
        self.users = dict(users) if users is not None else default_users()
        self.clock = clock
        self.passkeys = passkeys if passkeys is not None else PasskeyStore()
        self.key = ECKey.generate_key("P-256", parameters={"alg": ID_TOKEN_ALG, "use": "sig"})
        self.key.ensure_kid()
        self.logout_notifier: LogoutNotifier = logout_notifier or BackchannelLogoutSender(
            issuer=self.issuer, key=self.key, clock=clock
        )
        self._csrf_key = secrets.token_bytes(32)
        self.store = OAuthStore(clients, clock)
        self.server = DemoAuthorizationServer(
            issuer=self.issuer,
            store=self.store,
            users=self.users,
            key=self.key,
            on_end_session=self._end_session,
        )
        self.sessions: dict[str, ProviderSession] = {}  # by browser id (the cookie)
        self.sign_ins: dict[str, SignIn] = {}
        self.totp_last_step: dict[str, int] = {}
        self.totp_failures: dict[str, tuple[int, float]] = {}

    # --- metadata ---

    def jwks(self) -> dict[str, Any]:
        return dict(KeySet([self.key]).as_dict(private=False))

    def discovery(self) -> dict[str, Any]:
        """OpenID Provider Metadata (OIDC Discovery 1.0 §3, RFC 8414, RFC 9207)."""
        base = self.issuer
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "userinfo_endpoint": f"{base}/userinfo",
            "jwks_uri": f"{base}/jwks.json",
            "end_session_endpoint": f"{base}/end-session",
            "scopes_supported": list(SCOPES_SUPPORTED),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ID_TOKEN_ALG],
            "token_endpoint_auth_methods_supported": list(CLIENT_AUTH_METHODS),
            "code_challenge_methods_supported": ["S256"],
            "acr_values_supported": sorted(ACR_STRENGTH, key=ACR_STRENGTH.__getitem__)[::-1],
            "claims_parameter_supported": True,
            "claims_supported": list(CLAIMS_SUPPORTED),
            "prompt_values_supported": ["none", "login"],
            "request_parameter_supported": False,
            "request_uri_parameter_supported": False,
            # RFC 9396 10: the authorization_details this provider shows and echoes.
            "authorization_details_types_supported": list(SUPPORTED_TYPES),
            "authorization_response_iss_parameter_supported": True,
            # Back-Channel Logout 1.0 2.1; every logout token carries sid.
            "backchannel_logout_supported": self.logout_notifier.supported,
            "backchannel_logout_session_supported": self.logout_notifier.supported,
            "frontchannel_logout_supported": False,
        }

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers])
        app.router.add_get("/.well-known/openid-configuration", self.handle_discovery)
        app.router.add_get("/jwks.json", self.handle_jwks)
        app.router.add_route("GET", "/authorize", self.handle_authorize)
        app.router.add_route("POST", "/authorize", self.handle_authorize)
        app.router.add_get("/login/{sign_in}", self.handle_sign_in)
        app.router.add_post("/login/{sign_in}/password", self.handle_password)
        app.router.add_post("/login/{sign_in}/totp", self.handle_totp)
        app.router.add_post("/login/{sign_in}/cancel", self.handle_cancel)
        app.router.add_post("/login/{sign_in}/passkey/options", self.handle_passkey_options)
        app.router.add_post("/login/{sign_in}/passkey/verify", self.handle_passkey_verify)
        app.router.add_post("/login/{sign_in}/enrol/options", self.handle_enrol_options)
        app.router.add_post("/login/{sign_in}/enrol/verify", self.handle_enrol_verify)
        app.router.add_post("/token", self.handle_token)
        app.router.add_route("GET", "/userinfo", self.handle_userinfo)
        app.router.add_route("POST", "/userinfo", self.handle_userinfo)
        app.router.add_route("GET", "/end-session", self.handle_end_session)
        app.router.add_route("POST", "/end-session", self.handle_end_session)
        app.router.add_get("/static/{name}", self.handle_static)
        return app

    # --- small helpers ---

    def _csrf_token(self, browser_id: str, purpose: str) -> str:
        """A form token bound to this browser's cookie (synchronizer token, OWASP)."""
        mac = hmac.new(self._csrf_key, f"{purpose}|{browser_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def _csrf_ok(self, browser_id: str, purpose: str, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(self._csrf_token(browser_id, purpose).encode(), token.encode())

    def _set_browser_cookie(self, response: web.StreamResponse, browser_id: str) -> None:
        response.set_cookie(
            BROWSER_COOKIE,
            browser_id,
            httponly=True,
            samesite="Lax",  # sent on the top-level redirects from relying parties
            secure=self.secure_cookies,
            path="/",
        )

    def _session(self, browser_id: str | None) -> ProviderSession | None:
        if browser_id is None:
            return None
        session = self.sessions.get(browser_id)
        if session is not None and self.clock() - session.created_at > SESSION_LIFETIME_S:
            del self.sessions[browser_id]
            return None
        return session

    def _user_for_hint(self, hint: str | None) -> str | None:
        if not hint:
            return None
        for user in self.users.values():
            if hint in (user.username, user.email):
                return user.username
        return None

    def _id_token_hint_subject(self, token: str | None) -> str | None:
        """``sub`` of an ID token we issued (expired is fine: OIDC Core 3.1.2.1)."""
        if not token:
            return None
        try:
            decoded = jose_jwt.decode(token, self.key, algorithms=[ID_TOKEN_ALG])
        except (JoseError, ValueError):
            log.info("idp_id_token_hint_ignored", reason="invalid")
            return None
        sub = decoded.claims.get("sub")
        return sub if isinstance(sub, str) and sub in self.users else None

    def _factors(self, user: DemoUser) -> Factors:
        return Factors(
            totp=user.totp_secret is not None, passkey=bool(self.passkeys.for_user(user.username))
        )

    def _decide(self, sign_in: SignIn) -> Decision:
        user = self.users.get(sign_in.username) if sign_in.username else None
        session = self._session(sign_in.browser_id)
        from_session: list[Authentication] = []
        if user is not None and session is not None and session.username == user.username:
            from_session = list(session.authentications.values())
        return next_step(
            sign_in.acr_request,
            factors=self._factors(user) if user is not None else None,
            session=from_session,
            ceremony=sign_in.completed,
            force_login=sign_in.force_login,
            max_age_s=sign_in.max_age_s,
            now=self.clock(),
            approval=sign_in.approval is not None,
        )

    def _record(self, sign_in: SignIn, user: DemoUser, auth: Authentication) -> ProviderSession:
        """A factor succeeded: remember it in the sign-in and the provider session."""
        if sign_in.username != user.username:
            sign_in.username = user.username
            sign_in.completed = []
        sign_in.completed.append(auth)
        session = self._session(sign_in.browser_id)
        if session is None or session.username != user.username:
            # A new provider session gets a new cookie value (no session fixation).
            self.sessions.pop(sign_in.browser_id, None)
            sign_in.browser_id = _random_id()
            session = ProviderSession(
                sid=_random_id(), username=user.username, sub=user.sub, created_at=self.clock()
            )
            self.sessions[sign_in.browser_id] = session
        session.authentications[auth.acr] = auth
        log.info("idp_factor_ok", user=user.username, acr=auth.acr, amr=list(auth.amr))
        return session

    def _purge(self) -> None:
        now = self.clock()
        live = [(k, v) for k, v in self.sign_ins.items() if now - v.created_at <= SIGN_IN_TTL_S]
        # Anyone may start a sign-in: keep the newest few thousand, not unbounded memory.
        self.sign_ins = dict(live[-MAX_SIGN_INS:])

    def _reason(self, sign_in: SignIn, decision: Decision) -> str:
        """Which level the app asked for, in words, and what comes next."""
        client = sign_in.client.client_name
        target = decision.target or choose_acr(sign_in.acr_request, ACR_STRENGTH) or ACR_PASSWORD
        level = ACR_WORDS[target]
        step = decision.step
        text: str
        if target == ACR_PHISHING_RESISTANT:
            text = f"{client} asks for a passkey to continue: this action needs {level}."
            if step is Step.PASSWORD:
                text += " First, sign in with your password."
            elif step is Step.TOTP:
                text += (
                    " You have no passkey yet: confirm a one-time code from your authenticator"
                    " app, then create one."
                )
        elif target == ACR_MFA:
            text = f"{client} asks for a one-time code to continue: this action needs {level}."
            if step is Step.PASSWORD:
                text += " First, sign in with your password."
        else:
            text = f"{client} asks you to sign in with your password."
        if sign_in.force_login and target == ACR_PHISHING_RESISTANT and step is not Step.PASSWORD:
            text += " It asks for a new sign-in even if you are signed in: your passkey is one."
        elif sign_in.force_login:
            text += " It asks you to sign in again even if you are signed in."
        elif sign_in.approval is not None:
            text += " To approve, confirm it again even if you are signed in."
        elif sign_in.max_age_s is not None:
            text += f" It accepts a sign-in from the last {_duration(sign_in.max_age_s)} only."
        return text

    # --- authorization endpoint ---

    async def handle_authorize(self, request: web.Request) -> web.StreamResponse:
        data = await read_request(request, self.issuer)
        browser_id = request.cookies.get(BROWSER_COOKIE) or _random_id()
        session = self._session(browser_id)
        session_user = self.users.get(session.username) if session is not None else None
        try:
            oauth_request = self.server.create_oauth2_request(data)
        except OAuth2Error as error:  # e.g. plain http off loopback
            return self._authorization_error(None, error)
        try:
            grant = self.server.get_consent_grant(oauth_request, end_user=session_user)
        except OAuth2Error as error:
            return self._authorization_error(oauth_request, error)
        params = oauth_request.payload.data
        redirect_uri: str = grant.redirect_uri
        state = params.get("state")
        try:
            acr_request = parse_acr_request(params.get("acr_values"), params.get("claims"))
            max_age_s = _parse_max_age(params.get("max_age"))
            approval = approval_from_request(
                params.get("authorization_details"), params.get("binding_message")
            )
        except RequestError as exc:
            invalid = InvalidRequestError(str(exc), redirect_uri=redirect_uri, state=state)
            return self._authorization_error(oauth_request, invalid)
        except ApprovalError as exc:
            error_class = (
                InvalidAuthorizationDetails
                if exc.error == InvalidAuthorizationDetails.error
                else InvalidRequestError
            )
            refused = error_class(exc.description, redirect_uri=redirect_uri, state=state)
            return self._authorization_error(oauth_request, refused)
        prompts = set((params.get("prompt") or "").split())
        hinted = self._id_token_hint_subject(params.get("id_token_hint")) or self._user_for_hint(
            params.get("login_hint")
        )
        username = None
        if session is not None and hinted in (None, session.username):
            username = session.username
        self._purge()
        sign_in = SignIn(
            id=_random_id(),
            browser_id=browser_id,
            params=tuple(params.items()),
            client=grant.client,
            acr_request=acr_request,
            max_age_s=max_age_s,
            force_login="login" in prompts or max_age_s == 0,  # OIDC Core 3.1.2.1
            username=username,
            username_hint=hinted or params.get("login_hint"),
            created_at=self.clock(),
            approval=approval,
        )
        decision = self._decide(sign_in)
        if decision.step is Step.DONE and decision.result is not None and session is not None:
            user = self.users[sign_in.username or ""]
            log.info("idp_single_sign_on", user=user.username, acr=decision.result.acr)
            response = self._issue_code(
                oauth_request, grant, user, decision.result, session, sign_in.approval
            )
        elif decision.step is Step.UNMET:
            response = self._unmet(oauth_request, redirect_uri, state, sign_in)
        elif "none" in prompts:
            # OIDC Core 3.1.2.6: prompt=none and the user must interact.
            login_required = LoginRequiredError(redirect_uri=redirect_uri, state=state)
            response = self._authorization_error(oauth_request, login_required)
        else:
            self.sign_ins[sign_in.id] = sign_in
            response = _see_other(f"/login/{sign_in.id}")
        if request.cookies.get(BROWSER_COOKIE) != browser_id:
            self._set_browser_cookie(response, browser_id)
        return response

    def _authorization_error(
        self, oauth_request: AiohttpOAuth2Request | None, error: OAuth2Error
    ) -> web.StreamResponse:
        if oauth_request is not None and error.redirect_uri:
            return self.server.authorization_error(oauth_request, error).to_web()
        # No verified redirect_uri: tell the user, never redirect (RFC 6749 4.1.2.1).
        log.info("idp_authorization_refused", error=error.error)
        return _html(
            pages.message_page(
                "This sign-in request is not valid",
                [
                    "The app sent a sign-in request this provider cannot accept, so it is not"
                    " sent back to the app.",
                    f"{error.error}: {error.description or ''}",
                ],
            ),
            status=400,
        )

    def _unmet(
        self,
        oauth_request: AiohttpOAuth2Request,
        redirect_uri: str,
        state: str | None,
        sign_in: SignIn,
    ) -> web.StreamResponse:
        log.info(
            "idp_unmet_requirements", user=sign_in.username, acr=list(sign_in.acr_request.values)
        )
        unmet = UnmetAuthenticationRequirements(
            description="The user has no factor that meets the requested acr values",
            redirect_uri=redirect_uri,
            state=state,
        )
        return self._authorization_error(oauth_request, unmet)

    def _issue_code(
        self,
        oauth_request: AiohttpOAuth2Request,
        grant: Any,
        user: DemoUser,
        auth: Authentication,
        session: ProviderSession,
        approval: Approval | None = None,
    ) -> web.StreamResponse:
        granted = GrantedUser(
            user=user,
            authentication=auth,
            sid=session.sid,
            authorization_details=approval.details_json if approval is not None else None,
        )
        response: OAuthResponse = self.server.create_authorization_response(
            oauth_request, grant_user=granted, grant=grant
        )
        session.clients.add(oauth_request.client.client_id)
        log.info(
            "idp_code_issued",
            user=user.username,
            client_id=oauth_request.client.client_id,
            acr=auth.acr,
            amr=list(auth.amr),
            approved=approval is not None,
        )
        return response.to_web()

    # --- the sign-in pages ---

    def _sign_in(self, request: web.Request) -> SignIn | None:
        sign_in = self.sign_ins.get(request.match_info["sign_in"])
        if sign_in is None or self.clock() - sign_in.created_at > SIGN_IN_TTL_S:
            return None
        cookie = request.cookies.get(BROWSER_COOKIE, "")
        if not hmac.compare_digest(cookie.encode(), sign_in.browser_id.encode()):
            return None  # another browser: the sign-in is bound to the one that started it
        return sign_in

    def _expired_page(self) -> web.Response:
        return _html(
            pages.message_page(
                "This sign-in has expired",
                ["Go back to the app and start again."],
            ),
            status=400,
        )

    def _replay(self, sign_in: SignIn, user: DemoUser | None) -> tuple[AiohttpOAuth2Request, Any]:
        oauth_request = self.server.create_oauth2_request(
            replayed_request(self.issuer, "/authorize", sign_in.params)
        )
        return oauth_request, self.server.get_consent_grant(oauth_request, end_user=user)

    def _finish(self, sign_in: SignIn, decision: Decision) -> web.StreamResponse:
        """The sign-in has its answer: send the browser back to the app."""
        del self.sign_ins[sign_in.id]
        user = self.users.get(sign_in.username or "")
        try:
            oauth_request, grant = self._replay(sign_in, user)
        except OAuth2Error as error:
            return self._authorization_error(None, error)
        session = self._session(sign_in.browser_id)
        if decision.step is Step.DONE and decision.result and user:
            if session is None:  # signed out in another tab meanwhile
                return self._expired_page()
            response = self._issue_code(
                oauth_request, grant, user, decision.result, session, sign_in.approval
            )
        else:
            state = oauth_request.payload.state
            response = self._unmet(oauth_request, grant.redirect_uri, state, sign_in)
        self._set_browser_cookie(response, sign_in.browser_id)
        return response

    def _render(
        self,
        sign_in: SignIn,
        decision: Decision,
        *,
        error: str | None = None,
        typed: str | None = None,
    ) -> web.StreamResponse:
        base = f"/login/{sign_in.id}"
        csrf = self._csrf_token(sign_in.browser_id, sign_in.id)
        reason = self._reason(sign_in, decision)
        approve = sign_in.approval.text if sign_in.approval is not None else None
        cancel = f"{base}/cancel"
        if decision.step is Step.PASSWORD:
            body = pages.password_page(
                action=f"{base}/password",
                cancel_action=cancel,
                csrf_token=csrf,
                reason=reason,
                username=typed or sign_in.username or sign_in.username_hint,
                error=error,
                approval=approve,
            )
        elif decision.step is Step.TOTP:
            body = pages.totp_page(
                action=f"{base}/totp",
                cancel_action=cancel,
                csrf_token=csrf,
                reason=reason,
                username=sign_in.username or "",
                error=error,
                approval=approve,
            )
        else:
            create = decision.step is Step.ENROL_PASSKEY
            kind = "enrol" if create else "passkey"
            body = pages.passkey_page(
                create=create,
                options_url=f"{base}/{kind}/options",
                verify_url=f"{base}/{kind}/verify",
                fallback_url=base,
                cancel_action=cancel,
                csrf_token=csrf,
                reason=reason,
                username=sign_in.username or "",
                approval=approve,
            )
        response = _html(body)
        self._set_browser_cookie(response, sign_in.browser_id)
        return response

    async def handle_sign_in(self, request: web.Request) -> web.StreamResponse:
        sign_in = self._sign_in(request)
        if sign_in is None:
            return self._expired_page()
        decision = self._decide(sign_in)
        if decision.step in (Step.DONE, Step.UNMET):
            return self._finish(sign_in, decision)
        return self._render(sign_in, decision)

    async def _form_step(
        self, request: web.Request, expected: Step
    ) -> tuple[SignIn, Decision, Mapping[str, str]] | web.StreamResponse:
        """Common checks of a form post: live sign-in, CSRF token, the expected step."""
        sign_in = self._sign_in(request)
        if sign_in is None:
            return self._expired_page()
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        if not self._csrf_ok(sign_in.browser_id, sign_in.id, form.get("csrf_token")):
            return _html(pages.message_page("Form expired", ["Reload the page."]), status=403)
        decision = self._decide(sign_in)
        if sign_in.failures >= MAX_FAILURES_PER_SIGN_IN:
            del self.sign_ins[sign_in.id]
            return _html(
                pages.message_page("Too many attempts", ["Go back to the app and start again."]),
                status=429,
            )
        if decision.step is not expected:
            return _see_other(f"/login/{sign_in.id}")  # a stale page: show the current step
        return sign_in, decision, form

    async def handle_password(self, request: web.Request) -> web.StreamResponse:
        checked = await self._form_step(request, Step.PASSWORD)
        if isinstance(checked, web.StreamResponse):
            return checked
        sign_in, decision, form = checked
        typed = form.get("username", "").strip()
        user = self.users.get(typed) or self.users.get(self._user_for_hint(typed) or "")
        if user is None or not user.check_password(form.get("password", "")):
            sign_in.failures += 1
            log.info("idp_password_failed", sign_in_failures=sign_in.failures)
            return self._render(
                sign_in, decision, error="That user name and password do not match.", typed=typed
            )
        before = self._session(sign_in.browser_id)
        self._record(sign_in, user, Authentication(ACR_PASSWORD, (AMR_PASSWORD,), self.clock()))
        if before is not None and before.username != user.username:
            # Another user signed in on this browser: the old provider session is over.
            log.info("idp_session_ended", user=before.username, reason="replaced")
            await self._tell_clients(before)
        response = _see_other(f"/login/{sign_in.id}")
        self._set_browser_cookie(response, sign_in.browser_id)
        return response

    async def handle_totp(self, request: web.Request) -> web.StreamResponse:
        checked = await self._form_step(request, Step.TOTP)
        if isinstance(checked, web.StreamResponse):
            return checked
        sign_in, decision, form = checked
        user = self.users[sign_in.username or ""]
        now = self.clock()
        count, last_failure = self.totp_failures.get(user.username, (0, 0.0))
        if count >= TOTP_LOCKOUT_FAILURES and now - last_failure < TOTP_LOCKOUT_S:
            return self._render(
                sign_in, decision, error="Too many wrong codes. Wait five minutes and try again."
            )
        step = match_totp(
            user.totp_secret or "",
            form.get("totp", ""),
            now,
            last_step=self.totp_last_step.get(user.username),
        )
        if step is None:
            sign_in.failures += 1
            self.totp_failures[user.username] = (count + 1, now)
            log.info("idp_totp_failed", user=user.username)
            return self._render(
                sign_in, decision, error="That code is not right (or was already used)."
            )
        self.totp_last_step[user.username] = step
        self.totp_failures.pop(user.username, None)
        auth = Authentication(ACR_MFA, (AMR_PASSWORD, AMR_OTP), now)
        self._record(sign_in, user, auth)
        response = _see_other(f"/login/{sign_in.id}")
        self._set_browser_cookie(response, sign_in.browser_id)
        return response

    async def handle_cancel(self, request: web.Request) -> web.StreamResponse:
        sign_in = self._sign_in(request)
        if sign_in is None:
            return self._expired_page()
        form = await request.post()
        token = form.get("csrf_token")
        if not self._csrf_ok(
            sign_in.browser_id, sign_in.id, token if isinstance(token, str) else None
        ):
            return _html(pages.message_page("Form expired", ["Reload the page."]), status=403)
        del self.sign_ins[sign_in.id]
        try:
            oauth_request, grant = self._replay(sign_in, None)
        except OAuth2Error as error:
            return self._authorization_error(None, error)
        denied = AccessDeniedError(
            description="The user cancelled the sign-in",
            redirect_uri=grant.redirect_uri,
            state=oauth_request.payload.state,
        )
        return self._authorization_error(oauth_request, denied)

    # --- passkey ceremonies (JSON, driven by static/passkey.js) ---

    async def _json_step(
        self, request: web.Request, expected: Step
    ) -> tuple[SignIn, dict[str, Any]] | web.StreamResponse:
        sign_in = self._sign_in(request)
        if sign_in is None:
            return _json_error(400, "This sign-in has expired: go back to the app and start again.")
        if request.content_type != "application/json":
            return _json_error(415, "Send JSON.")
        if not self._csrf_ok(sign_in.browser_id, sign_in.id, request.headers.get("X-CSRF-Token")):
            return _json_error(403, "The page is out of date: reload it.")
        try:
            body = await request.json()
        except ValueError:
            return _json_error(400, "The request body is not JSON.")
        if not isinstance(body, dict):
            return _json_error(400, "The request body must be a JSON object.")
        if sign_in.failures >= MAX_FAILURES_PER_SIGN_IN:
            del self.sign_ins[sign_in.id]
            return _json_error(429, "Too many attempts: go back to the app and start again.")
        step = self._decide(sign_in).step
        if step is not expected:
            if expected is Step.ENROL_PASSKEY and step in (Step.PASSWORD, Step.TOTP):
                return _json_error(
                    403, "Confirm a one-time code in this sign-in before creating a passkey."
                )
            return _json_error(409, "This step is not due: reload the page.")
        return sign_in, body

    def _take_challenge(self, sign_in: SignIn, kind: str) -> bytes | None:
        pending, sign_in.challenge = sign_in.challenge, None  # one use only
        if pending is None or pending.kind != kind:
            return None
        if self.clock() - pending.issued_at > CHALLENGE_TTL_S:
            return None
        return pending.challenge

    async def handle_passkey_options(self, request: web.Request) -> web.StreamResponse:
        checked = await self._json_step(request, Step.PASSKEY)
        if isinstance(checked, web.StreamResponse):
            return checked
        sign_in, _ = checked
        challenge = new_challenge()
        sign_in.challenge = PendingChallenge("authenticate", challenge, self.clock())
        options = authentication_options(
            rp_id=self.rp_id,
            passkeys=self.passkeys.for_user(sign_in.username or ""),
            challenge=challenge,
        )
        return _json_text(options)

    async def _ceremony(
        self, request: web.Request, step: Step, kind: str
    ) -> tuple[SignIn, DemoUser, bytes, dict[str, Any]] | web.StreamResponse:
        """A passkey answer for ``step``: (sign-in, user, the challenge it must sign,
        the credential), or the error to answer with. The challenge is used up."""
        checked = await self._json_step(request, step)
        if isinstance(checked, web.StreamResponse):
            return checked
        sign_in, body = checked
        challenge = self._take_challenge(sign_in, kind)
        credential = body.get("credential")
        if challenge is None or not isinstance(credential, dict):
            return _json_error(400, "Start again: press the button once more.")
        return sign_in, self.users[sign_in.username or ""], challenge, credential

    async def handle_passkey_verify(self, request: web.Request) -> web.StreamResponse:
        ceremony = await self._ceremony(request, Step.PASSKEY, "authenticate")
        if isinstance(ceremony, web.StreamResponse):
            return ceremony
        sign_in, user, challenge, credential = ceremony
        try:
            verified = verify_authentication(
                credential,
                challenge=challenge,
                rp_id=self.rp_id,
                origin=self.origin,
                passkeys=self.passkeys.for_user(user.username),
            )
        except PasskeyError as exc:
            sign_in.failures += 1
            log.info("idp_passkey_failed", user=user.username, reason=str(exc))
            return _json_error(400, str(exc))
        self.passkeys.used(verified.passkey, verified.sign_count)
        auth = Authentication(ACR_PHISHING_RESISTANT, (verified.amr,), self.clock())
        self._record(sign_in, user, auth)
        response = web.json_response({"next": f"/login/{sign_in.id}"})
        self._set_browser_cookie(response, sign_in.browser_id)
        return response

    async def handle_enrol_options(self, request: web.Request) -> web.StreamResponse:
        checked = await self._json_step(request, Step.ENROL_PASSKEY)
        if isinstance(checked, web.StreamResponse):
            return checked
        sign_in, _ = checked
        user = self.users[sign_in.username or ""]
        challenge = new_challenge()
        sign_in.challenge = PendingChallenge("register", challenge, self.clock())
        options = registration_options(
            rp_id=self.rp_id,
            rp_name=RP_NAME,
            username=user.username,
            display_name=user.name,
            user_handle=self.passkeys.user_handle(user.username),
            existing=self.passkeys.for_user(user.username),
            challenge=challenge,
        )
        return _json_text(options)

    async def handle_enrol_verify(self, request: web.Request) -> web.StreamResponse:
        ceremony = await self._ceremony(request, Step.ENROL_PASSKEY, "register")
        if isinstance(ceremony, web.StreamResponse):
            return ceremony
        sign_in, user, challenge, credential = ceremony
        try:
            passkey = verify_registration(
                credential,
                challenge=challenge,
                rp_id=self.rp_id,
                origin=self.origin,
                username=user.username,
                user_handle=self.passkeys.user_handle(user.username),
                now=self.clock(),
            )
        except PasskeyError as exc:
            sign_in.failures += 1
            log.info("idp_passkey_enrol_failed", user=user.username, reason=str(exc))
            return _json_error(400, str(exc))
        if self.passkeys.get(passkey.credential_id) is not None:
            return _json_error(400, "That passkey is already registered.")
        self.passkeys.add(passkey)
        log.info("idp_passkey_enrolled", user=user.username, amr=passkey.amr)
        return web.json_response({"next": f"/login/{sign_in.id}"})

    # --- token, userinfo, logout, metadata ---

    async def handle_token(self, request: web.Request) -> web.StreamResponse:
        data = await read_request(request, self.issuer)
        try:
            response: OAuthResponse = self.server.create_token_response(data)
        except OAuth2Error as error:  # raised before authlib's own handling, e.g. transport
            return web.json_response(dict(error.get_body()), status=error.status_code)
        return response.to_web()

    async def handle_userinfo(self, request: web.Request) -> web.StreamResponse:
        data = await read_request(request, self.issuer)
        try:
            response: OAuthResponse = self.server.create_endpoint_response("userinfo", data)
        except OAuth2Error as error:
            return web.json_response(dict(error.get_body()), status=error.status_code)
        return response.to_web()

    def _end_session(self, end_session_request: EndSessionRequest) -> None:
        oauth_request: AiohttpOAuth2Request = end_session_request.request
        browser_id = oauth_request.http.cookies.get(BROWSER_COOKIE)
        ended = self.sessions.pop(browser_id, None) if browser_id else None
        oauth_request.ended_session = ended
        if ended is not None:
            log.info("idp_session_ended", user=ended.username, reason="end_session")

    async def _tell_clients(self, ended: ProviderSession) -> None:
        """Back-channel logout to every client that got a code in ``ended``."""
        clients = [c for c in self.store.clients.values() if c.client_id in ended.clients]
        await self.logout_notifier.session_ended(ended, clients)

    async def handle_end_session(self, request: web.Request) -> web.StreamResponse:
        """RP-Initiated Logout 1.0, through authlib's EndSessionEndpoint."""
        data = await read_request(request, self.issuer)
        browser_id = request.cookies.get(BROWSER_COOKIE)
        session = self._session(browser_id)
        confirmed = False
        if request.method == "POST" and data.form.get("confirm") == "yes":
            if browser_id is None or not self._csrf_ok(
                browser_id, "end-session", data.form.get("csrf_token")
            ):
                return _html(pages.message_page("Form expired", ["Reload the page."]), status=403)
            confirmed = True
        try:
            oauth_request = self.server.create_oauth2_request(data)
            oauth_request.logout_confirmed = confirmed
            oauth_request.ended_session = None
            end_request = self.server.validate_endpoint_request("end_session", oauth_request)
        except OAuth2Error as error:
            # RP-Initiated Logout 1.0 §4: on errors, no post-logout redirection.
            return _html(
                pages.message_page(
                    "This sign-out request is not valid", [f"{error.error}: {error.description}"]
                ),
                status=400,
            )
        hinted_sid = (end_request.id_token_claims or {}).get("sid")
        if session is not None and browser_id and hinted_sid != session.sid and not confirmed:
            # No proof the request is about this browser's session: ask (§6).
            keep = ("client_id", "post_logout_redirect_uri", "state", "logout_hint", "ui_locales")
            params = [(k, v) for k, v in data.query.items() if k in keep]
            params += [(k, v) for k, v in data.form.items() if k in keep]
            params.append(("confirm", "yes"))
            csrf = self._csrf_token(browser_id, "end-session")
            return _html(
                pages.end_session_page(action="/end-session", csrf_token=csrf, params=params)
            )
        result: OAuthResponse | None = self.server.create_endpoint_response(
            "end_session", end_request
        )
        ended: ProviderSession | None = oauth_request.ended_session
        if ended is not None:
            await self._tell_clients(ended)
        if result is not None:
            response: web.StreamResponse = result.to_web()
        else:
            response = _html(
                pages.message_page("Signed out", ["You are signed out of the demo provider."])
            )
        response.del_cookie(BROWSER_COOKIE, path="/")
        return response

    async def handle_discovery(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.discovery(), headers={"Cache-Control": "max-age=300"})

    async def handle_jwks(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.jwks(), headers={"Cache-Control": "max-age=300"})

    async def handle_static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        content_type = STATIC_FILES.get(name)
        if content_type is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=pages.static_file(name),
            content_type=content_type,
            headers={"Cache-Control": "no-cache"},
        )


def _parse_max_age(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise RequestError("'max_age' must be a number of seconds")
    return int(raw)


def _duration(seconds: int) -> str:
    if seconds % 60 == 0 and seconds >= 60:
        minutes = seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP},
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _json_text(text: str) -> web.Response:
    return web.Response(
        text=text, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": message}, status=status, headers={"Cache-Control": "no-store"}
    )


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


# --- running it on its own -----------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; other names are not trusted."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_public_bind(host: str, allowed: bool) -> str | None:
    """The error to print when ``host`` is not loopback and that was not allowed."""
    if is_loopback(host) or allowed:
        return None
    return (
        f"refusing to listen on {host}: the demo identity provider's passwords and TOTP"
        " secrets are public. Use 127.0.0.1, or pass --i-know-this-is-not-production."
    )


def print_dev_banner(out: TextIO | None = None) -> None:
    print(DEV_BANNER, file=out or sys.stderr, flush=True)


def describe_users(users: Mapping[str, DemoUser], issuer_label: str) -> str:
    """The demo users' credentials, for the console (never logged)."""
    lines = []
    for user in users.values():
        lines.append(f"  {user.username}  password: {user.password}")
        if user.totp_secret:
            lines.append(f"      TOTP secret: {user.totp_secret}")
            lines.append(f"      {user.otpauth_uri(issuer_label)}")
        else:
            lines.append("      no TOTP: password only (asking for more gets an error)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepup_demo.idp``: run the provider alone, for one client."""
    parser = argparse.ArgumentParser(
        prog="python -m stepup_demo.idp", description="Development OpenID Provider."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--public-host", default="localhost", help="host name in the issuer URL")
    parser.add_argument("--client-id", default="stepup-gateway")
    parser.add_argument("--client-secret", required=True)
    parser.add_argument("--client-name", default="Demo Bank")
    parser.add_argument("--redirect-uri", action="append", required=True)
    parser.add_argument("--post-logout-redirect-uri", action="append", default=[])
    parser.add_argument(
        "--backchannel-logout-uri", help="where to POST logout tokens (Back-Channel Logout 1.0)"
    )
    parser.add_argument("--users", type=Path, help="users YAML (default: the bundled demo users)")
    parser.add_argument("--passkeys", type=Path, help="JSON file to keep passkeys in")
    parser.add_argument("--i-know-this-is-not-production", action="store_true")
    args = parser.parse_args(argv)
    problem = refuse_public_bind(args.host, args.i_know_this_is_not_production)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print_dev_banner()
    try:
        users = (
            load_users_text(args.users.read_text(encoding="utf-8"), str(args.users))
            if args.users
            else default_users()
        )
        passkeys = PasskeyStore(args.passkeys)
    except (OSError, ValueError, PasskeyError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    issuer = f"http://{args.public_host}:{args.port}"
    client = DemoClient(
        client_id=args.client_id,
        client_secret=args.client_secret,
        client_name=args.client_name,
        redirect_uris=tuple(args.redirect_uri),
        post_logout_redirect_uris=tuple(args.post_logout_redirect_uri),
        backchannel_logout_uri=args.backchannel_logout_uri,
    )
    provider = IdentityProvider(issuer=issuer, clients=[client], users=users, passkeys=passkeys)
    print(f"issuer: {issuer}\ndemo users:\n{describe_users(users, 'stepup demo')}", flush=True)
    web.run_app(provider.app(), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
