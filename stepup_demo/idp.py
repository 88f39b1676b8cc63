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
:mod:`stepup_demo.passkeys`. The provider's state is :mod:`stepup_demo.idp_core`, and
its endpoints are mixins on it: ``/authorize`` (:mod:`stepup_demo.idp_authorize`),
the sign-in pages (:mod:`stepup_demo.idp_sign_in`) and the passkey ceremonies
(:mod:`stepup_demo.idp_passkeys`). This module puts them together
(:class:`IdentityProvider`, its routes, metadata, token, UserInfo and end-session
endpoints) and runs the provider alone: ``python -m stepup_demo.idp``.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import structlog
from aiohttp import web
from authlib.oauth2 import OAuth2Error
from joserfc.jwk import KeySet

from stepup_demo import pages
from stepup_demo.approvals import SUPPORTED_TYPES
from stepup_demo.factors import ACR_STRENGTH, DemoUser, load_users_text
from stepup_demo.idp_core import BROWSER_COOKIE, default_users
from stepup_demo.idp_http import html_response, security_headers
from stepup_demo.idp_passkeys import PasskeyCeremonies
from stepup_demo.idp_sign_in import SignInPages
from stepup_demo.oauth_http import OAuthResponse, read_request
from stepup_demo.oauth_models import CLIENT_AUTH_METHODS, ID_TOKEN_ALG, SCOPES_SUPPORTED, DemoClient
from stepup_demo.passkeys import PasskeyError, PasskeyStore
from stepup_demo.provider_session import ProviderSession

log = structlog.get_logger("stepup_demo.idp")

CLAIMS_SUPPORTED = (
    *("sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "sid"),
    *("name", "email", "email_verified"),
)
STATIC_FILES = {"passkey.js": "text/javascript", "demo.css": "text/css"}

DEV_BANNER = """\
############################################################################
#  DEVELOPMENT ONLY: demo identity provider with published passwords and   #
#  TOTP secrets. It is not secure. Never expose it to a network or use it  #
#  for real accounts.                                                      #
############################################################################"""


class IdentityProvider(SignInPages, PasskeyCeremonies):
    """The development OpenID Provider; :meth:`app` is its aiohttp application."""

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
        app = web.Application(middlewares=[security_headers])
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
                return html_response(
                    pages.message_page("Form expired", ["Reload the page."]), status=403
                )
            confirmed = True
        try:
            oauth_request = self.server.create_oauth2_request(data)
            oauth_request.logout_confirmed = confirmed
            oauth_request.ended_session = None
            end_request = self.server.validate_endpoint_request("end_session", oauth_request)
        except OAuth2Error as error:
            # RP-Initiated Logout 1.0 §4: on errors, no post-logout redirection.
            return html_response(
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
            return html_response(
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
            response = html_response(
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
