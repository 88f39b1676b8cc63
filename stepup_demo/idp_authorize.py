"""The development provider's authorization endpoint, and the end of every sign-in.

``/authorize`` reads the request (authlib checks client, redirect URI and PKCE;
:mod:`stepup_demo.factors` and :mod:`stepup_demo.approvals` read ``acr_values``,
``claims``, ``max_age`` and what to approve), then signs the user in from the
provider session, answers with an error, or starts a sign-in
(:mod:`stepup_demo.idp_sign_in`). When a sign-in is over, :meth:`_finish` sends the
browser back to the app with a code or the error.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import InvalidRequestError
from authlib.oidc.core.errors import LoginRequiredError

from stepup_demo import pages
from stepup_demo.approvals import Approval, ApprovalError, approval_from_request
from stepup_demo.factors import (
    Authentication,
    Decision,
    DemoUser,
    RequestError,
    Step,
    parse_acr_request,
)
from stepup_demo.idp_core import BROWSER_COOKIE, ProviderCore, SignIn, random_id
from stepup_demo.idp_http import html_response, see_other
from stepup_demo.oauth import InvalidAuthorizationDetails, UnmetAuthenticationRequirements
from stepup_demo.oauth_http import (
    AiohttpOAuth2Request,
    OAuthResponse,
    read_request,
    replayed_request,
)
from stepup_demo.oauth_models import GrantedUser
from stepup_demo.provider_session import ProviderSession

log = structlog.get_logger("stepup_demo.idp")


class AuthorizationEndpoint(ProviderCore):
    """``/authorize``, and sending the browser back to the app with a code or an error."""

    async def handle_authorize(self, request: web.Request) -> web.StreamResponse:
        data = await read_request(request, self.issuer)
        browser_id = request.cookies.get(BROWSER_COOKIE) or random_id()
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
            id=random_id(),
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
            response = see_other(f"/login/{sign_in.id}")
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
        return html_response(
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


def _parse_max_age(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise RequestError("'max_age' must be a number of seconds")
    return int(raw)
