"""``/logout``, ``/logged-out`` and ``/backchannel-logout``: ending sessions.

The browser's sign-out (a confirm page, then a same-origin POST that ends the
session here and at the provider), the page it lands on, and the provider's
back-channel logout (OpenID Connect Back-Channel Logout 1.0).
"""

from __future__ import annotations

import jwt
import structlog
from aiohttp import web

from gateway.context import Context
from gateway.errors import BadRequest, Forbidden, MethodNotAllowed, ProviderError
from gateway.oidc.flow import LOGOUT_TOKEN_MAX_AGE_S, IdTokenError, LogoutClaims, end_session_url
from gateway.session import revocation
from gateway.session.cookies import delete_cookie_kwargs
from gateway.session.model import Login
from gateway.session.stores import CookieStore
from gateway.transactional import same_origin_refusal

audit = structlog.get_logger("gateway.audit")

# A logout token is a few hundred bytes; anything far larger is not one.
MAX_LOGOUT_REQUEST_BYTES = 64 * 1024


async def logout(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    if request.method in ("GET", "HEAD"):
        form = (
            f'<form method="post" action="{ctx.prefix}/logout">'
            '<button type="submit">Sign out</button></form>'
        )
        return ctx.page_response(
            request, 200, "Sign out", ["Sign out of this site?"], raw_html=form, force_html=True
        )
    if request.method != "POST":
        raise MethodNotAllowed("Logout takes GET or POST", reason="logout_method")
    # Only the confirm page above (or another page of this site) may sign out:
    # Origin "null" (a sandboxed frame, a redirect from elsewhere) is another site.
    refusal = same_origin_refusal(request.headers, ctx.public_origin())
    if refusal is not None:
        audit.info("cross_site_request_refused", rule=None, method="POST", reason=refusal)
        raise Forbidden(
            "Sign-out was not asked for by a page of this site; you are still signed in. "
            f"To sign out, open {ctx.prefix}/logout on this site.",
            reason="logout_origin",
        )
    session = await ctx.load_session(request)
    value = ctx.session_cookie_value(request)
    if value:
        await ctx.store.delete(value)
    if session is not None and isinstance(ctx.store, CookieStore):
        await ctx.revoke(session=session)
    ctx.decisions.forget_all()  # nothing this process remembers outlives the sign-out
    location = f"{ctx.config.server.public_url}{ctx.prefix}/logged-out"
    # Several providers: the whole session ends here, and the browser signs out at
    # the provider of the most recent sign-in (one redirect can reach one provider).
    login = max(session.logins(), key=_latest) if session is not None else None
    provider = login.provider if login is not None else "default"
    client = ctx.providers.get(provider) if provider in ctx.config.provider_names else None
    try:
        meta = await client.metadata() if client is not None else None
    except ProviderError:
        meta = None  # sign out here anyway; the provider session stays
    if meta is not None and client is not None:
        location = (
            end_session_url(
                meta,
                client_id=client.config.client_id,
                id_token_hint=login.id_token if login is not None else None,
                post_logout_redirect_uri=location,
            )
            or location
        )
    audit.info("logout", sub=session.sub if session else None, provider=provider)
    response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
    response.del_cookie(ctx.session_cookie, **delete_cookie_kwargs(ctx.secure))
    return response


async def logged_out(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    return ctx.page_response(
        request,
        200,
        "Signed out",
        ["You are signed out."],
        raw_html='<p><a href="/">Sign in again</a></p>',
        force_html=True,
    )


async def backchannel_logout(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    """OpenID Connect Back-Channel Logout 1.0: the provider ends sessions here.

    Answers per section 2.8: 200 on success, 400 with a JSON error otherwise,
    never cached. Every session of the token's ``sid`` or ``sub`` is deleted
    from the (server-side) store, so every worker and replica sees it.
    """
    no_store = {"Cache-Control": "no-store"}
    if request.method != "POST":
        raise MethodNotAllowed("Back-channel logout takes POST", reason="bcl_method")
    delete_by = getattr(ctx.store, "delete_by", None)
    several = bool(ctx.config.providers)
    session_cfg = ctx.config.session
    if (
        (delete_by is None or several)
        and session_cfg.redis_url is None
        and ctx.config.server.workers > 1
    ):
        # Cookie sessions are refused by revocation records; kept in one worker's
        # memory they would hold in that worker only. Say so rather than 200.
        return web.json_response(
            {
                "error": "not_supported",
                "error_description": "back-channel logout with the cookie store and "
                "several workers needs session.redis_url",
            },
            status=501,
            headers=no_store,
        )
    if (request.content_length or 0) > MAX_LOGOUT_REQUEST_BYTES:
        raise BadRequest("The logout request is too large.", reason="bcl_too_large")
    form = await request.post()
    token = form.get("logout_token")
    if not isinstance(token, str):
        return web.json_response(
            {"error": "invalid_request", "error_description": "logout_token is missing"},
            status=400,
            headers=no_store,
        )
    now = ctx.clock()
    try:
        provider, claims = await _verified_logout(ctx, token, now)
        # A jti is unique at its issuer: another provider may use the same value.
        first_use = await ctx.aux.claim_once(
            f"jti:{ctx.config.oidc_for(provider).issuer}:{claims.jti}",
            LOGOUT_TOKEN_MAX_AGE_S + 2 * ctx.config.oidc.clock_skew_s,
        )
    except IdTokenError as exc:
        audit.info("backchannel_logout_refused", reason=exc.reason)
        return web.json_response(
            {"error": "invalid_request", "error_description": f"logout_token: {exc.reason}"},
            status=400,
            headers=no_store,
        )
    if not first_use:
        audit.info("backchannel_logout_refused", reason="jti_replayed")
        return web.json_response(
            {"error": "invalid_request", "error_description": "logout_token replayed"},
            status=400,
            headers=no_store,
        )
    if several:
        # That provider's sign-ins only: a session keeps the other providers' proofs.
        await revocation.revoke_logins(
            ctx.aux,
            now,
            session_cfg.lifetime_s,
            provider=provider,
            sub=claims.sub,
            provider_sid=claims.sid,
        )
        deleted = None
    elif delete_by is not None:
        deleted = await delete_by(sub=claims.sub, provider_sid=claims.sid)
    else:
        await ctx.revoke(sub=claims.sub, provider_sid=claims.sid)
        deleted = None  # cookie sessions: unknown; every one of them is refused now
    ctx.decisions.forget_all()  # here at once; other workers within server.decision_memo
    audit.info(
        "backchannel_logout",
        sub=claims.sub,
        sid_given=claims.sid is not None,
        sessions_deleted=deleted,
        provider=provider,
    )
    return web.Response(status=200, headers=no_store)


async def _verified_logout(ctx: Context, token: str, now: float) -> tuple[str, LogoutClaims]:
    """The logout token's provider (by its ``iss``) and claims, verified with that
    provider's keys and client id as audience; raises IdTokenError."""
    try:
        issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        raise IdTokenError("malformed") from None
    candidates = ctx.providers.named_by_issuer(issuer) if isinstance(issuer, str) else []
    if not candidates:
        raise IdTokenError("iss")  # no provider of this gateway
    failure: IdTokenError | None = None
    for name, client in candidates:  # one issuer, several clients: the audience decides
        try:
            return name, await client.verify_logout(token, now=now)
        except IdTokenError as exc:
            failure = failure or exc
    assert failure is not None
    raise failure


def _latest(login: Login) -> float:
    return max((proof.auth_time for proof in login.proofs), default=login.auth_time)
