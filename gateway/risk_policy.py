"""What a risk engine is told, and what its answer makes of a rule's requirement.

Pure: no I/O. :mod:`gateway.risk` asks the engine (HTTP, cache) and documents
the exchange; :mod:`gateway.decision` applies :func:`effective_requirement`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.model import AssuranceConfig, Requirement, RiskConfig

# The freshness on_error: step_up asks for when the rule names none. Five minutes is
# PSD2 SCA's window (RTS Art. 4(3)(d)) and long enough for any sign-in to finish.
RISK_ERROR_MAX_AGE_S = 5 * 60
# The longest max_age an answer may carry; longer than a session's lifetime is meaningless.
MAX_ANSWER_MAX_AGE_S = 24 * 60 * 60

ALLOW = "allow"
DENY = "deny"
REQUIRE = "require"


@dataclass(frozen=True, slots=True)
class RiskFacts:
    """What the engine is told about a request."""

    subject: str | None
    rule: str
    method: str
    path: str
    client_ip: str | None
    fields: Mapping[str, str | None]  # bound and condition fields only, as text
    level: str | None  # the highest level the session holds now
    level_age_s: float | None  # seconds since that level was proven

    def to_json(self) -> dict[str, object]:
        age = self.level_age_s
        return {
            "subject": self.subject,
            "rule": self.rule,
            "method": self.method,
            "path": self.path,
            "client_ip": self.client_ip,
            "fields": dict(self.fields),
            "level": self.level,
            "level_age_s": None if age is None or not math.isfinite(age) else max(0, int(age)),
        }


@dataclass(frozen=True, slots=True)
class RiskOutcome:
    """What the engine (or its failure) says the request needs.

    ``decision`` is ``require`` (with ``level`` and maybe ``max_age_s``), ``allow``
    or ``deny``. ``reason`` is ``answered`` or ``cached``, or why on_error applied:
    ``timeout``, ``unreachable``, ``status_NNN``, ``bad_json``, ``bad_answer``,
    ``unknown_level``, ``too_large``.
    """

    decision: str
    level: str | None = None
    max_age_s: int | None = None
    reason: str = "answered"

    @property
    def failed(self) -> bool:
        return self.reason not in ("answered", "cached")


def on_error_outcome(
    risk: RiskConfig, assurance: AssuranceConfig, rule_max_age_s: int | None, reason: str
) -> RiskOutcome:
    """The outcome when the engine cannot be asked or its answer cannot be used."""
    if risk.on_error == DENY or not assurance.levels:
        return RiskOutcome(DENY, reason=reason)
    strongest = assurance.levels[-1]
    max_age_s = rule_max_age_s if rule_max_age_s is not None else RISK_ERROR_MAX_AGE_S
    return RiskOutcome(REQUIRE, strongest.name, max_age_s, reason)


def outcome_from_answer(
    status: int,
    body: bytes,
    *,
    risk: RiskConfig,
    assurance: AssuranceConfig,
    rule_max_age_s: int | None,
) -> RiskOutcome:
    """Decide from the engine's HTTP answer; anything unusable gives the on_error outcome."""
    failed = functools.partial(on_error_outcome, risk, assurance, rule_max_age_s)

    if status != 200:
        return failed(f"status_{status}")
    try:
        answer = json.loads(body.decode("utf-8"), parse_constant=_refuse)
    except (ValueError, RecursionError):
        return failed("bad_json")
    if not isinstance(answer, dict):
        return failed("bad_answer")
    required = answer.get("require")
    if not isinstance(required, str):
        return failed("bad_answer")
    if required in (ALLOW, DENY):
        return RiskOutcome(required)
    if assurance.level(required) is None:
        return failed("unknown_level")
    max_age = answer.get("max_age")
    if max_age is None:
        return RiskOutcome(REQUIRE, required)
    # 0 could never be met (see the module docstring); bool is an int in Python.
    if isinstance(max_age, bool) or not isinstance(max_age, int):
        return failed("bad_answer")
    if not 1 <= max_age <= MAX_ANSWER_MAX_AGE_S:
        return failed("bad_answer")
    return RiskOutcome(REQUIRE, required, max_age)


def _refuse(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def effective_requirement(
    require: Requirement, outcome: RiskOutcome, assurance: AssuranceConfig
) -> Requirement | None:
    """The rule's requirement with the outcome added; None means deny.

    The stronger level and the shorter max_age of the two (which may ask for more
    than either alone: a strong level the rule wants at any age and a weak one the
    engine wants recent becomes the strong one, recently). ``once`` and ``bind``
    stay the rule's.
    """
    if outcome.decision == DENY:
        return None
    if outcome.decision != REQUIRE or outcome.level is None:
        return require
    engine_level = assurance.level(outcome.level)
    rule_level = assurance.level(require.level) if require.level is not None else None
    if engine_level is None:
        return None  # outcome_from_answer never gives one; fail closed anyway
    level = engine_level
    if rule_level is not None and rule_level.rank > engine_level.rank:
        level = rule_level
    ages = [age for age in (require.max_age_s, outcome.max_age_s) if age is not None]
    return Requirement(
        level=level.name,
        max_age_s=min(ages) if ages else None,
        once=require.once,
        bind=require.bind,
    )


def cache_key(session_id: str, facts: RiskFacts) -> str:
    """Per session and rule, and per request facts other than the level's age.

    A cached answer is never reused for another amount, payee, path or address,
    and a step-up (a new level) asks the engine again.
    """
    material = facts.to_json()
    material.pop("level_age_s")
    material["session"] = session_id
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
