"""The development provider's state, and the helpers all its endpoints share.

:class:`ProviderCore` holds what :class:`stepup_demo.idp.IdentityProvider` is made
of (users, passkeys, signing key, authlib's server, provider sessions, sign-ins in
progress) and the decisions that read it: the next step of a sign-in, recording a
factor, CSRF tokens, the browser cookie, ending a provider session and telling its
clients. The endpoints are mixins on it: :mod:`stepup_demo.idp_authorize`,
:mod:`stepup_demo.idp_sign_in`, :mod:`stepup_demo.idp_passkeys`, and
:mod:`stepup_demo.idp` puts them together.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from authlib.oidc.rpinitiated import EndSessionRequest
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from stepup_demo import pages
from stepup_demo.approvals import Approval
from stepup_demo.backchannel import BackchannelLogoutSender
from stepup_demo.factors import (
    AcrRequest,
    Authentication,
    Decision,
    DemoUser,
    Factors,
    load_users_text,
    next_step,
)
from stepup_demo.idp_http import html_response
from stepup_demo.oauth import DemoAuthorizationServer
from stepup_demo.oauth_http import AiohttpOAuth2Request
from stepup_demo.oauth_models import ID_TOKEN_ALG, DemoClient, OAuthStore
from stepup_demo.passkeys import PasskeyStore
from stepup_demo.provider_session import LogoutNotifier, ProviderSession

log = structlog.get_logger("stepup_demo.idp")

BROWSER_COOKIE = "demo_idp_browser"
SIGN_IN_TTL_S = 10 * 60  # one sign-in (authorization request -> code), like a code's max life
SESSION_LIFETIME_S = 12 * 60 * 60  # the provider session, as long as a gateway session
MAX_FAILURES_PER_SIGN_IN = 5
MAX_SIGN_INS = 10_000


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


def random_id() -> str:
    return secrets.token_urlsafe(32)


class ProviderCore:
    """The provider's state and shared helpers; the endpoints are mixins on it."""

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
            sign_in.browser_id = random_id()
            session = ProviderSession(
                sid=random_id(), username=user.username, sub=user.sub, created_at=self.clock()
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

    # --- the sign-in in progress, the provider session's end ---

    def _sign_in(self, request: web.Request) -> SignIn | None:
        sign_in = self.sign_ins.get(request.match_info["sign_in"])
        if sign_in is None or self.clock() - sign_in.created_at > SIGN_IN_TTL_S:
            return None
        cookie = request.cookies.get(BROWSER_COOKIE, "")
        if not hmac.compare_digest(cookie.encode(), sign_in.browser_id.encode()):
            return None  # another browser: the sign-in is bound to the one that started it
        return sign_in

    def _expired_page(self) -> web.Response:
        return html_response(
            pages.message_page(
                "This sign-in has expired",
                ["Go back to the app and start again."],
            ),
            status=400,
        )

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
