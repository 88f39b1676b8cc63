"""The last step of the decision: given a rule, a session and the time, allow, challenge
or deny, and the three answers as values.

Pure: no I/O, the clock is passed in. :mod:`gateway.decision` chooses the rule and
its requirement and ends here; :mod:`gateway.app` acts on the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import assurance
from gateway.model import AssuranceConfig, Level, Rule
from gateway.session.model import Proof, Session


@dataclass(frozen=True, slots=True)
class Allow:
    rule: Rule
    level: Level | None  # the highest level the session holds now (None: no session)
    proof: Proof | None = None  # the proof that met the rule (for one-time rules)


@dataclass(frozen=True, slots=True)
class Challenge:
    """The session is missing or under-assured for ``rule``: run a step-up."""

    rule: Rule
    required: Level
    max_age_s: int | None
    reason: str  # "no_session" | "insufficient_level" | "stale" | "unbound" | "proof_used"
    held: Level | None  # what the session holds now, for messages and logs


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str
    rule: Rule | None = None  # the rule that refused (None: no rule matches)


Decision = Allow | Challenge | Deny


def decide(
    rule: Rule | None,
    session: Session | None,
    assurance_cfg: AssuranceConfig,
    now: float,
    *,
    binding: str | None = None,
) -> Decision:
    """``binding`` is the digest of the request's bound fields, for rules with ``bind``:
    only a proof that approved exactly those values (and meets the level) counts.
    ``max_age`` is compared with no leeway: the clock skew was allowed for when the
    proof's token arrived, and its time clamped then (:func:`assurance.proven_at`).
    """
    if rule is None:
        return Deny(403, "no_rule_matches")
    levels = assurance_cfg.levels
    held = assurance.highest(levels, session.proofs) if session is not None else None
    required_name = rule.require.level
    required = assurance_cfg.level(required_name) if required_name is not None else None
    if required_name is not None and required is None:
        return Deny(403, "unknown_level", rule)  # unreachable after validation; fail closed anyway
    max_age_s = rule.require.max_age_s
    if required is None:
        return Allow(rule, held)
    if session is None:
        return Challenge(rule, required, max_age_s, "no_session", None)
    proofs = assurance.satisfying_proofs(levels, session.proofs, required, max_age_s, now)
    if rule.require.bind:
        approved = {at for digest, at in session.bindings if digest == binding}
        bound = [p for p in proofs if binding is not None and p.auth_time in approved]
        if proofs and not bound:
            return Challenge(rule, required, max_age_s, "unbound", held)
        proofs = bound
    if proofs:
        return Allow(rule, held, proofs[0])
    reason = "stale" if held is not None and held.rank >= required.rank else "insufficient_level"
    return Challenge(rule, required, max_age_s, reason, held)
