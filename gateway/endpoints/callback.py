"""``/callback``: the provider sends the browser back here with the sign-in's answer.

Finds the sign-in transaction (its cookie, and the store's copy taken once),
exchanges the code, verifies the ID token, checks it proves what was asked
(level, freshness, a one-time rule's new sign-in, a binding's approved values),
records the proof in the session and sends the browser on: to where it was, to
``/resume`` for a kept request, or back to the opener for a popup.
"""

from __future__ import annotations

import html
import math
from typing import Any

import jwt
import structlog
from aiohttp import web

from gateway import assurance, responses
from gateway.context import Context
from gateway.errors import BadRequest, MethodNotAllowed, ProviderError
from gateway.oidc.flow import IdTokenError, parse_callback, verified_email
from gateway.oidc.flow import random_token as new_random
from gateway.session.cookies import delete_cookie_kwargs
from gateway.session.model import Login, Proof, Session, new_proof_id
from gateway.session.transaction import Transaction, tx_cookie_name
from gateway.transactional import KeptRequest, client_key, echoed_binding, popup_page

log = structlog.get_logger("gateway")
audit = structlog.get_logger("gateway.audit")

PROVIDER_ERROR_TEXT = {
    "access_denied": "The sign-in was cancelled or refused at the identity provider.",
    "login_required": "The identity provider needs you to sign in again.",
    "interaction_required": "The identity provider needs you to interact with it.",
    "consent_required": "The identity provider needs your consent.",
    "unmet_authentication_requirements": (
        "Your account has no sign-in method strong enough for this action."
    ),
    "temporarily_unavailable": "The identity provider is temporarily unavailable.",
}


async def callback(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("The callback takes GET", reason="callback_method")
    params = request.query
    state = params.get("state", "")
    now = ctx.clock()
    cookie = tx_cookie_name(ctx.tx_base, state, ctx.secure) if state else ""
    tx = (
        ctx.tx_codec.open(
            request.cookies.get(cookie, ""), state, now, ctx.config.session.transaction_ttl_s
        )
        if state
        else None
    )
    take_tx = getattr(ctx.store, "take_tx", None)
    if tx is not None and take_tx is not None and await take_tx(state) is None:
        tx = None  # already used: a replayed callback
    if tx is not None and tx.provider not in ctx.config.provider_names:
        tx = None  # its provider was removed from the config meanwhile
    if tx is None:
        ctx.metrics.challenges.labels("failed", "").inc()
        audit.info("step_up_failure", reason="unknown_transaction")
        return ctx.page_response(
            request,
            400,
            "Sign-in expired",
            [
                "This sign-in link is unknown or has expired. Nothing was changed.",
                "Go back to the page you were on and try again.",
            ],
            error="unknown_transaction",
        )
    # The transaction's provider only: its answer (RFC 9207 iss), its token endpoint,
    # its keys, its levels. A code another provider issued is refused (mix-up).
    client = ctx.providers.get(tx.provider)
    oidc = client.config
    levels = ctx.config.assurance.for_provider(tx.provider).levels
    level = ctx.config.assurance.for_provider(tx.provider).level(tx.level) if tx.level else None
    level_name = level.name if level else ""

    def finish(response: web.StreamResponse) -> web.StreamResponse:
        response.del_cookie(cookie, **delete_cookie_kwargs(ctx.secure))
        response.headers["Cache-Control"] = "no-store"
        return response

    try:
        meta = await client.metadata()
    except ProviderError as exc:
        ctx.metrics.challenges.labels("failed", level_name).inc()
        raise ProviderError("The identity provider cannot be reached.", reason=exc.reason) from exc
    try:
        answer = parse_callback(meta, params, profile=oidc.profile)
    except BadRequest as exc:
        return finish(step_up_failed(ctx, request, tx, level_name, exc.reason))
    if answer.error is not None:
        known = answer.error if answer.error in PROVIDER_ERROR_TEXT else "other"
        ctx.metrics.provider_errors.labels(f"callback_{known}").inc()
        text = PROVIDER_ERROR_TEXT.get(answer.error, "The identity provider refused the sign-in.")
        status = 403 if known in ("access_denied", "unmet_authentication_requirements") else 502
        return finish(
            step_up_failed(
                ctx, request, tx, level_name, f"provider_{known}", status=status, text=text
            )
        )
    assert answer.code is not None  # parse_callback guarantees code when no error
    try:
        tokens = await client.exchange_code(
            code=answer.code, redirect_uri=ctx.redirect_uri, code_verifier=tx.code_verifier
        )
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise ProviderError("no id_token in the token response", reason="no_id_token")
        claims = await client.verify(
            id_token,
            nonce=tx.nonce,
            now=now,
            require_auth_time=tx.requested_max_age_s is not None,
            levels=levels,
        )
    except IdTokenError as exc:
        text = "The sign-in answer could not be verified."
        if exc.reason == "claim_value":
            log.warning("id_token_claim_refused", claim=exc.claim)
            text = (
                "The sign-in answer could not be verified: the identity provider sent "
                "a user identifier, email address or sign-in method that the gateway "
                "cannot pass on (control characters, or too long)."
            )
        reason = f"id_token_{exc.reason}"
        return finish(step_up_failed(ctx, request, tx, level_name, reason, text=text))
    except ProviderError as exc:
        if exc.reason == "invalid_grant":
            # A code used twice (back button, reload) or bound to another
            # transaction's PKCE verifier: the user's doing, not an outage.
            return finish(step_up_failed(ctx, request, tx, level_name, "invalid_grant"))
        if exc.reason == "unmet_authentication_requirements":  # the profile's reading
            reason, text = f"provider_{exc.reason}", PROVIDER_ERROR_TEXT[exc.reason]
            return finish(
                step_up_failed(ctx, request, tx, level_name, reason, status=403, text=text)
            )
        ctx.metrics.challenges.labels("failed", level_name).inc()
        audit.info("step_up_failure", rule=tx.rule, need=level_name, reason=exc.reason)
        raise

    if claims.auth_time is None:
        log.info("auth_time_missing", fallback="iat", iss=claims.iss)
    stated = claims.auth_time if claims.auth_time is not None else claims.iat
    # The skew was allowed for by the token checks; from here on the proof is
    # dated no later than its arrival, and max_age is compared without leeway.
    auth_time = assurance.proven_at(float(stated), now)
    if tx.requested_max_age_s == 0 and stated < math.floor(tx.created_at):
        # max_age=0 (a one-time rule, or a challenge asking for it) wants a new
        # authentication, after this request. auth_time has whole seconds, hence
        # the floor; no leeway beyond it, or an earlier sign-in would pass as new.
        log.info(
            "not_reauthenticated",
            auth_time=stated,
            requested_at=round(tx.created_at, 3),
        )
        return finish(
            step_up_failed(
                ctx,
                request,
                tx,
                level_name,
                "not_reauthenticated",
                status=403,
                text="The identity provider did not ask you to sign in again, and this "
                "action needs a new sign-in each time.",
            )
        )
    approved: str | None = None
    if tx.binding is not None:
        approved = check_binding(ctx, tx, id_token)
        if approved is None:
            return finish(
                step_up_failed(
                    ctx,
                    request,
                    tx,
                    level_name,
                    "binding_mismatch",
                    status=403,
                    text="What the identity provider approved differs from this request.",
                )
            )
    # Named by this step-up, so a one-time rule consumes this proof and no other.
    proof = Proof(acr=claims.acr, amr=claims.amr, auth_time=auth_time, id=new_proof_id())
    # The session keeps only an address the provider vouched for, so X-Auth-Email
    # and the assertion's email are never one the user merely typed.
    email = verified_email(claims, assume_verified=oidc.assume_email_verified)
    if claims.email is not None and email is None:
        log.info("email_not_forwarded", email_verified=claims.email_verified)
    previous_cookie = ctx.session_cookie_value(request)
    loaded = await ctx.load_session(request)
    previous = loaded.for_provider(tx.provider) if loaded is not None else None
    if previous is not None and previous.sub != claims.sub:
        # A different person signed in at the provider: never merge proofs across
        # subjects; start a new session for the new subject.
        log.info("session_subject_changed")
        loaded = previous = None
    client_ip = ctx.client_ip(request)
    signed_in: dict[str, Any] = dict(
        sub=claims.sub,
        email=email,
        name=claims.name,
        provider_sid=claims.sid,
        id_token=id_token,
        now=now,
        ip=client_ip,
        binding=approved,
    )
    if previous is not None:  # the same subject steps up in place
        session = previous.with_proof(proof, **signed_in)
    elif loaded is not None:  # a first sign-in at this provider, beside the others'
        session = loaded.joined(Login.first(proof, provider=tx.provider, **signed_in))
    else:  # anyone else starts a new session
        session = Session.start(proof, provider=tx.provider, **signed_in)
    value = await ctx.store.save(
        session, now, rotate=True, previous=previous_cookie if loaded else None
    )
    proven = assurance.level_of(levels, claims.acr, claims.amr)
    # Did the provider honour max_age? Measured now, with no leeway, as every later
    # request will be: a proof that passes here but is stale on the way back would
    # send the browser round again. max_age 0 was checked above, against the request.
    max_age_s = tx.max_age_s or None
    if level is not None and not assurance.satisfies(levels, [proof], level, max_age_s, now):
        too_old = assurance.satisfies(levels, [proof], level, None, now)
        ctx.metrics.challenges.labels("failed", level_name).inc()
        audit.info(
            "step_up_failure",
            rule=tx.rule,
            need=level_name,
            got=proven.name if proven else None,
            acr=claims.acr,
            amr=list(claims.amr),
            sub=claims.sub,
            reason="too_old" if too_old else "too_weak",
            age_s=round(now - auth_time, 3),
        )
        paragraphs = [
            f"This action needs the level '{level_name}'"
            + (
                f" proven within {responses.format_duration(tx.max_age_s)}"
                if tx.max_age_s is not None
                else ""
            )
            + ".",
            "The identity provider signed you in with "
            + (f"the level '{proven.name}'" if proven else "no recognised level")
            + f" (acr {claims.acr or 'none'}, amr {', '.join(claims.amr) or 'none'}).",
            "You are still signed in as before. Use a stronger method, such as a "
            "passkey or security key, and try again.",
        ]
        response = ctx.page_response(
            request,
            403,
            "A stronger sign-in is needed",
            paragraphs,
            error="insufficient_user_authentication",
            raw_html=popup_script(ctx, tx, ok=False),
        )
        response.set_cookie(ctx.session_cookie, value, **ctx.session_cookie_kwargs())
        return finish(response)
    ctx.metrics.challenges.labels("completed", level_name).inc()
    audit.info(
        "step_up_success",
        rule=tx.rule,
        need=level_name,
        level=proven.name if proven else None,
        acr=claims.acr,
        amr=list(claims.amr),
        sub=claims.sub,
        bound=approved is not None,
        provider=tx.provider,
    )
    location = responses.safe_return_to(tx.return_to)
    if tx.kept is not None:
        location = await rekeep(ctx, tx.kept, session)
    if tx.mode == "popup":
        response = web.Response(
            text=popup_page(ctx.public_origin(), True, {"level": proven.name if proven else None}),
            content_type="text/html",
        )
    else:
        response = web.Response(status=303, headers={"Location": location})
    response.set_cookie(ctx.session_cookie, value, **ctx.session_cookie_kwargs())
    return finish(response)


def step_up_failed(
    ctx: Context,
    request: web.BaseRequest,
    tx: Transaction,
    level_name: str,
    reason: str,
    *,
    status: int = 400,
    text: str = "The sign-in answer could not be verified.",
) -> web.StreamResponse:
    ctx.metrics.challenges.labels("failed", level_name).inc()
    audit.info("step_up_failure", rule=tx.rule, need=level_name, reason=reason)
    signed_in = bool(ctx.session_cookie_value(request))
    too_weak = reason == "provider_unmet_authentication_requirements"
    title = "A stronger sign-in is needed" if too_weak else "Sign-in did not complete"
    paragraphs = [text]
    if too_weak and level_name:
        paragraphs.append(f"This action needs the level '{level_name}'.")
    paragraphs.append(
        "You are still signed in as before; nothing was changed."
        if signed_in
        else "You are not signed in; nothing was changed."
    )
    return ctx.page_response(
        request,
        status,
        title,
        paragraphs,
        error=reason,
        raw_html=f'<p><a href="{html.escape(tx.return_to, quote=True)}">Go back</a> · '
        '<a href="/">Home</a></p>',
    )


def check_binding(ctx: Context, tx: Transaction, id_token: str) -> str | None:
    """The approved binding digest, or None when the provider approved something else.

    The gateway's own record (the digest in the transaction) is what counts; when
    the provider echoes ``authorization_details`` in the ID token it must agree.
    """
    rule = next((r for r in ctx.rules.rules if r.name == tx.rule), None)
    if rule is None or not rule.require.bind:
        return None
    claims = jwt.decode(id_token, options={"verify_signature": False})  # verified above
    echoed = echoed_binding(claims, rule.require.bind)
    if echoed is False:
        log.info("binding_not_echoed", rule=rule.name)
        return tx.binding
    return tx.binding if echoed == tx.binding else None


async def rekeep(ctx: Context, kept_id: str, session: Session) -> str:
    """Bind the kept request to the session that just stepped up; where to resume it."""
    data = await ctx.aux.take_blob(f"kept:{kept_id}")
    ctx.kept_ledger.release(f"kept:{kept_id}")
    kept = KeptRequest.from_dict(data)
    if kept is None or kept.session_id not in (None, session.id):
        return f"{ctx.prefix}/resume?r=expired"
    new_id = new_random()
    bound = kept.with_session(session.id)
    ttl_s = ctx.config.session.transaction_ttl_s
    owner = client_key(session.id, None)
    if ctx.kept_ledger.admit(f"kept:{new_id}", bound.size_bytes, owner, ctx.clock(), ttl_s):
        log.warning("request_not_kept", rule=kept.rule, reason="keep_per_client")
        return f"{ctx.prefix}/resume?r=expired"
    await ctx.aux.put_blob(f"kept:{new_id}", bound.to_dict(), ttl_s)
    return f"{ctx.prefix}/resume?r={new_id}"


def popup_script(ctx: Context, tx: Transaction, *, ok: bool) -> str:
    if tx.mode != "popup":
        return ""
    page = popup_page(ctx.public_origin(), ok, {"level": None})
    return page[page.index("<script>") : page.index("</script>") + len("</script>")]
