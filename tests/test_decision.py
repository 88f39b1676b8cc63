"""The decision unit (gateway.decision): request facts in, Allow | Challenge | Deny out.

Pure: the body's fields, the client's address, the risk engine and the one-time
claims are plain objects here, and every coroutine finishes without waiting.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.conditions import parse_condition
from gateway.decision import (
    Allow,
    Challenge,
    Deny,
    RequestFacts,
    decide_plain,
    decide_request,
)
from gateway.errors import BadRequest, StoreUnavailable
from gateway.fields import ambiguous, binding_digest
from gateway.model import AssuranceConfig, Level, Match, Requirement, RiskConfig, Rule
from gateway.risk_policy import RiskFacts, RiskOutcome
from gateway.rules import RuleSet
from gateway.session.model import Proof, Session

MFA = Level("mfa", 1, acr=("mfa",))
PHR = Level("phishing-resistant", 2, acr=("phr",))
LEVELS = AssuranceConfig((MFA, PHR))
NOW = 1_800_000_000.0


def rule(name: str, level: str | None = None, *, index: int = 0, **extra: Any) -> Rule:
    require = Requirement(
        level=level, once=extra.pop("once", False), bind=tuple(extra.pop("bind", ()))
    )
    return Rule(
        name=name, index=index, match=Match(path="/**"), require=require, upstream="app", **extra
    )


def signed_in(acr: str = "mfa", at: float = NOW - 60, binding: str | None = None) -> Session:
    return Session.start(
        Proof(acr, (), at, id="p1"),
        binding=binding,
        sub="alice",
        email=None,
        name=None,
        provider_sid=None,
        id_token=None,
        now=at,
        ip="192.0.2.1",
    )


@dataclass
class Reader:
    """What the request holds; counts what was read."""

    values: dict[str, object] = field(default_factory=dict)
    ip: str | None = "192.0.2.1"
    reads: list[str] = field(default_factory=list)
    named: list[list[str]] = field(default_factory=list)  # the names each read asked for

    async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
        self.reads.append("fields")
        self.named.append(sorted(reading))
        return self.values

    def client_ip(self) -> str | None:
        self.reads.append("client_ip")
        return self.ip


@dataclass
class Claims:
    taken: set[str] = field(default_factory=set)

    async def __call__(self, name: str, *, rule: str, sub: str) -> bool:
        first = name not in self.taken
        self.taken.add(name)
        return first


def run(step: Coroutine[Any, Any, Any]) -> Any:
    try:
        step.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the decision waited")


def decide(rules: list[Rule], session: Session | None, reader: Reader, **kwargs: Any) -> Any:
    facts = RequestFacts("POST", None, "/pay", session, reader)
    kwargs.setdefault("risk", None)
    kwargs.setdefault("claim_once", Claims())
    return run(decide_request(facts, RuleSet(rules), LEVELS, NOW, **kwargs))


def test_a_plain_rule_is_decided_without_a_coroutine_and_reads_nothing() -> None:
    plain = rule("app", "mfa")
    assert decide_plain(plain, signed_in(), LEVELS, NOW) == Allow(plain, MFA, signed_in().proofs[0])
    assert decide_plain(None, None, LEVELS, NOW) == Deny(403, "no_rule_matches")


@pytest.mark.parametrize(
    "needs_more",
    [
        rule("when", "mfa", when=parse_condition("amount > 100")),
        rule("risk", "mfa", risk=RiskConfig(url="http://127.0.0.1:9/")),
        rule("bind", "mfa", bind=("amount",)),
        rule("once", "mfa", once=True),
    ],
    ids=lambda r: r.name,
)
def test_a_rule_that_reads_or_asks_is_left_to_decide_request(needs_more: Rule) -> None:
    assert decide_plain(needs_more, signed_in(), LEVELS, NOW) is None


@pytest.mark.parametrize("plain", [True, False], ids=["decide_plain", "decide_request"])
@pytest.mark.parametrize(
    ("credentials", "by_token", "expected"),
    [
        # rules[].credentials: session -- an access token is refused (the token gate's 401).
        ("session", True, "token_not_accepted"),
        ("session", False, "allow"),
        # credentials: token -- a cookie's session is no credential there.
        ("token", False, "no_session"),
        ("token", True, "allow"),
        ("any", True, "allow"),
        ("any", False, "allow"),
    ],
)
def test_what_a_rule_takes_as_credential(
    credentials: str, by_token: bool, expected: str, plain: bool
) -> None:
    taking = rule("api", "mfa", credentials=credentials)
    if plain:
        decision = decide_plain(taking, signed_in(), LEVELS, NOW, by_token=by_token)
    else:
        facts = RequestFacts("POST", None, "/pay", signed_in(), Reader(), by_token)
        decision = run(
            decide_request(facts, RuleSet([taking]), LEVELS, NOW, risk=None, claim_once=Claims())
        )
    assert decision is not None
    got = "allow" if isinstance(decision, Allow) else decision.reason
    assert got == expected
    if expected == "token_not_accepted":
        assert decision == Deny(401, "token_not_accepted", taking)


@pytest.mark.parametrize("plain", [True, False], ids=["decide_plain", "decide_request"])
def test_a_token_only_rule_does_not_need_the_session_store(plain: bool) -> None:
    """A store that is down fails requests that need a cookie's session, not a token-only
    rule's (it is judged as no session at all: the client's 401 names the token schemes)."""
    taking = rule("api", "mfa", credentials="token")
    outage = StoreUnavailable("down", reason="store_down")
    if plain:
        decision = decide_plain(taking, None, LEVELS, NOW, session_error=outage)
    else:
        facts = RequestFacts("POST", None, "/pay", None, Reader())
        decision = run(
            decide_request(
                facts,
                RuleSet([taking]),
                LEVELS,
                NOW,
                risk=None,
                claim_once=Claims(),
                session_error=outage,
            )
        )
    assert isinstance(decision, Challenge)
    assert decision.reason == "no_session"


def test_when_chooses_the_rule_and_the_skipped_ones_are_named() -> None:
    big = rule("big", "phishing-resistant", when=parse_condition("amount > 100"))
    small = rule("small", "mfa", index=1)
    skipped: list[Rule] = []
    decision = decide([big, small], signed_in(), Reader({"amount": "5"}), skipped=skipped)
    assert isinstance(decision, Allow) and decision.rule == small
    assert skipped == [big]
    decision = decide([big, small], signed_in(), Reader({"amount": "500"}))
    assert isinstance(decision, Challenge) and decision.rule == big


def test_the_body_and_address_are_read_only_for_a_rule_that_needs_them() -> None:
    reader = Reader()
    decide([rule("app", "mfa", once=True)], signed_in(), reader)
    assert reader.reads == []
    reader = Reader({"amount": "500"})
    decide([rule("big", "mfa", when=parse_condition("amount > 100"))], signed_in(), reader)
    assert reader.reads == ["client_ip", "fields"]  # a 400 for the address before a 413


@pytest.mark.parametrize(("level", "raised"), [(None, False), ("mfa", True)])
def test_a_store_outage_fails_only_the_rules_that_need_a_session(
    level: str | None, raised: bool
) -> None:
    outage = StoreUnavailable("down", reason="store_down")
    chosen = rule("r", level, when=parse_condition("amount > 1"))
    for decided in (
        lambda: decide_plain(rule("p", level), None, LEVELS, NOW, session_error=outage),
        lambda: decide([chosen], None, Reader({"amount": "5"}), session_error=outage),
    ):
        if raised:
            with pytest.raises(StoreUnavailable):
                decided()
        else:
            assert isinstance(decided(), Allow)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (RiskOutcome("allow"), Allow),
        (RiskOutcome("require", "phishing-resistant"), Challenge),
        (RiskOutcome("deny"), Deny),
    ],
)
def test_the_risk_engines_answer_becomes_the_requirement(
    answer: RiskOutcome, expected: type
) -> None:
    asked: list[RiskFacts] = []

    async def engine(r: Rule, facts: RiskFacts, session_id: str | None, now: float) -> RiskOutcome:
        asked.append(facts)
        return answer

    risky = rule(
        "risky",
        "mfa",
        risk=RiskConfig(url="http://127.0.0.1:9/"),
        when=parse_condition("amount > 1"),
    )
    decision = decide([risky], signed_in(), Reader({"amount": "7"}), risk=engine)
    assert isinstance(decision, expected)
    assert decision.rule is not None and decision.rule.name == "risky"
    if isinstance(decision, Deny):
        assert decision == Deny(403, "risk_engine_denied", risky)
    assert asked[0].fields == {"amount": "7"} and asked[0].level == "mfa"


def test_the_reader_is_told_which_fields_each_step_reads() -> None:
    # Only the names a rule reads may be refused as ambiguous (gateway.fields):
    # the when's, then the risk engine's (bind and when), then bind's.
    async def engine(r: Rule, facts: RiskFacts, session_id: str | None, now: float) -> RiskOutcome:
        return RiskOutcome("allow")

    reader = Reader({"amount": "7", "payee": "DE89"})
    bound = rule(
        "bound",
        "mfa",
        bind=("payee",),
        risk=RiskConfig(url="http://127.0.0.1:9/"),
        when=parse_condition("amount > 1"),
    )
    decide([bound], signed_in(), reader, risk=engine)
    assert reader.named == [["amount"], ["amount", "payee"], ["payee"]]


def test_an_ambiguous_field_refuses_the_request() -> None:
    class Ambiguous(Reader):
        async def fields(self, reading: Iterable[str]) -> Mapping[str, object]:
            raise ambiguous(sorted(reading))

    with pytest.raises(BadRequest) as refused:
        decide([rule("big", "mfa", when=parse_condition("amount > 100"))], None, Ambiguous())
    assert refused.value.reason == "ambiguous_field"


def test_a_when_that_cannot_be_evaluated_chooses_its_rule_and_says_why() -> None:
    big = rule("big", "phishing-resistant", when=parse_condition("amount > 100"))
    small = rule("small", "mfa", index=1)
    with capture_logs() as logs:
        decision = decide([big, small], signed_in(), Reader({"amount": "lots"}))
    assert isinstance(decision, Challenge) and decision.rule == big  # fail closed
    assert logs == [
        {"event": "when_unknown", "rule": "big", "unknown": ["amount"], "log_level": "info"}
    ]
    with capture_logs() as logs:
        decide([big, small], signed_in(), Reader({"amount": "lots"}), log_unknown=False)
    assert logs == []


def test_a_one_time_proof_is_spent_by_the_first_request_only() -> None:
    once = rule("once", "mfa", once=True)
    claims = Claims()
    session = signed_in()
    first = decide([once], session, Reader(), claim_once=claims)
    second = decide([once], session, Reader(), claim_once=claims)
    assert isinstance(first, Allow)
    assert isinstance(second, Challenge) and second.reason == "proof_used"


def test_a_bound_rule_allows_only_the_approved_values() -> None:
    bound = rule("bound", "mfa", bind=("amount",))
    session = signed_in(binding=binding_digest(("amount",), {"amount": "7"}))
    assert isinstance(decide([bound], session, Reader({"amount": "7"})), Allow)
    other = decide([bound], session, Reader({"amount": "8"}))
    assert isinstance(other, Challenge) and other.reason == "unbound"


def test_the_decision_unit_needs_no_http_library() -> None:
    code = (
        "import sys, gateway.decision; print(sorted({'aiohttp', 'multidict'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
