"""The decision unit: request facts -> rule -> requirement -> ``Allow | Challenge | Deny``.

The one place a request is judged. The proxy (:mod:`gateway.app`), the replay of
a kept request (:mod:`gateway.endpoints.stepup`) and ``explain``
(:mod:`gateway.cli`) all call :func:`decide_request`; the proxy's common case
(the first matching rule reads nothing and asks no one) takes the shortcut
:func:`decide_plain`, which ends in the same :func:`gateway.policy.decide`.

No aiohttp objects and no I/O here. The three steps that need some are passed
in: the body's fields and the client's address are read through a
:class:`RequestReader` (only when a rule needs them), the risk engine is a
:class:`RiskEngine` callable whose answer becomes part of the requirement, and a
one-time rule's proof is spent through a :class:`ClaimOnce` callable (atomic in
the store).

    facts ── choose_rule ──> rule ── risk engine ──> requirement
          ── policy.decide (session, now, binding) ──> decision ── once? ──> decision
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway import assurance
from gateway.conditions import Facts
from gateway.errors import GatewayError
from gateway.fields import binding_digest, binding_values
from gateway.model import AssuranceConfig, Rule
from gateway.policy import Allow, Challenge, Decision, Deny, decide
from gateway.risk_policy import RiskFacts, RiskOutcome, effective_requirement
from gateway.rules import RuleSet
from gateway.session.model import Session

log = structlog.get_logger("gateway")  # the name the proxy's lines have

__all__ = [
    "DECISION_LABEL",
    "SITE_PATHS",
    "SITE_PATH_METHODS",
    "TOKEN_NOT_ACCEPTED",
    "Allow",
    "Challenge",
    "ClaimOnce",
    "Decision",
    "Deny",
    "RequestFacts",
    "RequestReader",
    "RiskEngine",
    "choose_rule",
    "credential_refused",
    "decide_plain",
    "decide_request",
    "proof_claim_name",
    "site_paths",
]


class RequestReader(Protocol):
    """What is read from a request only when a rule needs it.

    Either may refuse the request (a body too large to hold: 413; forwarded
    headers that disagree: 400; a field read twice: 400), so neither is read for a
    rule that does not ask.
    """

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        """Form, JSON or multipart fields, then the query's (:mod:`gateway.fields`).

        ``reading`` names the fields the rule reads: raises
        :class:`gateway.errors.BadRequest` when one of them is given twice or read
        differently by upstreams (it could be judged as one value and acted on as
        another).
        """
        ...

    def client_ip(self) -> str | None:
        """The client's address, as :func:`gateway.headers.client_chain` vouches for it."""
        ...


class RiskEngine(Protocol):
    """Asks ``rule``'s risk engine about ``facts`` (see :mod:`gateway.risk`)."""

    async def __call__(
        self, rule: Rule, facts: RiskFacts, session_id: str | None, now: float
    ) -> RiskOutcome: ...


class ClaimOnce(Protocol):
    """Claims ``name`` once, atomically: True the first time, False ever after.

    ``rule`` and ``sub`` say whose proof it is, for the audit log.
    """

    async def __call__(self, name: str, *, rule: str, sub: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a request is judged on: values, and a reader for its fields and address.

    ``host`` is canonical (:func:`gateway.paths.canonical_host`), ``path``
    normalised (:func:`gateway.paths.normalize_path`); ``session`` None: none (or
    none that could be loaded). ``by_token``: ``session`` is the request's access
    token's (:mod:`gateway.tokens`), not a cookie's.
    """

    method: str
    host: str | None
    path: str
    session: Session | None
    read: RequestReader
    by_token: bool = False


# Paths at the site's root the gateway answers itself for GET and HEAD, so that a
# browser's icon fetch or a crawler never starts a sign-in; a rule that names one
# of them (exactly, as its path) hands it to the rules like any other path.
SITE_PATHS = frozenset({"/favicon.ico", "/robots.txt"})
SITE_PATH_METHODS = frozenset({"GET", "HEAD"})


def site_paths(rules: Iterable[Rule]) -> frozenset[str]:
    """The :data:`SITE_PATHS` the gateway answers under these rules."""
    return SITE_PATHS - {rule.match.path for rule in rules}


# The ``decision`` label of the gateway_requests_total metric.
DECISION_LABEL: dict[type, str] = {Allow: "allow", Challenge: "challenge", Deny: "deny"}

# The Deny reason for an access token on a ``credentials: session`` rule; the token
# gate answers it with its RFC 6750 401 (gateway.tokens.gate.TokenGate.refusal).
TOKEN_NOT_ACCEPTED = "token_not_accepted"


def credential_refused(rule: Rule | None, by_token: bool) -> Deny | None:
    """``rules[].credentials: session``: an access token is refused there."""
    if by_token and rule is not None and rule.credentials == "session":
        return Deny(401, TOKEN_NOT_ACCEPTED, rule)
    return None


def log_step_up_needed(decision: Challenge, max_age_s: int | None, **extra: object) -> None:
    """The ``step_up_needed`` line, alike wherever a challenge is answered."""
    log.info(
        "step_up_needed",
        rule=decision.rule.name,
        need=decision.required.name,
        have=decision.held.name if decision.held else None,
        reason=decision.reason,
        max_age_s=max_age_s,
        **extra,
    )


def judged_session(session: Session | None, rule: Rule | None) -> Session | None:
    """``session`` as its sign-in at ``rule``'s provider (``rules[].provider``); None when
    it holds none there: another provider's proof never counts, whatever its level."""
    if session is None or rule is None:
        return session
    return session.for_provider(rule.provider)


def _cookie_ignored(rule: Rule | None, by_token: bool) -> bool:
    # rules[].credentials: token -- a cookie's session is no credential there (and a
    # store that is down does not matter): judged as no session at all.
    return not by_token and rule is not None and rule.credentials == "token"


def decide_plain(
    rule: Rule | None,
    session: Session | None,
    assurance_cfg: AssuranceConfig,
    now: float,
    *,
    session_error: GatewayError | None = None,
    by_token: bool = False,
) -> Decision | None:
    """The decision when ``rule``, the first that matches, needs nothing but the session.

    None when it has ``when``, ``risk``, ``bind`` or ``once``: then
    :func:`decide_request` decides. No coroutine: this is every plain request's path.
    ``by_token``: as :attr:`RequestFacts.by_token`.
    """
    if rule is not None:
        require = rule.require
        if rule.when is not None or rule.risk is not None or require.bind or require.once:
            return None
        if rule.credentials != "any":
            refused = credential_refused(rule, by_token)
            if refused is not None:
                return refused
            if _cookie_ignored(rule, by_token):
                session, session_error = None, None
        session = judged_session(session, rule)
        assurance_cfg = assurance_cfg.for_provider(rule.provider)
    _session_needed(rule, session_error)
    return decide(rule, session, assurance_cfg, now)


async def decide_request(
    facts: RequestFacts,
    rules: RuleSet,
    assurance_cfg: AssuranceConfig,
    now: float,
    *,
    risk: RiskEngine | None,
    claim_once: ClaimOnce,
    session_error: GatewayError | None = None,
    skipped: list[Rule] | None = None,
    log_unknown: bool = True,
) -> Decision:
    """Judge a request: the rule that applies, what it requires now, and the answer.

    ``session_error`` is why the session could not be loaded (the store is down):
    raised when the chosen rule needs a session, ignored otherwise. ``risk`` None
    leaves risk engines unasked (``explain`` reports them instead). ``skipped``
    collects the rules passed over because their ``when`` did not hold;
    ``log_unknown`` False leaves out the ``when_unknown`` line (``explain`` shows
    the unknowns in its answer).
    """
    rule = await choose_rule(facts, rules, now, skipped=skipped, log_unknown=log_unknown)
    refused = credential_refused(rule, facts.by_token)
    if refused is not None:
        return refused
    if _cookie_ignored(rule, facts.by_token):
        facts, session_error = dataclasses.replace(facts, session=None), None
    _session_needed(rule, session_error)
    if rule is not None:
        facts = dataclasses.replace(facts, session=judged_session(facts.session, rule))
        assurance_cfg = assurance_cfg.for_provider(rule.provider)
    session = facts.session
    judged = rule
    if rule is not None and rule.risk is not None and risk is not None:
        judged = await _with_risk(facts, rule, assurance_cfg, now, risk)
        if judged is None:
            return Deny(403, "risk_engine_denied", rule)
    binding = None
    if judged is not None and judged.require.bind:
        bound = await facts.read.fields(judged.require.bind)
        binding = binding_digest(judged.require.bind, bound)
    decision = decide(judged, session, assurance_cfg, now, binding=binding)
    if isinstance(decision, Allow) and judged is not None and judged.require.once:
        return await _spend_proof(decision, session, assurance_cfg, claim_once)
    return decision


async def choose_rule(
    facts: RequestFacts,
    rules: RuleSet,
    now: float,
    *,
    skipped: list[Rule] | None = None,
    log_unknown: bool = True,
) -> Rule | None:
    """The first matching rule whose ``when`` holds (or that has none).

    A ``when`` that cannot be evaluated counts as true: the stricter rule applies
    (fail closed), and a ``when_unknown`` line names what was unknown (never values).
    """
    for candidate in rules.candidates_for(facts.method, facts.host, facts.path):
        condition = candidate.when
        if condition is None:
            return candidate
        session = judged_session(facts.session, candidate)
        client_ip = facts.read.client_ip()  # before the body: a 400 outranks a 413
        reading = condition.fields()
        seen = Facts(
            fields=await facts.read.fields(reading) if reading else {},
            client_ip=client_ip,
            proven_ip=session.ip if session is not None else None,
            auth_age_s=now - session.auth_time if session is not None else None,
        )
        verdict = condition.evaluate(seen)
        if verdict is None and log_unknown:  # fail closed: the stricter rule applies; say why
            unknown = sorted(condition.unknowns(seen))
            log.info("when_unknown", rule=candidate.name, unknown=unknown)
        if verdict is not False:
            return candidate
        if skipped is not None:
            skipped.append(candidate)
    return None


def proof_claim_name(session: Session, decision: Allow) -> str | None:
    """The one-time name that spends the proof ``decision`` rests on (None: no proof)."""
    proof = decision.proof
    if proof is None:
        return None
    # The step-up that made the proof names it; proofs saved before ids existed
    # fall back to what they are made of.
    made_by = proof.id if proof.id is not None else f"{proof.acr}:{proof.auth_time}"
    return f"proof:{session.id}:{made_by}"


def _session_needed(rule: Rule | None, session_error: GatewayError | None) -> None:
    # Only requests that need a session fail (closed) when it cannot be loaded;
    # routes that need no sign-in keep working while the store is down.
    if session_error is not None and (rule is None or rule.require.level is not None):
        raise session_error


async def _with_risk(
    facts: RequestFacts,
    rule: Rule,
    assurance_cfg: AssuranceConfig,
    now: float,
    engine: RiskEngine,
) -> Rule | None:
    """``rule`` with what its risk engine adds; None when the engine says deny."""
    session = facts.session
    wanted = set(rule.require.bind) | (set(rule.when.fields()) if rule.when else set())
    fields = binding_values(sorted(wanted), await facts.read.fields(wanted)) if wanted else {}
    held = assurance.highest(assurance_cfg.levels, session.proofs) if session else None
    risk_facts = RiskFacts(
        subject=session.sub if session else None,
        rule=rule.name,
        method=facts.method,
        path=facts.path,
        client_ip=facts.read.client_ip(),
        fields=fields,
        level=held.name if held else None,
        level_age_s=now - session.auth_time if session else None,
    )
    outcome = await engine(rule, risk_facts, session.id if session else None, now)
    requirement = effective_requirement(rule.require, outcome, assurance_cfg)
    return None if requirement is None else dataclasses.replace(rule, require=requirement)


async def _spend_proof(
    decision: Allow,
    session: Session | None,
    assurance_cfg: AssuranceConfig,
    claim_once: ClaimOnce,
) -> Allow | Challenge:
    """A one-time rule: the proof is used up by this request, atomically."""
    name = proof_claim_name(session, decision) if session is not None else None
    rule = decision.rule
    if session is None or name is None or await claim_once(name, rule=rule.name, sub=session.sub):
        return decision
    required = assurance_cfg.level(rule.require.level or "")
    assert required is not None  # a once rule always names a level (config check)
    return Challenge(rule, required, rule.require.max_age_s, "proof_used", decision.level)
