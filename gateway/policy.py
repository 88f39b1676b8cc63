"""The access decision: given a rule, a session and the time, allow, challenge or deny.

Pure: no I/O, the clock is passed in. :mod:`gateway.app` acts on the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway import assurance
from gateway.model import AssuranceConfig, Level, Rule
from gateway.session.model import Session


@dataclass(frozen=True, slots=True)
class Allow:
    rule: Rule
    level: Level | None  # the highest level the session holds now (None: no session)


@dataclass(frozen=True, slots=True)
class Challenge:
    """The session is missing or under-assured for ``rule``: run a step-up."""

    rule: Rule
    required: Level
    max_age_s: int | None
    reason: str  # "no_session" | "insufficient_level" | "stale"
    held: Level | None  # what the session holds now, for messages and logs


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str


Decision = Allow | Challenge | Deny


def decide(
    rule: Rule | None,
    session: Session | None,
    assurance_cfg: AssuranceConfig,
    now: float,
) -> Decision:
    if rule is None:
        return Deny(403, "no_rule_matches")
    levels = assurance_cfg.levels
    held = assurance.highest(levels, session.proofs) if session is not None else None
    required_name = rule.require.level
    if required_name is None:
        return Allow(rule, held)
    required = assurance_cfg.level(required_name)
    if required is None:  # config validation makes this unreachable; fail closed anyway
        return Deny(403, "unknown_level")
    max_age_s = rule.require.max_age_s
    if session is None:
        return Challenge(rule, required, max_age_s, "no_session", None)
    if assurance.satisfies(levels, session.proofs, required, max_age_s, now):
        return Allow(rule, held)
    reason = "stale" if held is not None and held.rank >= required.rank else "insufficient_level"
    return Challenge(rule, required, max_age_s, reason, held)
