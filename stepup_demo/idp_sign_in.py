"""The development provider's sign-in pages: password, one-time code, cancel.

Each page shows what the app asked for and why (:meth:`_reason`); each form post is
checked (live sign-in bound to this browser, CSRF token, the step that is due) before
the factor is. One-time codes are throttled per user across sign-ins. The passkey
steps are :mod:`stepup_demo.idp_passkeys`.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from aiohttp import web
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import AccessDeniedError

from stepup_demo import pages
from stepup_demo.factors import (
    ACR_MFA,
    ACR_PASSWORD,
    ACR_PHISHING_RESISTANT,
    ACR_STRENGTH,
    ACR_WORDS,
    AMR_OTP,
    AMR_PASSWORD,
    Authentication,
    Decision,
    Step,
    choose_acr,
    match_totp,
)
from stepup_demo.idp_authorize import AuthorizationEndpoint
from stepup_demo.idp_core import MAX_FAILURES_PER_SIGN_IN, SignIn
from stepup_demo.idp_http import html_response, see_other

log = structlog.get_logger("stepup_demo.idp")

# Per user, across sign-ins: a password alone must not allow guessing one-time codes
# (RFC 4226 7.3 asks for throttling; NIST SP 800-63B-4 3.2.2 for rate limiting).
TOTP_LOCKOUT_FAILURES = 5
TOTP_LOCKOUT_S = 5 * 60


class SignInPages(AuthorizationEndpoint):
    """The sign-in pages and their form posts."""

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
        response = html_response(body)
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
            return html_response(
                pages.message_page("Form expired", ["Reload the page."]), status=403
            )
        decision = self._decide(sign_in)
        if sign_in.failures >= MAX_FAILURES_PER_SIGN_IN:
            del self.sign_ins[sign_in.id]
            return html_response(
                pages.message_page("Too many attempts", ["Go back to the app and start again."]),
                status=429,
            )
        if decision.step is not expected:
            return see_other(f"/login/{sign_in.id}")  # a stale page: show the current step
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
        response = see_other(f"/login/{sign_in.id}")
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
        response = see_other(f"/login/{sign_in.id}")
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
            return html_response(
                pages.message_page("Form expired", ["Reload the page."]), status=403
            )
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


def _duration(seconds: int) -> str:
    if seconds % 60 == 0 and seconds >= 60:
        minutes = seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"
