"""The development provider's passkey ceremonies: sign in with one, or create one.

JSON endpoints driven by ``static/passkey.js``: options (a fresh one-use challenge)
then verify, for signing in and for creating a passkey (only after a one-time code
in the same sign-in). The WebAuthn checks themselves are :mod:`stepup_demo.passkeys`.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from stepup_demo.factors import ACR_PHISHING_RESISTANT, Authentication, DemoUser, Step
from stepup_demo.idp_core import MAX_FAILURES_PER_SIGN_IN, PendingChallenge, ProviderCore, SignIn
from stepup_demo.idp_http import json_error, json_text
from stepup_demo.passkeys import (
    CEREMONY_TIMEOUT_MS,
    PasskeyError,
    authentication_options,
    new_challenge,
    registration_options,
    verify_authentication,
    verify_registration,
)

log = structlog.get_logger("stepup_demo.idp")

CHALLENGE_TTL_S = CEREMONY_TIMEOUT_MS // 1000
RP_NAME = "Stepup demo identity provider"


class PasskeyCeremonies(ProviderCore):
    """The passkey endpoints under ``/login/{sign_in}/``."""

    async def _json_step(
        self, request: web.Request, expected: Step
    ) -> tuple[SignIn, dict[str, Any]] | web.StreamResponse:
        sign_in = self._sign_in(request)
        if sign_in is None:
            return json_error(400, "This sign-in has expired: go back to the app and start again.")
        if request.content_type != "application/json":
            return json_error(415, "Send JSON.")
        if not self._csrf_ok(sign_in.browser_id, sign_in.id, request.headers.get("X-CSRF-Token")):
            return json_error(403, "The page is out of date: reload it.")
        try:
            body = await request.json()
        except ValueError:
            return json_error(400, "The request body is not JSON.")
        if not isinstance(body, dict):
            return json_error(400, "The request body must be a JSON object.")
        if sign_in.failures >= MAX_FAILURES_PER_SIGN_IN:
            del self.sign_ins[sign_in.id]
            return json_error(429, "Too many attempts: go back to the app and start again.")
        step = self._decide(sign_in).step
        if step is not expected:
            if expected is Step.ENROL_PASSKEY and step in (Step.PASSWORD, Step.TOTP):
                return json_error(
                    403, "Confirm a one-time code in this sign-in before creating a passkey."
                )
            return json_error(409, "This step is not due: reload the page.")
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
        return json_text(options)

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
            return json_error(400, "Start again: press the button once more.")
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
            return json_error(400, str(exc))
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
        return json_text(options)

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
            return json_error(400, str(exc))
        if self.passkeys.get(passkey.credential_id) is not None:
            return json_error(400, "That passkey is already registered.")
        self.passkeys.add(passkey)
        log.info("idp_passkey_enrolled", user=user.username, amr=passkey.amr)
        return web.json_response({"next": f"/login/{sign_in.id}"})
