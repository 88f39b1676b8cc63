"""``/step-up`` and ``/resume``: a step-up a page asks for, and a kept request replayed.

``/step-up`` starts a sign-in for a level (or an RFC 9470 challenge's
``acr_values``) and returns to ``rd``; ``/resume`` replays, once and for the
session it belongs to, a request kept across a step-up, judged again by
:func:`gateway.decision.decide_request`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog
from aiohttp import web

from gateway import logs, responses
from gateway.body import KeptBody
from gateway.challenge import start_round_trip
from gateway.context import Context
from gateway.decision import DECISION_LABEL, Allow, RequestFacts, decide_request, judged_session
from gateway.errors import BadRequest, Forbidden, Gone, MethodNotAllowed
from gateway.transactional import KeptRequest, level_for_acr_values

audit = structlog.get_logger("gateway.audit")


class _KeptReader:
    """:class:`gateway.decision.RequestReader` for a kept request, replayed."""

    __slots__ = ("_body", "_client_ip")

    def __init__(self, body: KeptBody, client_ip: str | None) -> None:
        self._body = body
        self._client_ip = client_ip

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        return await self._body.fields(reading)

    def client_ip(self) -> str | None:
        return self._client_ip


async def step_up(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("The step-up endpoint takes GET", reason="step_up_method")
    provider = request.query.get("provider", "default")  # oidc.providers: whose sign-in
    if provider not in ctx.config.provider_names:
        raise BadRequest("Unknown provider", reason="step_up_provider")
    assurance_cfg = ctx.config.assurance.for_provider(provider)
    if "level" in request.query:
        level = assurance_cfg.level(request.query["level"])
    else:
        # The acr_values of an RFC 9470 challenge, as a script received them.
        levels = assurance_cfg.levels
        level = level_for_acr_values(levels, request.query.get("acr_values", ""))
    if level is None:
        known = ", ".join(lv.name for lv in assurance_cfg.levels)
        raise BadRequest(f"Unknown level (known: {known})", reason="step_up_level")
    max_age_raw = request.query.get("max_age")
    max_age_s: int | None = None
    if max_age_raw is not None:
        if not max_age_raw.isdigit() or len(max_age_raw) > 9:
            raise BadRequest("max_age must be a number of seconds", reason="step_up_max_age")
        max_age_s = int(max_age_raw)
    mode = request.query.get("mode", "redirect")
    if mode not in ("redirect", "popup"):
        raise BadRequest("mode must be redirect or popup", reason="step_up_mode")
    return await start_round_trip(
        ctx,
        request,
        return_to=responses.safe_return_to(request.query.get("rd")),
        rule=None,
        level=level,
        max_age_s=max_age_s,
        mode=mode,
        provider=provider,
    )


async def resume(ctx: Context, request: web.BaseRequest) -> web.StreamResponse:
    """Replay a request kept across a step-up: once, for the session it belongs to."""
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("Resume takes GET", reason="resume_method")
    kept_id = request.query.get("r", "")
    data = await ctx.aux.take_blob(f"kept:{kept_id}") if kept_id else None
    ctx.kept_ledger.release(f"kept:{kept_id}")
    kept = KeptRequest.from_dict(data)
    if kept is None:
        audit.info("kept_request_gone")
        raise Gone(
            "This action was already sent, or waited too long. It was not sent again; "
            "check the result in the application before trying again.",
            reason="kept_request_gone",
        )
    session = await ctx.load_session(request)
    if session is None or kept.session_id != session.id:
        audit.info("kept_request_refused", reason="other_session")
        raise Forbidden("This action belongs to another sign-in.", reason="kept_other_session")
    now = ctx.clock()
    config = ctx.config
    path = kept.path_qs.partition("?")[0]
    host = ctx.judged_host(request, ctx.rules)
    reader = _KeptReader(KeptBody(kept), ctx.client_ip(request))
    facts = RequestFacts(kept.method, host, path, session, reader)
    # Judged on the rule's own requirement, as it always was: its risk engine was
    # asked when the request was first judged.
    decision = await decide_request(
        facts, ctx.rules, config.assurance, now, risk=None, claim_once=ctx.claim_once
    )
    ctx.metrics.requests.labels(
        decision.rule.name if decision.rule else "", DECISION_LABEL[type(decision)]
    ).inc()
    if not isinstance(decision, Allow):
        # Never another round trip from here: that is how loops start.
        audit.info("kept_request_refused", reason=getattr(decision, "reason", "deny"))
        raise Forbidden(
            "The sign-in did not allow this action, so it was not sent.",
            reason="kept_not_allowed",
        )
    audit.info("kept_request_replayed", rule=decision.rule.name, method=kept.method)
    judged = judged_session(session, decision.rule)  # the rule's provider's sign-in
    return await ctx.forwarder.forward(
        request, decision, judged, kept.path_qs, logs.request_id(), kept=kept
    )
