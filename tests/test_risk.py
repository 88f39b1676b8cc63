"""External risk engines (gateway.risk): the pure decision, then a real engine on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.model import AssuranceConfig, Level, Match, Requirement, RiskConfig, Rule
from gateway.risk import (
    RISK_ERROR_MAX_AGE_S,
    RiskClient,
    RiskFacts,
    RiskOutcome,
    effective_requirement,
    on_error_outcome,
    outcome_from_answer,
)

ASSURANCE = AssuranceConfig(
    levels=(
        Level("password", 0, acr=("loa1",)),
        Level("mfa", 1, acr=("loa2",)),
        Level("phishing-resistant", 2, acr=("phr",)),
    )
)
STEP_UP = RiskConfig(url="http://risk.invalid/score")
DENY_ON_ERROR = RiskConfig(url="http://risk.invalid/score", on_error="deny")
STRONGEST = "phishing-resistant"


# --- the decision (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "rule_max_age_s", "expected"),
    [
        (200, b'{"require": "mfa"}', None, RiskOutcome("require", "mfa")),
        (200, b'{"require": "mfa", "max_age": 120}', None, RiskOutcome("require", "mfa", 120)),
        (200, b'{"require": "allow"}', None, RiskOutcome("allow")),
        (200, b'{"require": "allow", "max_age": "x"}', None, RiskOutcome("allow")),
        (200, b'{"require": "deny", "why": "velocity"}', None, RiskOutcome("deny")),
        # everything unusable gives on_error: step_up -> the strongest level
        (200, b'{"require": "gold"}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "unknown_level")),
        (200, b'{"require": "MFA"}', 60, RiskOutcome("require", STRONGEST, 60, "unknown_level")),
        (500, b'{"require": "allow"}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "status_500")),
        (204, b"", None, RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "status_204")),
        (302, b"", None, RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "status_302")),
        (200, b"allow", None, RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_json")),
        (200, b"\xff", None, RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_json")),
        (200, b'["allow"]', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": NaN}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_json")),
        (200, b"{}", None, RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": null}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": 2}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": "mfa", "max_age": 0}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": "mfa", "max_age": -5}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": "mfa", "max_age": 1.5}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": "mfa", "max_age": true}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
        (200, b'{"require": "mfa", "max_age": 86401}', None,
         RiskOutcome("require", STRONGEST, RISK_ERROR_MAX_AGE_S, "bad_answer")),
    ],
)  # fmt: skip
def test_outcome_from_answer(
    status: int, body: bytes, rule_max_age_s: int | None, expected: RiskOutcome
) -> None:
    outcome = outcome_from_answer(
        status, body, risk=STEP_UP, assurance=ASSURANCE, rule_max_age_s=rule_max_age_s
    )
    assert outcome == expected
    assert outcome.failed is (expected.reason != "answered")


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b""), (200, b"nope"), (200, b'{"require": "gold"}'), (200, b"{}")],
)
def test_on_error_deny(status: int, body: bytes) -> None:
    outcome = outcome_from_answer(
        status, body, risk=DENY_ON_ERROR, assurance=ASSURANCE, rule_max_age_s=60
    )
    assert (outcome.decision, outcome.level, outcome.failed) == ("deny", None, True)


def test_on_error_without_levels_denies() -> None:
    outcome = on_error_outcome(STEP_UP, AssuranceConfig(levels=()), None, "timeout")
    assert outcome == RiskOutcome("deny", reason="timeout")


@pytest.mark.parametrize(
    ("require", "outcome", "expected"),
    [
        # the engine can only add to the rule
        (Requirement("mfa", 300), RiskOutcome("allow"), Requirement("mfa", 300)),
        (Requirement(None), RiskOutcome("allow"), Requirement(None)),
        (Requirement("mfa", 300), RiskOutcome("deny"), None),
        (Requirement(None), RiskOutcome("require", "mfa", 60), Requirement("mfa", 60)),
        (Requirement("password"), RiskOutcome("require", "mfa"), Requirement("mfa")),
        (Requirement(STRONGEST), RiskOutcome("require", "mfa"), Requirement(STRONGEST)),
        (Requirement(STRONGEST, 600), RiskOutcome("require", "password", 60),
         Requirement(STRONGEST, 60)),
        (Requirement("mfa", 60), RiskOutcome("require", STRONGEST, 600),
         Requirement(STRONGEST, 60)),
        (Requirement("mfa", once=True, bind=("amount",)), RiskOutcome("require", STRONGEST),
         Requirement(STRONGEST, once=True, bind=("amount",))),
        (Requirement("mfa"), RiskOutcome("require", "gold"), None),  # never built; fail closed
    ],
)  # fmt: skip
def test_effective_requirement(
    require: Requirement, outcome: RiskOutcome, expected: Requirement | None
) -> None:
    assert effective_requirement(require, outcome, ASSURANCE) == expected


# --- a real engine on loopback --------------------------------------------------------


@dataclass
class Engine:
    url: str
    status: int = 200
    body: bytes = b'{"require": "allow"}'
    delay_s: float = 0.0
    seen: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def answer(self, payload: object, status: int = 200) -> None:
        self.body, self.status = json.dumps(payload).encode(), status


@pytest.fixture
async def engine(aiohttp_server: Callable[..., Awaitable[Any]]) -> Engine:
    state = Engine(url="")

    async def score(request: web.Request) -> web.Response:
        state.seen.append(await request.json())
        state.headers.append(dict(request.headers))
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        return web.Response(status=state.status, body=state.body, content_type="application/json")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/score")

    app = web.Application()
    app.router.add_post("/score", score)
    app.router.add_post("/moved", moved)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/score"))
    return state


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def rule(url: str, *, timeout_s: float = 1.0, on_error: str = "step_up", cache_s: int = 0) -> Rule:
    return Rule(
        name="transfers",
        index=0,
        match=Match(path="/api/transfers/**"),
        require=Requirement("mfa", max_age_s=600, bind=("amount",)),
        upstream="app",
        risk=RiskConfig(url=url, timeout_s=timeout_s, on_error=on_error, cache_s=cache_s),
    )


def facts(amount: str | None = "1500.00", level: str | None = "mfa") -> RiskFacts:
    return RiskFacts(
        subject="alice",
        rule="transfers",
        method="POST",
        path="/api/transfers",
        client_ip="203.0.113.7",
        fields={"amount": amount, "payee": None},
        level=level,
        level_age_s=420.9,
    )


async def assess(
    client: RiskClient, the_rule: Rule, *, session_id: str | None = "s1", now: float = 1000.0,
    the_facts: RiskFacts | None = None,
) -> RiskOutcome:  # fmt: skip
    return await client.assess(
        the_rule,
        the_facts or facts(),
        assurance=ASSURANCE,
        session_id=session_id,
        now=now,
    )


async def test_the_engine_gets_the_facts_and_its_answer_decides(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    engine.answer({"require": "phishing-resistant", "max_age": 120})
    outcome = await assess(RiskClient(http), rule(engine.url))
    assert outcome == RiskOutcome("require", "phishing-resistant", 120)
    assert engine.seen == [
        {
            "subject": "alice",
            "rule": "transfers",
            "method": "POST",
            "path": "/api/transfers",
            "client_ip": "203.0.113.7",
            "fields": {"amount": "1500.00", "payee": None},
            "level": "mfa",
            "level_age_s": 420,
        }
    ]
    assert engine.headers[0]["Content-Type"] == "application/json"
    assert engine.headers[0]["Accept"] == "application/json"


@pytest.mark.parametrize(
    ("payload", "status", "expected"),
    [
        ({"require": "allow"}, 200, RiskOutcome("allow")),
        ({"require": "deny"}, 200, RiskOutcome("deny")),
        ({"require": "mfa"}, 200, RiskOutcome("require", "mfa")),
        ({"require": "allow"}, 500, RiskOutcome("require", STRONGEST, 600, "status_500")),
        ({"require": "allow"}, 404, RiskOutcome("require", STRONGEST, 600, "status_404")),
        ({"require": "platinum"}, 200, RiskOutcome("require", STRONGEST, 600, "unknown_level")),
        ("allow", 200, RiskOutcome("require", STRONGEST, 600, "bad_answer")),
    ],
)
async def test_answers(
    engine: Engine,
    http: aiohttp.ClientSession,
    payload: object,
    status: int,
    expected: RiskOutcome,
) -> None:
    engine.answer(payload, status)
    assert await assess(RiskClient(http), rule(engine.url)) == expected


async def test_bad_json(engine: Engine, http: aiohttp.ClientSession) -> None:
    engine.body = b"{not json"
    with capture_logs() as logs:
        outcome = await assess(RiskClient(http), rule(engine.url))
    assert outcome == RiskOutcome("require", STRONGEST, 600, "bad_json")
    assert logs == [
        {
            "event": "risk_engine_error",
            "rule": "transfers",
            "reason": "bad_json",
            "log_level": "warning",
        }
    ]


async def test_a_slow_engine_times_out_into_on_error(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    engine.delay_s = 2.0
    started = time.monotonic()
    outcome = await assess(RiskClient(http), rule(engine.url, timeout_s=0.2))
    assert time.monotonic() - started < 1.5
    assert outcome == RiskOutcome("require", STRONGEST, 600, "timeout")
    denied = await assess(RiskClient(http), rule(engine.url, timeout_s=0.2, on_error="deny"))
    assert denied == RiskOutcome("deny", reason="timeout")


async def test_an_unreachable_engine_gives_on_error(http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = await assess(RiskClient(http), rule(f"http://127.0.0.1:{port}/score"))
    assert outcome == RiskOutcome("require", STRONGEST, 600, "unreachable")


async def test_redirects_are_not_followed(engine: Engine, http: aiohttp.ClientSession) -> None:
    engine.answer({"require": "allow"})
    outcome = await assess(RiskClient(http), rule(engine.url.replace("/score", "/moved")))
    assert outcome == RiskOutcome("require", STRONGEST, 600, "status_302")
    assert engine.seen == []


async def test_a_huge_answer_is_refused(engine: Engine, http: aiohttp.ClientSession) -> None:
    engine.body = b'{"require": "allow", "pad": "' + b"x" * 100_000 + b'"}'
    outcome = await assess(RiskClient(http), rule(engine.url))
    assert outcome == RiskOutcome("require", STRONGEST, 600, "too_large")


async def test_answers_are_cached_per_session_for_cache_s(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    client = RiskClient(http)
    cached_rule = rule(engine.url, cache_s=60)
    engine.answer({"require": "phishing-resistant"})
    assert await assess(client, cached_rule, now=1000.0) == RiskOutcome(
        "require", STRONGEST, None, "answered"
    )
    engine.answer({"require": "allow"})
    # within cache_s: the cached answer, the engine is not asked
    assert await assess(client, cached_rule, now=1059.0) == RiskOutcome(
        "require", STRONGEST, None, "cached"
    )
    assert len(engine.seen) == 1
    # another session, and other facts, are asked about
    assert await assess(client, cached_rule, session_id="s2", now=1059.0) == RiskOutcome("allow")
    other = facts(amount="99999")
    assert await assess(client, cached_rule, now=1059.0, the_facts=other) == RiskOutcome("allow")
    assert len(engine.seen) == 3
    # a new level (after a step-up) asks again
    stepped = facts(level="phishing-resistant")
    assert await assess(client, cached_rule, now=1059.0, the_facts=stepped) == RiskOutcome("allow")
    assert len(engine.seen) == 4
    # the clock moves past cache_s: asked again
    assert await assess(client, cached_rule, now=1060.0) == RiskOutcome("allow")
    assert len(engine.seen) == 5


async def test_no_cache_without_a_session_or_cache_s(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    client = RiskClient(http)
    for _ in range(2):
        await assess(client, rule(engine.url, cache_s=60), session_id=None)
        await assess(client, rule(engine.url, cache_s=0))
    assert len(engine.seen) == 4
    assert len(client) == 0


async def test_failures_are_not_cached(engine: Engine, http: aiohttp.ClientSession) -> None:
    client = RiskClient(http)
    cached_rule = rule(engine.url, cache_s=60)
    engine.answer({"require": "allow"}, status=503)
    assert (await assess(client, cached_rule)).reason == "status_503"
    engine.answer({"require": "allow"})
    assert await assess(client, cached_rule, now=1001.0) == RiskOutcome("allow")
    assert len(engine.seen) == 2


async def test_the_cache_is_bounded(engine: Engine, http: aiohttp.ClientSession) -> None:
    client = RiskClient(http, max_entries=2)
    cached_rule = rule(engine.url, cache_s=60)
    for session_id in ("a", "b", "c"):
        await assess(client, cached_rule, session_id=session_id)
    assert len(client) == 2
    await assess(client, cached_rule, session_id="a")  # the oldest was dropped
    assert len(engine.seen) == 4
    # expired entries go first
    await assess(client, cached_rule, session_id="d", now=5000.0)
    assert len(client) == 1


async def test_a_rule_without_an_engine_is_never_allowed_by_default(
    http: aiohttp.ClientSession,
) -> None:
    no_engine = dataclasses.replace(rule("http://127.0.0.1:9/"), risk=None)
    with pytest.raises(ValueError, match="no risk engine"):
        await assess(RiskClient(http), no_engine)
