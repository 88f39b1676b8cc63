"""Risk conditions (gateway.conditions): parsing, refusals, fail-closed evaluation."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import model
from gateway.conditions import (
    AddressChanged,
    AllOf,
    AnyOf,
    AuthAge,
    Compare,
    ConditionError,
    Facts,
    Membership,
    parse_condition,
)
from gateway.rules import RuleSet

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


def facts(
    fields: dict[str, object] | None = None,
    *,
    client_ip: str | None = "203.0.113.7",
    proven_ip: str | None = "203.0.113.7",
    auth_age_s: float | None = 60.0,
) -> Facts:
    return Facts(fields or {}, client_ip=client_ip, proven_ip=proven_ip, auth_age_s=auth_age_s)


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "described", "fields"),
    [
        ("amount > 1000", "amount > 1000", {"amount"}),
        ("amount>1000", "amount > 1000", {"amount"}),
        ("  amount   >=   1000.50  ", "amount >= 1000.50", {"amount"}),
        ("amount < -5", "amount < -5", {"amount"}),
        ("amount <= 1e3", "amount <= 1e3", {"amount"}),
        ("currency == EUR", "currency == EUR", {"currency"}),
        ("currency != 'EUR'", 'currency != "EUR"', {"currency"}),
        ('note == "say \\"hi\\""', 'note == "say \\"hi\\""', {"note"}),
        ("beneficiary.iban == DE89", "beneficiary.iban == DE89", {"beneficiary.iban"}),
        ("_x-y.z_1 == a", "_x-y.z_1 == a", {"_x-y.z_1"}),
        ("country in [DE, FR, 'N L']", 'country in [DE, FR, "N L"]', {"country"}),
        ("country not in [DE]", "country not in [DE]", {"country"}),
        ("code in [1, 2,3]", "code in [1, 2, 3]", {"code"}),
        ("client_ip in [10.0.0.0/8, 192.168.0.0/16]", "client_ip in [10.0.0.0/8, 192.168.0.0/16]",
         set()),
        ("client_ip not in [2001:db8::/32, 10.1.2.3]",
         "client_ip not in [2001:db8::/32, 10.1.2.3/32]", set()),
        ("client_ip_changed", "client_ip_changed", set()),
        ("auth_age > 10m", "auth_age > 10m", set()),
        ("auth_age >= 300", "auth_age >= 300", set()),
        ("auth_age < 1h30m", "auth_age < 1h30m", set()),
        (["amount > 1000", "currency == EUR"], ["amount > 1000", "currency == EUR"],
         {"amount", "currency"}),
        ({"any": ["amount > 1000", "client_ip_changed"]},
         {"any": ["amount > 1000", "client_ip_changed"]}, {"amount"}),
        ({"all": ["a == 1", {"any": ["b == 2", ["c == 3", "d == 4"]]}]},
         {"all": ["a == 1", {"any": ["b == 2", ["c == 3", "d == 4"]]}]}, {"a", "b", "c", "d"}),
    ],
)  # fmt: skip
def test_parse_and_describe(written: object, described: object, fields: set[str]) -> None:
    condition = parse_condition(written)
    assert condition.describe() == described
    assert condition.fields() == fields
    # describe() is itself a valid when, meaning the same
    assert parse_condition(condition.describe()) == condition
    json.dumps(condition.describe())


def test_parsed_structure() -> None:
    condition = parse_condition({"any": ["amount > 1000", ["auth_age > 10m", "client_ip_changed"]]})
    assert isinstance(condition, AnyOf)
    compare, inner = condition.conditions
    assert isinstance(compare, Compare) and compare.value.number == Decimal(1000)
    assert isinstance(inner, AllOf) and inner.listed
    assert inner.conditions == (AuthAge(">", 600, "10m"), AddressChanged())
    membership = parse_condition("x in [1, '1']")
    assert isinstance(membership, Membership)
    assert [(v.quoted, v.number) for v in membership.values] == [(False, Decimal(1)), (True, None)]


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("", "an empty condition"),
        ("   ", "an empty condition"),
        ("amount", "'amount' is a name alone: compare it"),
        ("amount >", "a value is missing after >"),
        ("amount > x", "> needs a number, got 'x'"),
        ("amount > '1000'", "> needs a number, got a quoted string"),
        ("amount >= EUR", ">= needs a number"),
        ("amount > 1000 EUR", "unexpected 'EUR' after the value"),
        ("amount >> 5", "expected a value after >, got '>'"),
        ("amount = 5", "use == to compare"),
        ("amount ! 5", "use != or 'not in'"),
        ("amount ~ 5", "expected an operator (> >= < <= == !=) or 'in'"),
        ("amount not 5", "expected 'in' after 'amount'"),
        ("amount == in", "expected a value, got 'in'"),
        ("not amount > 5", "there is no 'not' before a condition"),
        ("1000 < amount", "must start with a field name"),
        ("'amount' > 5", "must start with a field name"),
        ("a..b == 1", "must start with a field name"),
        ("a. == 1", "must start with a field name"),
        ("x in DE", "'in' takes a list in brackets"),
        ("x in [DE", "the list must end with ']'"),
        ("x in [DE] y", "the list must end with ']'"),
        ("x in []", "an empty list"),
        ("x in [a,]", "a value is missing after the last ','"),
        ("x in [a b]", "expected ',' between values, got 'b'"),
        ("x in [a, ,b]", "expected a value, got ','"),
        ("x == 'open", "unterminated quoted value"),
        ("x == 'a\\nb'", "unknown escape \\n"),
        ("x == a\x00", "unexpected character '\\x00'"),
        ("client_ip == 10.0.0.1", "compare client_ip with 'in' or 'not in'"),
        ("client_ip in [10.0.0.1/8]", "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
        ("client_ip in [intranet]", "'intranet' is not an IP address or network"),
        ("client_ip in [10.0.0.0/33]", "is not an IP address or network"),
        ("client_ip_changed == true", "client_ip_changed takes no operator or value"),
        ("auth_age == 10m", "auth_age takes > >= < <=, not =="),
        ("auth_age > 10 minutes", "unexpected 'minutes' after the value"),
        ("auth_age > ten", "auth_age needs a duration"),
        ("auth_age > -5", "auth_age needs a duration"),
        ("auth_age in [1]", "auth_age takes > >= < <= and a duration"),
        ("x == " + "a" * 1000, "at most 1000 characters"),
    ],
)
def test_refusals(written: str, message: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse_condition(written)
    assert message in info.value.message
    assert info.value.where == ()


@pytest.mark.parametrize(
    ("node", "where", "message"),
    [
        (None, (), "expected a condition, got no value"),
        (True, (), "expected a condition, got true"),
        (1000, (), "expected a condition, got 1000"),
        ([], (), "an empty list of conditions"),
        ({}, (), "exactly one key, any or all (got none)"),
        ({"any": [], "all": []}, (), "exactly one key, any or all (got 'any', 'all')"),
        ({"none": ["a == 1"]}, (), "(got 'none')"),
        ({"any": "a == 1"}, ("any",), "any takes a list of conditions"),
        ({"all": []}, ("all",), "an empty list of conditions"),
        (["a == 1", "b = 2"], (1,), "use == to compare"),
        ({"any": ["a == 1", ["b == 2", 7]]}, ("any", 1, 1), "got 7"),
        ({"all": [{"any": ["a >"]}]}, ("all", 0, "any", 0), "a value is missing"),
    ],
)
def test_structure_refusals(node: object, where: tuple[object, ...], message: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse_condition(node)
    assert info.value.where == where
    assert message in info.value.message


def test_nesting_is_bounded() -> None:
    node: object = "a == 1"
    for _ in range(40):
        node = [node]
    with pytest.raises(ConditionError, match="nested more than 16 levels"):
        parse_condition(node)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=120))
def test_the_parser_raises_only_condition_error(text: str) -> None:
    try:
        condition = parse_condition(text)
    except ConditionError as exc:
        assert exc.message
        return
    # whatever parses describes itself in a form that parses to the same condition
    assert parse_condition(condition.describe()) == condition


_TOKENS = st.sampled_from(
    ["amount", "client_ip", "auth_age", "client_ip_changed", ">", ">=", "==", "!=", "<", "in",
     "not", "[", "]", ",", "1000", "1e3", "-0.5", "EUR", "'a b'", '"x\\"y"', "10m",
     "10.0.0.0/8", "::1", " "]
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(st.lists(_TOKENS, max_size=8), st.booleans())
def test_near_miss_conditions_raise_only_condition_error(tokens: list[str], spaced: bool) -> None:
    text = (" " if spaced else "").join(tokens)
    try:
        condition = parse_condition(text)
    except ConditionError:
        return
    assert parse_condition(condition.describe()) == condition


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["any", "all", "x"]), children, max_size=2)
    ),
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(_JSONISH)
def test_arbitrary_structures_raise_only_condition_error(node: object) -> None:
    try:
        parse_condition(node)
    except ConditionError as exc:
        assert exc.message


# --- evaluation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "fields", "holds"),
    [
        ("amount > 1000", {"amount": "1000.01"}, True),
        ("amount > 1000", {"amount": "1000"}, False),
        ("amount > 1000", {"amount": "1000.00"}, False),  # Decimal: 1000.00 == 1000
        ("amount >= 1000", {"amount": "1000.00"}, True),
        ("amount == 1000", {"amount": "1000.000"}, True),
        ("amount != 1000", {"amount": "1e3"}, False),
        ("amount > 1000", {"amount": Decimal("1000.0000000000000000000001")}, True),
        ("amount > 0.1", {"amount": "0.10000000000000000001"}, True),
        ("amount < 0", {"amount": "-0.01"}, True),
        ("amount <= -1", {"amount": "-1.0"}, True),
        ("amount > 1000", {"amount": 1001}, True),  # JSON number
        ("amount > 1000", {"amount": Decimal("999.99")}, False),
        ("amount > 1000", {"amount": "+1500"}, True),
        ("amount > 1000", {"amount": "01500"}, True),
        ("currency == EUR", {"currency": "EUR"}, True),
        ("currency == EUR", {"currency": "eur"}, False),  # exact, case-sensitive
        ("currency != EUR", {"currency": "USD"}, True),
        ("currency == '1000'", {"currency": "1000.0"}, False),  # quoted: text
        ("flag == true", {"flag": True}, True),  # JSON true reads as "true"
        ("code in [1, 2, 3]", {"code": "2.0"}, True),
        ("code in [1, 2, 3]", {"code": "4"}, False),
        ("code not in [1, 2, 3]", {"code": "4"}, True),
        ("country in [DE, FR]", {"country": "FR"}, True),
        ("country not in [DE, FR]", {"country": "FR"}, False),
        ("country in [DE, 'F R']", {"country": "F R"}, True),
        ("beneficiary.iban == DE89", {"beneficiary.iban": "DE89"}, True),
        (["amount > 1000", "currency == EUR"], {"amount": "2000", "currency": "USD"}, False),
        (["amount > 1000", "currency == EUR"], {"amount": "2000", "currency": "EUR"}, True),
        ({"any": ["amount > 1000", "currency == GBP"]}, {"amount": "5", "currency": "GBP"}, True),
        ({"any": ["amount > 1000", "currency == GBP"]}, {"amount": "5", "currency": "EUR"}, False),
    ],
)  # fmt: skip
def test_evaluation(condition: object, fields: dict[str, object], holds: bool) -> None:
    parsed = parse_condition(condition)
    assert parsed.holds(facts(fields)) is holds
    assert parsed.unknowns(facts(fields)) == frozenset()


@pytest.mark.parametrize(
    ("condition", "fields", "unknown"),
    [
        # A missing or unusable field never makes the stricter rule not apply.
        ("amount > 1000", {}, {"amount"}),
        ("amount < 10", {}, {"amount"}),
        ("amount > 1000", {"amount": ""}, {"amount"}),
        ("amount > 1000", {"amount": "1,500"}, {"amount"}),
        ("amount > 1000", {"amount": "1_500"}, {"amount"}),  # Decimal would take it
        ("amount > 1000", {"amount": "NaN"}, {"amount"}),
        ("amount > 1000", {"amount": "Infinity"}, {"amount"}),
        ("amount > 1000", {"amount": "1e99999"}, {"amount"}),  # exponent too long
        ("amount > 1000", {"amount": " 1500"}, {"amount"}),
        ("amount > 1000", {"amount": Decimal("NaN")}, {"amount"}),
        ("amount > 1000", {"amount": True}, {"amount"}),  # bool is not a number
        ("amount > 1000", {"amount": None}, {"amount"}),  # JSON null
        ("amount > 1000", {"amount": {"value": 5}}, {"amount"}),
        ("amount > 1000", {"amount": [5]}, {"amount"}),
        ("amount == 1000", {"amount": "abc"}, {"amount"}),
        ("amount != 1000", {"amount": "abc"}, {"amount"}),
        ("currency == EUR", {}, {"currency"}),
        ("currency != EUR", {}, {"currency"}),
        ("currency == EUR", {"currency": {"code": "EUR"}}, {"currency"}),
        ("country in [DE]", {}, {"country"}),
        ("country not in [DE]", {}, {"country"}),
        ("code in [1, 2]", {"code": "x"}, {"code"}),
        (["amount > 1000", "currency == EUR"], {"currency": "EUR"}, {"amount"}),
        ({"any": ["amount > 1000", "currency == GBP"]}, {"currency": "EUR"}, {"amount"}),
    ],
)  # fmt: skip
def test_what_cannot_be_evaluated_counts_as_true(
    condition: object, fields: dict[str, object], unknown: set[str]
) -> None:
    parsed = parse_condition(condition)
    assert parsed.holds(facts(fields)) is True
    assert parsed.evaluate(facts(fields)) is None
    assert parsed.unknowns(facts(fields)) == unknown


def test_a_false_part_decides_despite_unknowns() -> None:
    both = parse_condition(["amount > 1000", "currency == EUR"])
    assert both.holds(facts({"currency": "USD"})) is False  # amount missing, currency decides
    either = parse_condition({"any": ["amount > 1000", "currency == EUR"]})
    assert either.evaluate(facts({"currency": "EUR"})) is True


@pytest.mark.parametrize(
    ("condition", "client_ip", "holds"),
    [
        ("client_ip in [10.0.0.0/8]", "10.20.30.40", True),
        ("client_ip in [10.0.0.0/8]", "11.0.0.1", False),
        ("client_ip not in [10.0.0.0/8, 192.168.0.0/16]", "192.168.1.1", False),
        ("client_ip not in [10.0.0.0/8, 192.168.0.0/16]", "198.51.100.1", True),
        ("client_ip in [10.0.0.0/8]", "::ffff:10.0.0.1", True),  # IPv4-mapped
        ("client_ip in [2001:db8::/32]", "2001:db8::1", True),
        ("client_ip in [2001:db8::/32]", "2001:db9::1", False),
        ("client_ip in [2001:db8::/32]", "10.0.0.1", False),  # other family
        ("client_ip not in [2001:db8::/32]", "10.0.0.1", True),
        ("client_ip in [::1]", "::1", True),
        ("client_ip in [203.0.113.7]", "203.0.113.7", True),
    ],
)
def test_client_address(condition: str, client_ip: str, holds: bool) -> None:
    assert parse_condition(condition).holds(facts(client_ip=client_ip)) is holds


@pytest.mark.parametrize("client_ip", [None, "", "not-an-ip", "10.0.0.1:443"])
@pytest.mark.parametrize(
    "condition", ["client_ip in [10.0.0.0/8]", "client_ip not in [10.0.0.0/8]"]
)
def test_unknown_client_address_counts_as_true(client_ip: str | None, condition: str) -> None:
    parsed = parse_condition(condition)
    assert parsed.holds(facts(client_ip=client_ip)) is True
    assert parsed.unknowns(facts(client_ip=client_ip)) == {"client_ip"}


@pytest.mark.parametrize(
    ("client_ip", "proven_ip", "holds", "unknown"),
    [
        ("203.0.113.7", "203.0.113.7", False, set()),
        ("203.0.113.8", "203.0.113.7", True, set()),
        ("::ffff:203.0.113.7", "203.0.113.7", False, set()),
        ("2001:db8::1", "2001:db8:0::1", False, set()),
        ("203.0.113.7", None, True, {"session"}),  # no session, or no recorded address
        (None, "203.0.113.7", True, {"client_ip"}),
        ("203.0.113.7", "garbage", True, {"session"}),
    ],
)
def test_client_ip_changed(
    client_ip: str | None, proven_ip: str | None, holds: bool, unknown: set[str]
) -> None:
    condition = parse_condition("client_ip_changed")
    given_facts = facts(client_ip=client_ip, proven_ip=proven_ip)
    assert condition.holds(given_facts) is holds
    assert condition.unknowns(given_facts) == unknown


@pytest.mark.parametrize(
    ("condition", "auth_age_s", "holds"),
    [
        ("auth_age > 10m", 601.0, True),
        ("auth_age > 10m", 600.0, False),
        ("auth_age >= 600", 600.0, True),
        ("auth_age < 30s", 29.5, True),
        ("auth_age <= 1h", 3600.0, True),
        ("auth_age > 1d", 86399.0, False),
        ("auth_age > 10m", None, True),  # no session: fail closed
        ("auth_age < 10m", None, True),
        ("auth_age > 10m", float("nan"), True),
    ],
)
def test_auth_age(condition: str, auth_age_s: float | None, holds: bool) -> None:
    assert parse_condition(condition).holds(facts(auth_age_s=auth_age_s)) is holds


# --- rule selection: the first matching rule whose when holds --------------------------


def _rule(
    index: int, name: str, path: str, when: object = None, methods: tuple[str, ...] = ()
) -> model.Rule:
    return model.Rule(
        name=name,
        index=index,
        match=model.Match(path=path, methods=frozenset(methods) if methods else None),
        require=model.Requirement(level="mfa"),
        upstream="app",
        when=parse_condition(when) if when is not None else None,
    )


def _select(rules: list[model.Rule], method: str, path: str, given_facts: Facts) -> str | None:
    for rule in RuleSet(rules).candidates_for(method, None, path):
        if rule.when is None or rule.when.holds(given_facts):
            return rule.name
    return None


RULES = [
    _rule(0, "huge", "/api/transfers/**", "amount > 10000", ("POST",)),
    _rule(1, "large", "/api/transfers/**", {"any": ["amount > 1000", "client_ip_changed"]}),
    _rule(2, "transfers", "/api/transfers/**"),
    _rule(3, "catch-all", "/**"),
]


@pytest.mark.parametrize(
    ("method", "path", "fields", "client_ip", "chosen"),
    [
        ("POST", "/api/transfers/1", {"amount": "20000"}, "203.0.113.7", "huge"),
        ("PUT", "/api/transfers/1", {"amount": "20000"}, "203.0.113.7", "large"),  # huge: POST
        ("POST", "/api/transfers/1", {"amount": "5000"}, "203.0.113.7", "large"),
        ("POST", "/api/transfers/1", {"amount": "50"}, "203.0.113.7", "transfers"),
        ("POST", "/api/transfers/1", {"amount": "50"}, "198.51.100.1", "large"),  # moved
        ("POST", "/api/transfers/1", {}, "203.0.113.7", "huge"),  # unknown: the strictest
        ("GET", "/other", {"amount": "20000"}, "203.0.113.7", "catch-all"),
    ],
)
def test_the_first_rule_whose_when_holds_wins(
    method: str, path: str, fields: dict[str, object], client_ip: str, chosen: str
) -> None:
    given_facts = Facts(fields, client_ip=client_ip, proven_ip="203.0.113.7", auth_age_s=5.0)
    assert _select(RULES, method, path, given_facts) == chosen


def test_candidates_for_yields_every_match_in_order_and_starts_with_match() -> None:
    rule_set = RuleSet(RULES)
    names = [rule.name for rule in rule_set.candidates_for("POST", None, "/api/transfers/1")]
    assert names == ["huge", "large", "transfers", "catch-all"]
    assert [rule.name for rule in rule_set.candidates_for("GET", None, "/api/transfers")] == [
        "large",
        "transfers",
        "catch-all",
    ]
    match = rule_set.match("GET", None, "/api/transfers")
    assert match is not None and match.name == "large"
    assert list(rule_set.candidates_for("GET", None, "relative")) == []
