"""External risk engines: ask a service what a request needs.

A rule with ``risk: {url, timeout, on_error, cache}`` has the gateway POST the
request's facts as JSON to ``url``::

    {"subject": "alice", "rule": "transfers", "method": "POST",
     "path": "/api/transfers", "client_ip": "203.0.113.7",
     "fields": {"amount": "1500.00", "payee": "DE89..."},
     "level": "mfa", "level_age_s": 420}

``fields`` holds only the rule's bound fields and the fields its ``when`` reads,
as text (``null`` when missing). The engine answers ``200`` with::

    {"require": "phishing-resistant", "max_age": 300}   # a configured level, max_age optional
    {"require": "allow"}                                 # nothing beyond the rule's own require
    {"require": "deny"}                                  # refuse the request (403)

The engine can only add to a rule: :func:`effective_requirement` takes the
stronger level and the shorter ``max_age`` of the rule and the answer, so
``allow`` means "what the rule alone says".

Failures never let through a request the rule alone would not: a timeout, a
refused connection, a status other than 200, an answer that is not a JSON object
or names an unknown level all give the ``on_error`` outcome. ``deny`` refuses;
``step_up`` (the default) requires the strongest configured level, within the
rule's ``max_age`` or, when the rule has none, within
:data:`RISK_ERROR_MAX_AGE_S`. Not ``max_age: 0``: a proof is always some seconds
old by the time the browser is back from the provider, so 0 could never be met
and every request would loop through the provider.

:func:`outcome_from_answer` decides (pure); :class:`RiskClient` only does the
HTTP call and the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import structlog

from gateway.model import AssuranceConfig, Requirement, RiskConfig, Rule

log = structlog.get_logger("gateway")

# The freshness on_error: step_up asks for when the rule names none. Five minutes is
# PSD2 SCA's window (RTS Art. 4(3)(d)) and long enough for any sign-in to finish.
RISK_ERROR_MAX_AGE_S = 5 * 60
# A risk answer is a few dozen bytes; a large one is not an answer.
MAX_ANSWER_BYTES = 64 * 1024
# The longest max_age an answer may carry; longer than a session's lifetime is meaningless.
MAX_ANSWER_MAX_AGE_S = 24 * 60 * 60
# Cached answers across all sessions; each entry is a few hundred bytes.
MAX_CACHE_ENTRIES = 10_000

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


class RiskClient:
    """Asks risk engines over HTTP and caches their answers; decisions are pure functions."""

    def __init__(self, http: aiohttp.ClientSession, *, max_entries: int = MAX_CACHE_ENTRIES):
        self._http = http
        self._max_entries = max_entries
        self._cache: dict[str, tuple[float, RiskOutcome]] = {}  # key -> (expires_at, outcome)

    async def assess(
        self,
        rule: Rule,
        facts: RiskFacts,
        *,
        assurance: AssuranceConfig,
        session_id: str | None,
        now: float,
    ) -> RiskOutcome:
        """What ``rule``'s risk engine says about ``facts`` (the rule must have ``risk``).

        Answers are cached for ``risk.cache_s`` when there is a session; failures
        are never cached, so a recovered engine is asked again at once.
        """
        risk = rule.risk
        if risk is None:  # never "allow" by default: the caller checks rule.risk first
            raise ValueError(f"rule {rule.name!r} has no risk engine")
        key = cache_key(session_id, facts) if session_id is not None and risk.cache_s > 0 else None
        if key is not None:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                return RiskOutcome(
                    cached[1].decision, cached[1].level, cached[1].max_age_s, "cached"
                )
            self._cache.pop(key, None)
        outcome = await self._ask(risk, facts, assurance, rule.require.max_age_s)
        if outcome.failed:
            log.warning("risk_engine_error", rule=rule.name, reason=outcome.reason)
        elif key is not None:
            self._store(key, now + risk.cache_s, outcome, now)
        return outcome

    async def _ask(
        self,
        risk: RiskConfig,
        facts: RiskFacts,
        assurance: AssuranceConfig,
        rule_max_age_s: int | None,
    ) -> RiskOutcome:
        failed = functools.partial(on_error_outcome, risk, assurance, rule_max_age_s)
        try:
            # One deadline (aiohttp's total) for connecting, sending and reading it all.
            async with self._http.post(
                risk.url,
                json=facts.to_json(),
                headers={"Accept": "application/json"},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=risk.timeout_s),
            ) as response:
                body = await _read_limited(response.content, MAX_ANSWER_BYTES)
                status = response.status
        except TimeoutError:
            return failed("timeout")
        except (aiohttp.ClientError, OSError):
            return failed("unreachable")
        if body is None:
            return failed("too_large")
        return outcome_from_answer(
            status, body, risk=risk, assurance=assurance, rule_max_age_s=rule_max_age_s
        )

    def _store(self, key: str, expires_at: float, outcome: RiskOutcome, now: float) -> None:
        cache = self._cache
        if len(cache) >= self._max_entries:
            for stale in [k for k, (expiry, _) in cache.items() if expiry <= now]:
                del cache[stale]
        while len(cache) >= self._max_entries:
            del cache[next(iter(cache))]  # the oldest insertion
        cache[key] = (expires_at, outcome)

    def __len__(self) -> int:
        return len(self._cache)


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
