"""Challenges: what the gateway does when a request needs a (stronger) sign-in.

An API client gets a 401 with an RFC 9470 ``WWW-Authenticate`` challenge; a
browser is sent to the provider (:func:`start_round_trip`: a sealed sign-in
transaction in a cookie, PKCE, the level's ``acr_values``). A form a browser
sent is refused when it came from another site, and otherwise may be kept
(:func:`keep`, within step_up.keep_budget and keep_per_client) to be replayed
by ``/resume`` after the sign-in. An upstream may ask for a step-up itself, with
an RFC 9470 401 (:func:`upstream_step_up`).
"""

from __future__ import annotations

import json

import aiohttp
import structlog
from aiohttp import web

from gateway import assurance, logs, responses
from gateway.body import RequestBody
from gateway.context import Context
from gateway.decision import Challenge, log_step_up_needed
from gateway.errors import BadRequest, Busy, Forbidden, ProviderError, ProviderUnavailable
from gateway.fields import binding_digest, binding_values
from gateway.metrics import Metrics
from gateway.model import Level, Rule
from gateway.oidc.flow import authorization_url, new_pkce
from gateway.oidc.flow import random_token as new_random
from gateway.proxy import UpstreamIntercepted
from gateway.session.cookies import delete_cookie_kwargs, set_cookie_kwargs
from gateway.session.model import Session
from gateway.session.transaction import (
    Transaction,
    bounded_return_to,
    cookie_pair_bytes,
    tx_cookie_name,
    tx_cookies_to_drop,
)
from gateway.tokens import challenges
from gateway.transactional import (
    KeptRequest,
    authorization_details,
    binding_message,
    client_key,
    is_form_post,
    kept_size_bytes,
    level_for_acr_values,
    max_age_of,
    parse_bearer_challenge,
    same_origin_refusal,
)

log = structlog.get_logger("gateway")
audit = structlog.get_logger("gateway.audit")

# Several tabs may each have a sign-in in flight; beyond this, the oldest is dropped
# so a page that loops cannot grow the Cookie header without bound.
MAX_TRANSACTIONS_IN_FLIGHT = 5
# Before sending a browser to the provider: is it there? A healthy provider answers its
# discovery document in milliseconds; while it answers, ask again at most every 10 s.
PROVIDER_PROBE_TIMEOUT_S = 2.0
PROVIDER_PROBE_TTL_S = 10.0


class ProviderProbe:
    """Whether the provider answers now (cached briefly), before sending a browser there.

    Metadata and keys come from the cache, so a provider outage would otherwise
    show up as a browser error page at the provider's address instead of a clear
    503 here. Checked at most every PROVIDER_PROBE_TTL_S while it answers.
    """

    def __init__(self) -> None:
        self._ok_until = 0.0

    async def reachable(
        self, http: aiohttp.ClientSession, issuer: str, now: float, metrics: Metrics
    ) -> bool:
        if now < self._ok_until:
            return True
        url = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
        try:
            async with http.get(
                url,
                timeout=aiohttp.ClientTimeout(total=PROVIDER_PROBE_TIMEOUT_S),
                allow_redirects=False,
            ) as resp:
                ok = resp.status < 500
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if ok:
            self._ok_until = now + PROVIDER_PROBE_TTL_S
        else:
            metrics.provider_errors.labels("probe_unreachable").inc()
        return ok


async def challenge(
    ctx: Context,
    request: web.BaseRequest,
    decision: Challenge,
    path_qs: str,
    body: RequestBody | None,
    session: Session | None,
) -> web.StreamResponse:
    rule = decision.rule
    acr_values = assurance.acr_values_for(decision.required)
    log_step_up_needed(decision, decision.max_age_s)
    navigation = responses.is_navigation(request.method, request.headers)
    form = is_form_post(request.method, request.headers)
    if form:
        # A form the browser sent from another site: keeping it and replaying it
        # after a silent sign-in at the provider would complete a CSRF for the
        # other site. Refused, never kept (the same check guards logout).
        refusal = same_origin_refusal(request.headers, ctx.public_origin())
        if refusal is not None:
            audit.info(
                "cross_site_request_refused",
                rule=rule.name,
                method=request.method,
                reason=refusal,
            )
            raise Forbidden(
                "This form was not sent from a page of this site, so it was not kept "
                "and nothing was sent. Open the page on this site and send it again.",
                reason="cross_site_form",
            )
    if not navigation and not form:
        if decision.reason == "no_session":
            # With api: every scheme the client may use (RFC 9110 11.6.1, RFC 9449 7.1).
            api = ctx.config.api
            value = (
                challenges.accepted_schemes(api)
                if api is not None
                else responses.www_authenticate(None, None)
            )
            message = "Sign-in required"
            error = "unauthorized"
        else:
            # A one-time rule needs a new authentication: max_age=0, as the gateway
            # itself asks the provider for browsers.
            max_age_s = 0 if rule.require.once else decision.max_age_s
            value = responses.www_authenticate(decision.required, max_age_s, acr_values)
            message = responses.describe_need(decision.required, max_age_s)
            error = "insufficient_user_authentication"
        return web.Response(
            status=401,
            text=responses.json_error(error, message, logs.request_id()),
            content_type="application/json",
            headers={"WWW-Authenticate": value, "Cache-Control": "no-store"},
        )
    binding: str | None = None
    values: dict[str, str | None] | None = None
    if rule.require.bind:
        assert body is not None
        fields = await body.fields(rule.require.bind)
        values = binding_values(rule.require.bind, fields)
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise BadRequest(
                f"The request must carry exactly one value for: {', '.join(missing)}.",
                reason="binding_field_missing",
            )
        binding = binding_digest(rule.require.bind, fields)
    kept_id: str | None = None
    return_to = path_qs
    if form:
        assert body is not None
        return_to = responses.same_origin_path(request.headers.get("Referer"), ctx.public_origin())
        # Without a session, a form is kept only when its rule makes the step-up
        # about this very request (once: a new sign-in; bind: the user approves
        # its values). Otherwise the browser comes back to the form's page after
        # signing in, and nothing a stranger sends is held.
        if session is not None or rule.require.once or rule.require.bind:
            kept_id = await keep(ctx, request, rule, session, path_qs, body)
        else:
            log.info("request_not_kept", rule=rule.name, reason="no_session")
    try:
        return await start_round_trip(
            ctx,
            request,
            return_to=responses.safe_return_to(return_to),
            rule=rule.name,
            level=decision.required,
            max_age_s=decision.max_age_s,
            kept=kept_id,
            binding=binding,
            binding_values=values,
            fresh=rule.require.once,
            provider=rule.provider,
        )
    except BaseException:
        if kept_id is not None:  # no round trip: nobody can resume it
            await ctx.aux.take_blob(f"kept:{kept_id}")
            ctx.kept_ledger.release(f"kept:{kept_id}")
        raise


async def keep(
    ctx: Context,
    request: web.BaseRequest,
    rule: Rule,
    session: Session | None,
    path_qs: str,
    body: RequestBody,
) -> str:
    """Hold the form across the step-up, within the budget; the id it is kept under.

    Counted against step_up.keep_budget (this process) and keep_per_client (this
    session, or this client address without one) before its body is read; when
    either is spent, 503 with Retry-After, and nothing is held.
    """
    step_up = ctx.config.step_up
    ttl_s = ctx.config.session.transaction_ttl_s
    kept_id = new_random()
    name = f"kept:{kept_id}"
    owner = client_key(session.id if session is not None else None, ctx.client_ip(request))
    # Counted at the size it says it has (a body without Content-Length: at the
    # largest one allowed) before a byte of it is read.
    declared = request.content_length
    largest = step_up.max_body_bytes
    if declared is not None and declared > largest:
        await body.read()  # 413, before anything is counted or held
    estimate = kept_size_bytes(min(largest if declared is None else declared, largest), path_qs)
    now = ctx.clock()
    refused = ctx.kept_ledger.admit(name, estimate, owner, now, ttl_s)
    if refused is not None:
        reason, retry_s = refused
        log.warning(
            "request_not_kept",
            rule=rule.name,
            reason=reason,
            held_bytes=ctx.kept_ledger.total_bytes,
            held=len(ctx.kept_ledger),
        )
        raise Busy(
            "Too many requests are waiting for a sign-in right now, so this one was "
            "not kept and nothing was sent. Try again in a little while.",
            reason=reason,
            retry_after_s=int(retry_s) + 1,
        )
    try:
        data = await body.read()
        kept = KeptRequest(
            method=request.method,
            path_qs=path_qs,
            content_type=body.content_type,
            body=data,
            session_id=session.id if session is not None else None,
            rule=rule.name,
            origin=request.headers.get("Origin"),
            fetch_site=request.headers.get("Sec-Fetch-Site"),
        )
        # The estimate was for the declared (or the largest) body: count what it is.
        ctx.kept_ledger.release(name)
        ctx.kept_ledger.admit(name, kept.size_bytes, owner, now, ttl_s)
        await ctx.aux.put_blob(name, kept.to_dict(), ttl_s)
    except BaseException:
        ctx.kept_ledger.release(name)
        raise
    audit.info("request_kept", rule=rule.name, method=request.method, bytes=len(kept.body))
    return kept_id


async def start_round_trip(
    ctx: Context,
    request: web.BaseRequest,
    *,
    return_to: str,
    rule: str | None,
    level: Level,
    max_age_s: int | None,
    kept: str | None = None,
    binding: str | None = None,
    binding_values: dict[str, str | None] | None = None,
    fresh: bool = False,
    mode: str = "redirect",
    provider: str = "default",
) -> web.StreamResponse:
    client = ctx.providers.get(provider)  # the rule's provider (rules[].provider)
    try:
        meta = await client.metadata()
    except ProviderError as exc:
        ctx.metrics.challenges.labels("failed", level.name).inc()
        raise ProviderUnavailable(
            "The identity provider cannot be reached, so a sign-in cannot start. "
            "Try again shortly.",
            reason=exc.reason,
        ) from exc
    if not await ctx.provider_reachable(provider):
        ctx.metrics.challenges.labels("failed", level.name).inc()
        raise ProviderUnavailable(
            "The identity provider is not answering, so a sign-in cannot start. Try again shortly.",
            reason="provider_unreachable",
        )
    now = ctx.clock()
    verifier, challenge = new_pkce()
    sealed_return_to = bounded_return_to(return_to)
    if sealed_return_to != return_to:
        # A longer URL would make a cookie the browser drops (RFC 6265 6.1), and
        # the sign-in could never finish; the user comes back to its path.
        log.info(
            "return_to_shortened",
            chars=len(return_to),
            kept="path" if sealed_return_to != "/" else "root",
        )
    tx = Transaction(
        state=new_random(),
        nonce=new_random(),
        code_verifier=verifier,
        return_to=sealed_return_to,
        rule=rule,
        level=level.name,
        max_age_s=max_age_s,
        created_at=now,
        mode=mode,
        kept=kept,
        binding=binding,
        fresh=fresh,
        provider=provider,
    )
    extra: dict[str, str] = {}
    if binding_values is not None:
        details_type = ctx.config.step_up.authorization_details_type
        extra["authorization_details"] = json.dumps(
            authorization_details(details_type, binding_values), separators=(",", ":")
        )
        extra["binding_message"] = binding_message(binding_values)
    url = authorization_url(
        meta,
        client.config,
        redirect_uri=ctx.redirect_uri,
        state=tx.state,
        nonce=tx.nonce,
        code_challenge=challenge,
        acr_values=assurance.acr_values_for(level),
        max_age_s=tx.requested_max_age_s,
        extra=extra or None,
    )
    url = await client.push_authorization(url)  # oidc.par: RFC 9126
    response = web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})
    ttl_s = ctx.config.session.transaction_ttl_s
    tx_name = tx_cookie_name(ctx.tx_base, tx.state, ctx.secure)
    tx_value = ctx.tx_codec.seal(tx)
    stale = tx_cookies_to_drop(
        request.cookies,
        ctx.tx_codec,
        base=ctx.tx_base,
        secure=ctx.secure,
        now=now,
        ttl_s=ttl_s,
        max_in_flight=MAX_TRANSACTIONS_IN_FLIGHT,
        new_bytes=cookie_pair_bytes(tx_name, tx_value),
    )
    for name in stale:
        response.del_cookie(name, **delete_cookie_kwargs(ctx.secure))
    put_tx = getattr(ctx.store, "put_tx", None)
    if put_tx is not None:
        # Server-side too: the callback may land on any worker or replica, and a
        # replayed callback finds nothing (taken once, below).
        await put_tx(tx, ttl_s)
    response.set_cookie(tx_name, tx_value, **set_cookie_kwargs(ctx.secure, ttl_s))
    ctx.metrics.challenges.labels("issued", level.name).inc()
    audit.info(
        "step_up_challenge",
        rule=rule,
        need=level.name,
        max_age_s=max_age_s,
        bound=binding is not None,
        kept=kept is not None,
        once=fresh,
        provider=provider,
    )
    return response


async def upstream_step_up(
    ctx: Context,
    request: web.BaseRequest,
    rule: Rule,
    session: Session | None,
    path_qs: str,
    body: RequestBody | None,
    asked: UpstreamIntercepted,
) -> web.StreamResponse:
    """The upstream answered a browser with an RFC 9470 challenge: step up, then replay."""
    value = asked.challenge
    params = parse_bearer_challenge(value) or {}
    levels = ctx.config.assurance.for_provider(rule.provider).levels
    level = level_for_acr_values(levels, params.get("acr_values", ""))
    max_age_s = max_age_of(params)
    if level is None or max_age_s is False:
        # Only levels this config defines can be asked for; pass the challenge on.
        log.warning(
            "upstream_challenge_unknown",
            rule=rule.name,
            acr_values=params.get("acr_values"),
            max_age=params.get("max_age"),
        )
        return web.Response(
            status=401,
            headers={"WWW-Authenticate": value, "Cache-Control": "no-store"},
            text=responses.json_error(
                "insufficient_user_authentication",
                "The application asks for a stronger sign-in.",
                logs.request_id(),
            ),
            content_type="application/json",
        )
    assert max_age_s is not False
    audit.info("upstream_challenge", rule=rule.name, need=level.name, max_age_s=max_age_s)
    decision = Challenge(
        rule,
        level,
        max_age_s,
        "upstream_challenge",
        assurance.highest(levels, session.proofs) if session else None,
    )
    return await challenge(ctx, request, decision, path_qs, body, session)
