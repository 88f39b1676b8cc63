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

:func:`outcome_from_answer` decides (pure, in :mod:`gateway.risk_policy`, with
:func:`effective_requirement`); :class:`RiskClient` here only does the HTTP call
and the cache.
"""

from __future__ import annotations

import functools

import aiohttp
import structlog

from gateway.model import AssuranceConfig, RiskConfig, Rule
from gateway.risk_policy import (
    ALLOW,
    DENY,
    MAX_ANSWER_MAX_AGE_S,
    REQUIRE,
    RISK_ERROR_MAX_AGE_S,
    RiskFacts,
    RiskOutcome,
    cache_key,
    effective_requirement,
    on_error_outcome,
    outcome_from_answer,
)

__all__ = [  # the pure half lives in risk_policy; its names are used from here too
    "ALLOW",
    "DENY",
    "MAX_ANSWER_MAX_AGE_S",
    "REQUIRE",
    "RISK_ERROR_MAX_AGE_S",
    "RiskClient",
    "RiskFacts",
    "RiskOutcome",
    "cache_key",
    "effective_requirement",
    "on_error_outcome",
    "outcome_from_answer",
]

log = structlog.get_logger("gateway")

# A risk answer is a few dozen bytes; a large one is not an answer.
MAX_ANSWER_BYTES = 64 * 1024
# Cached answers across all sessions; each entry is a few hundred bytes.
MAX_CACHE_ENTRIES = 10_000


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
