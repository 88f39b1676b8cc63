"""``when`` in CEL (gateway.cel): compiling, fail-closed evaluation, and the rewrite of
the old syntax, checked against the old evaluator on the same facts."""

from __future__ import annotations

import contextlib
import itertools
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.cel import (
    CelCondition,
    compile_cel,
    number,
    old_syntax_rewrites,
    parse_when,
    rewrite_notice,
)
from gateway.cel_rewrite import to_cel
from gateway.conditions import Condition, ConditionError, Facts, as_number, parse_condition
from tests.test_operations import gateway_process, slow_upstream  # noqa: F401 (fixtures)


def facts(
    fields: dict[str, object] | None = None,
    *,
    client_ip: str | None = "203.0.113.7",
    proven_ip: str | None = "203.0.113.7",
    auth_age_s: float | None = 60.0,
) -> Facts:
    return Facts(fields or {}, client_ip=client_ip, proven_ip=proven_ip, auth_age_s=auth_age_s)


# --- the old syntax, rewritten: the same answer on the same facts ----------------------

# Every old-syntax example of the README, the docs and the condition tests.
OLD = [
    "amount > 1000",
    "amount>1000",
    "  amount   >=   1000.50  ",
    "amount < -5",
    "amount <= 1e3",
    "amount == 1000",
    "amount != 1000.00",
    "amount > 10",
    "currency == EUR",
    "currency != 'EUR'",
    'note == "say \\"hi\\""',
    "beneficiary.iban == DE89",
    "_x-y.z_1 == a",
    "country in [DE, FR, 'N L']",
    "country not in [DE]",
    "code in [1, 2,3]",
    "x in [1, EUR, '2']",
    "x not in [1, EUR]",
    "in_ == true",
    "client_ip in [10.0.0.0/8, 192.168.0.0/16]",
    "client_ip not in [2001:db8::/32, 10.1.2.3]",
    "client_ip not in [10.0.0.0/8]",
    "client_ip_changed",
    "auth_age > 10m",
    "auth_age >= 300",
    "auth_age < 1h30m",
    "auth_age <= 1d",
    ["amount > 1000", "currency == EUR"],
    {"any": ["amount > 1000", "client_ip_changed"]},
    {"any": ["amount > 1000", "client_ip not in [10.0.0.0/8]"]},
    {"all": ["a == 1", {"any": ["b == 2", ["c == 3", "d == 4"]]}]},
    {"any": [["amount > 1000", "currency == EUR"], "country not in [DE, FR]"]},
]

_VALUES: list[object] = [
    "5000",
    "1000.00",
    "1000",
    "-7",
    "+12",
    "1e3",
    "lots",
    "",
    "EUR",
    "DE",
    "N L",
    "DE89",
    'say "hi"',
    "a",
    "1",
    "2",
    "true",
    "NaN",
    "Infinity",
    "1e999",
    1500,
    1000,
    -7,
    2,
    0,
    True,
    False,
    None,
    Decimal("1000.50"),
    Decimal("1e3"),
    {"iban": "DE89"},
    ["EUR"],
]
_NAMES = ["amount", "currency", "note", "beneficiary.iban", "_x-y.z_1", "country", "code", "x"]
_NAMES += ["in_", "a", "b", "c", "d"]
_FACTS = [
    facts(),
    facts(client_ip=None),
    facts(client_ip="10.1.2.3", proven_ip="10.1.2.3"),
    facts(client_ip="::ffff:10.1.2.3", proven_ip="10.1.2.3", auth_age_s=None),
    facts(client_ip="2001:db8::1", proven_ip=None, auth_age_s=600.0),
    facts(client_ip="192.168.7.7", auth_age_s=5400.0),
    facts(client_ip="not-an-ip", auth_age_s=86400.0),
]


def _samples() -> list[Facts]:
    """Each name with each value, alone and among others; plus the facts without fields."""
    samples = list(_FACTS)
    for name, value in itertools.product(_NAMES, _VALUES):
        samples.append(facts({name: value}))
        samples.append(
            facts({"amount": "5000", "currency": "EUR", name: value}, client_ip="10.0.0.1")
        )
    return samples


SAMPLES = _samples()


def _beyond_a_double(given: Facts) -> bool:
    """A number the old language compared exactly and CEL's double cannot hold."""
    for value in given.fields.values():
        if as_number(value) is None or isinstance(value, bool):
            continue
        try:
            number(value)
        except ValueError:
            return True
    return False


def same_or_stricter(rewritten: Condition, condition: Condition, given: Facts) -> None:
    """The rewrite holds exactly when the old condition held, with one difference: a
    number beyond a double (over 15 significant digits, 1e999) is unknown in CEL, so
    the rewrite holds (the stricter rule) where the old language could compare it."""
    new, old = rewritten.holds(given), condition.holds(given)
    if new != old:
        assert (new, old) == (True, False) and _beyond_a_double(given), (rewritten, given)


@pytest.mark.parametrize("old", OLD, ids=[str(old) for old in OLD])
def test_the_rewrite_means_what_the_old_condition_meant(old: object) -> None:
    condition = parse_condition(old)
    rewritten = compile_cel(to_cel(condition))
    assert rewritten.fields() == condition.fields()
    for sample in SAMPLES:
        same_or_stricter(rewritten, condition, sample)


_FIELD_VALUES = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"[+-]?[0-9]{1,6}(\.[0-9]{1,4})?", fullmatch=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10**9),
    st.booleans(),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(
    old=st.sampled_from(OLD),
    fields=st.dictionaries(st.sampled_from(_NAMES), _FIELD_VALUES, max_size=4),
    sample=st.sampled_from(_FACTS),
)
def test_the_rewrite_agrees_on_arbitrary_fields(
    old: object, fields: dict[str, object], sample: Facts
) -> None:
    condition = parse_condition(old)
    given_facts = Facts(fields, sample.client_ip, sample.proven_ip, sample.auth_age_s)
    same_or_stricter(compile_cel(to_cel(condition)), condition, given_facts)


@pytest.mark.parametrize(
    ("old", "cel"),
    [
        ("amount > 1000", "number(fields.amount) > 1000"),
        ("amount <= 1e3", "number(fields.amount) <= 1000"),
        ("amount >= 1000.50", "number(fields.amount) >= 1000.5"),
        ("currency == EUR", 'string(fields.currency) == "EUR"'),
        ("beneficiary.iban == DE89", 'string(fields["beneficiary.iban"]) == "DE89"'),
        ("country not in [DE, FR]", '!(string(fields.country) in ["DE", "FR"])'),
        ("x in [1, EUR]", '(string(fields.x) in ["EUR"] || number(fields.x) in [1])'),
        ("client_ip not in [10.0.0.0/8]", '!ip_in(client_ip, ["10.0.0.0/8"])'),
        ("auth_age > 10m", 'auth_age > duration("600s")'),
        (["amount > 1000", "client_ip_changed"],
         "number(fields.amount) > 1000 && client_ip_changed"),
        ({"any": [["a == 1", "b == 2"], "c == 3"]},
         '(number(fields.a) == 1 && number(fields.b) == 2) || number(fields.c) == 3'),
    ],
)  # fmt: skip
def test_rewrites_read_as_an_operator_would_write_them(old: object, cel: str) -> None:
    assert to_cel(parse_condition(old)) == cel


# --- CEL: what holds --------------------------------------------------------------------


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(depth):
        value = {"next": value}
    return value


@pytest.mark.parametrize(
    ("source", "fields", "holds"),
    [
        ("fields.amount > 1000", {"amount": 1500}, True),  # JSON numbers keep their type
        ("fields.amount > 1000", {"amount": Decimal("999.99")}, False),
        ("number(fields.amount) > 1000", {"amount": "1000.01"}, True),  # form text
        ("number(fields.amount) > 1000", {"amount": "1000.00"}, False),
        ("number(fields.amount) > 1000", {"amount": Decimal("1500")}, True),
        ('fields.currency == "EUR"', {"currency": "EUR"}, True),
        ('fields.currency in ["EUR", "USD"]', {"currency": "PLN"}, False),
        ('fields.iban.startsWith("DE")', {"iban": "DE89370400440532013000"}, True),
        ('fields.iban.matches("^DE[0-9]{20}$")', {"iban": "FR7630006000011234567890189"}, False),
        ('fields["payee.iban"] == "DE89"', {"payee.iban": "DE89", "payee": {"iban": "DE89"}}, True),
        ('fields.payee.iban == "DE89"', {"payee": {"iban": "FR76"}}, False),
        ('size(fields.note) > 3', {"note": "hello"}, True),
        ("has(fields.coupon)", {}, False),  # asked explicitly: no error, so no fail-closed
        ("fields.flag", {"flag": False}, False),
        ("has(fields.deep)", {"deep": _nested(30)}, True),
    ],
)  # fmt: skip
def test_evaluation(source: str, fields: dict[str, object], holds: bool) -> None:
    assert compile_cel(source).holds(facts(fields)) is holds


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("fields.amount > 1000", {}),  # missing
        ("fields.amount > 1000", {"amount": "50"}),  # text where a number is needed
        ("fields.amount > 1000", {"amount": None}),
        ("fields.amount > 1000", {"amount": {"value": 5}}),
        ("number(fields.amount) > 1000", {"amount": "lots"}),
        ("number(fields.amount) > 1000", {"amount": "NaN"}),  # double() would say false
        ("number(fields.amount) > 1000", {"amount": "-Infinity"}),
        ("number(fields.amount) > 1000", {"amount": "1e999"}),
        ("number(fields.amount) > 1000", {"amount": "1000.0000000000000001"}),  # > 15 digits
        ("number(fields.amount) > 1000", {"amount": Decimal("1000.0000000000000001")}),
        ("number(fields.amount) > 1000", {"amount": True}),
        ("!(fields.amount > 1000)", {}),  # ! does not turn an error into false
        ("fields.amount > 1000 && fields.currency == 'EUR'", {"currency": "EUR"}),
        ("fields.amount > 1000 || fields.currency == 'PLN'", {"currency": "EUR"}),
        ("has(fields.count)", {"count": 2**63}),  # beyond int64: unknown, not absent
        ("has(fields.deep)", {"deep": _nested(40)}),  # deeper than CEL is handed: unknown
        ("has(fields.amount)", {"amount": Decimal("1e400")}),
        ("fields.note", {"note": "a string, not a bool"}),
        ("fields.amount", {"amount": 1500}),
    ],
)
def test_what_cannot_be_evaluated_counts_as_true(source: str, fields: dict[str, object]) -> None:
    condition = compile_cel(source)
    assert condition.evaluate(facts(fields)) is None
    assert condition.holds(facts(fields)) is True


def test_a_false_side_decides_despite_an_error() -> None:
    condition = compile_cel("fields.amount > 1000 && fields.currency == 'EUR'")
    assert condition.holds(facts({"currency": "PLN"})) is False  # amount missing, yet false


@pytest.mark.parametrize(
    ("source", "given", "holds"),
    [
        ('ip_in(client_ip, ["10.0.0.0/8"])', facts(client_ip="10.200.0.1"), True),
        ('ip_in(client_ip, ["10.0.0.0/8"])', facts(client_ip="::ffff:10.200.0.1"), True),
        ('!ip_in(client_ip, ["10.0.0.0/8", "::1/128"])', facts(client_ip="::1"), False),
        ('!ip_in(client_ip, ["10.0.0.0/8"])', facts(client_ip=None), True),
        ('!ip_in(client_ip, ["10.0.0.0/8"])', facts(client_ip="not-an-ip"), True),
        ("client_ip_changed", facts(client_ip="10.0.0.1", proven_ip="10.0.0.1"), False),
        ("client_ip_changed", facts(client_ip="10.0.0.2", proven_ip="10.0.0.1"), True),
        ("!client_ip_changed", facts(proven_ip=None), True),  # no session: unknown
        ('auth_age > duration("10m")', facts(auth_age_s=599.0), False),
        ('auth_age > duration("10m")', facts(auth_age_s=601.5), True),
        ('auth_age < duration("1h")', facts(auth_age_s=None), True),
        ('auth_age < duration("1h")', facts(auth_age_s=float("nan")), True),
    ],
)
def test_facts_about_the_request_and_the_session(source: str, given: Facts, holds: bool) -> None:
    assert compile_cel(source).holds(given) is holds


def test_fields_and_unknowns() -> None:
    condition = compile_cel(
        'number(fields.amount) > 1000 || fields["payee.iban"].startsWith("DE") // a comment'
        '\n || ip_in(client_ip, ["10.0.0.0/8"]) || x.fields > 0'.replace(" || x.fields > 0", "")
    )
    assert isinstance(condition, CelCondition)
    assert condition.fields() == {"amount", "payee.iban"}
    assert condition.unknowns(facts({"amount": "5"}, client_ip=None)) == {"payee.iban", "client_ip"}
    assert condition.unknowns(facts({"amount": "5000"})) == frozenset()
    assert compile_cel('auth_age > duration("1m")').unknowns(facts(auth_age_s=None)) == {"session"}
    # a string that only looks like a field reference is not one
    assert compile_cel('"fields.amount" == "x" || client_ip_changed').fields() == frozenset()
    assert compile_cel("true").fields() == frozenset()
    assert compile_cel("fields.amount > 1").describe() == "fields.amount > 1"


def test_only_the_fields_named_are_handed_to_cel() -> None:
    # a field the expression does not name cannot break it: 10,000 others cost nothing
    wide = {f"f{i}": object() for i in range(10_000)} | {"amount": "5"}
    assert compile_cel("number(fields.amount) > 1000").holds(facts(wide)) is False


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("1000", 1000.0),
        ("+12", 12.0),
        ("-0.5", -0.5),
        ("1e3", 1000.0),
        ("007", 7.0),
        (1500, 1500.0),
        (Decimal("1000.50"), 1000.5),
        ("123456789012345", 123456789012345.0),
        ("1000.000000000000000", 1000.0),  # trailing zeros are not significant
    ],
)
def test_number(text: object, result: float) -> None:
    assert number(text) == result


@pytest.mark.parametrize(
    "text",
    ["NaN", "Infinity", "inf", "1e999", "1e-400", "-4e-320", "1,000", "", " 5", "0x10",
     "1234567890123456", True],
)  # fmt: skip
def test_number_refuses(text: object) -> None:
    with pytest.raises(ValueError) as info:
        number(text)
    assert str(text) not in str(info.value) or text in ("", True)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.from_regex(r"[+-]?[0-9]{1,20}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?", fullmatch=True),
        st.text(alphabet="0123456789+-.eE_ xn", max_size=12),
        st.integers(min_value=-(10**20), max_value=10**20),
        st.decimals(allow_nan=False, allow_infinity=False),
    )
)
def test_number_is_the_old_grammar_within_a_double(value: object) -> None:
    """number() takes what the old language took as a number, unless a double cannot
    hold it exactly enough to compare (then it raises: unknown, so true)."""
    exact = as_number(value)
    try:
        result = number(value)
    except ValueError:
        assert (
            exact is None
            or len(exact.normalize().as_tuple().digits) > 15
            or not (Decimal("2.2250738585072014e-308") <= abs(exact) <= Decimal("1.8e308"))
        )
        return
    assert exact is not None and result == float(exact)
    assert (result > 0, result < 0) == (exact > 0, exact < 0)  # 1e-400 is not 0


# --- compiling: refusals --------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("fields.amount >", "is not valid CEL: at 1:16: Syntax error"),
        ("amount > 1000 &&", "is not valid CEL"),
        ("fields.amount + 1", "gives int, not true or false"),
        ("nope == 1", "undeclared reference to 'nope'"),
        ("fields", 'name each field as fields.NAME or fields["NAME"]'),
        ("fields[name] == 1", "name each field as fields.NAME"),
        ('fields["a\\"b"] == 1', "a quoted name without escapes"),
        ('"amount" in fields', "name each field"),
        ("fields.all(k, k == 'x')", "name each field"),
        ('ip_in(client_ip, ["10.0.0.1/8"])', "has host bits set; did you mean 10.0.0.0/8?"),
        ('ip_in(client_ip, ["ten"])', "'ten' is not an IP address or network"),
        ('ip_in(client_ip, "10.0.0.0/8")', "no matching overload for 'ip_in'"),
        ("'unterminated", "a string that is not closed"),
        ("\ud800", "not valid text"),
        ("x" * 1001, "at most 1000 characters"),
    ],
)
def test_refusals(source: str, message: str) -> None:
    with pytest.raises(ConditionError) as info:
        compile_cel(source)
    assert message in info.value.message
    assert "\n" not in info.value.message  # one line per problem at check


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["fields", ".", "amount", "[", "]", '"x"', "'y'", "(", ")", "&&", "||", "!", ">",
             "1000", "1.5", "number", "ip_in", "client_ip", ",", "r'", '"""', "//", "\n", " ",
             "has", "size", "in", "auth_age", 'duration("1m")', "?", ":", "\\"]
        ),
        max_size=12,
    )
)  # fmt: skip
def test_the_compiler_raises_only_condition_error(tokens: list[str]) -> None:
    try:
        condition = compile_cel("".join(tokens))
    except ConditionError:
        return
    condition.holds(facts({"amount": "5", "x": "y"}))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_raises_only_condition_error(text: str) -> None:
    with contextlib.suppress(ConditionError):
        parse_when(text)


# --- when: CEL first, the old syntax for a while ---------------------------------------


def test_parse_when_takes_cel_and_the_old_syntax() -> None:
    assert isinstance(parse_when("number(fields.amount) > 1000"), CelCondition)
    assert isinstance(parse_when("client_ip_changed"), CelCondition)  # same in both
    # the old language would read a field named "fields.amount": CEL's reading is meant
    assert isinstance(parse_when("fields.amount > 1000"), CelCondition)
    assert isinstance(parse_when('fields.currency in ["EUR"]'), CelCondition)
    old = parse_when("amount > 1000")
    assert not isinstance(old, CelCondition) and old == parse_condition("amount > 1000")
    assert parse_when(["amount > 1000"]) == parse_condition(["amount > 1000"])


def test_a_when_that_reads_differently_in_each_language_is_refused() -> None:
    with pytest.raises(ConditionError) as info:
        parse_when('client_ip in ["10.0.0.0/8"]')  # CEL: string equality; old: a network
    assert "reads differently in CEL and in the old condition syntax" in info.value.message
    assert 'ip_in(client_ip, ["10.0.0.0/8"])' in info.value.message


def test_invalid_in_both_says_what_each_objects_to() -> None:
    with pytest.raises(ConditionError) as info:
        parse_when("amount >")
    message = info.value.message
    assert "is not valid CEL" in message
    assert "read as the old (deprecated) syntax: a value is missing after >" in message


def test_old_syntax_rewrites_and_notice() -> None:
    class Rule:
        def __init__(self, index: int, when: Condition | None) -> None:
            self.index, self.when = index, when

    rules = [
        Rule(0, parse_when("fields.amount > 1")),
        Rule(1, None),
        Rule(2, parse_when('note == "it\'s"')),
    ]
    assert old_syntax_rewrites(rules) == [("rules[2].when", 'string(fields.note) == "it\'s"')]
    assert rewrite_notice(*old_syntax_rewrites(rules)[0]) == (
        "warning: rules[2].when: the old condition syntax is deprecated and will be removed; "
        "write it in CEL: when: 'string(fields.note) == \"it''s\"'"
    )


# --- check, explain and the gateway, run for real ---------------------------------------

CEL_RULES = """\
rules:
  - name: big-payment
    match: {path: /payments, methods: [POST]}
    when: 'number(fields.amount) > 1000 || fields["payee.iban"].startsWith("XX")'
    require: {level: phishing-resistant, max_age: 5m}
  - name: payment
    match: {path: /payments, methods: [POST]}
    require: {level: password}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""


@pytest.mark.parametrize(
    ("body", "status", "unknown"),
    [
        ({"data": {"amount": "20", "payee.iban": "DE89"}}, 200, None),
        ({"data": {"amount": "1500", "payee.iban": "DE89"}}, 401, None),
        ({"data": {"amount": "20", "payee.iban": "XX00"}}, 401, None),
        # what cannot be evaluated counts as true: the stricter rule (fail closed)
        ({"data": {"amount": "lots", "payee.iban": "DE89"}}, 401, ["amount", "payee.iban"]),
        ({"data": {"amount": "NaN", "payee.iban": "DE89"}}, 401, ["amount", "payee.iban"]),
        ({"data": {"amount": "20"}}, 401, ["payee.iban"]),  # false || error is an error
        ({"data": {"amount": "5000"}}, 401, None),  # true || error is true
        ({"json": {"amount": 20, "payee": {"iban": "DE89"}}}, 200, None),
        ({"json": {"amount": 20.5, "payee": {"iban": "XX00"}}}, 401, None),
        ({"json": {"amount": 1500, "payee": {"iban": "DE89"}}}, 401, None),
    ],
)
async def test_the_gateway_picks_the_rule_with_a_cel_when(
    make_stack, browser, body, status, unknown
):
    from tests.test_gateway import sign_in

    stack = await make_stack(rules=CEL_RULES)
    await sign_in(stack, browser)
    with capture_logs() as logs:
        async with browser.http.post(f"{stack.url}/payments", **body) as resp:
            assert resp.status == status
            if status == 401:
                assert 'acr_values="phr phrh"' in resp.headers["WWW-Authenticate"]
    unknowns = [entry for entry in logs if entry["event"] == "when_unknown"]
    if unknown is None:
        assert unknowns == []
    else:
        expected = {"event": "when_unknown", "rule": "big-payment", "unknown": unknown}
        assert unknowns == [{**expected, "log_level": "info"}]
        assert "lots" not in repr(logs) and "NaN" not in repr(logs)  # names, never values


def test_check_shows_the_cel_for_each_old_when_and_the_rewrite_is_clean(tmp_path) -> None:
    import re

    from tests.test_cli import CONDITIONS, explained_with, gateway, no_traceback

    old_file, new_file = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old_file.write_text(CONDITIONS)
    result = gateway("check", "--config", str(old_file))
    assert (result.returncode, result.stdout) == (0, "ok\n")
    notices = result.stderr.splitlines()
    pattern = r"warning: rules\[(\d)\]\.when: the old condition syntax is deprecated and will be "
    pattern += r"removed; write it in CEL: (when: '.*')"
    found = [re.fullmatch(pattern, line) for line in notices]
    assert all(found), notices
    rewrites = {int(match[1]): match[2] for match in found if match}
    assert rewrites == {
        0: """when: 'number(fields.amount) > 1000 || !ip_in(client_ip, ["10.0.0.0/8"])'""",
        1: """when: 'auth_age > duration("600s")'""",
        3: "when: 'number(fields.amount) > 1000'",
    }
    text = CONDITIONS
    for old_line, index in (
        ('    when: {any: ["amount > 1000", "client_ip not in [10.0.0.0/8]"]}\n', 0),
        ("    when: auth_age > 10m\n", 1),
        ("    when: amount > 1000\n", 3),
    ):
        assert old_line in text
        text = text.replace(old_line, f"    {rewrites[index]}\n")
    new_file.write_text(text)
    result = gateway("check", "--config", str(new_file))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
    # and explain picks the same rules, with the same unknowns, in both
    for args in (
        ["--body", "amount=5000&payee.iban=DE89", "--client-ip", "10.1.2.3"],
        ["--body", "amount=1000.00", "--client-ip", "10.1.2.3"],
        ["--client-ip", "10.1.2.3"],
        ["--body", "amount=50"],
    ):
        old = explained_with(old_file, *args, "POST", "/api/payments/1")
        new = explained_with(new_file, *args, "POST", "/api/payments/1")
        for output in (old, new):
            output.pop("when", None)
            output["skipped"] = [entry["rule"] for entry in output.get("skipped", [])]
        assert new == old, args
    # A field a rule reads, given twice, is refused before any rule is judged, in both.
    for config_file in (old_file, new_file):
        refused = gateway(
            "explain",
            "--config",
            str(config_file),
            "--body",
            "amount=1&amount=5000",
            "POST",
            "/api/payments/1",
        )
        no_traceback(refused)
        assert refused.returncode == 2, refused.stdout


def test_every_when_in_the_readme_and_docs_is_cel() -> None:
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            match = re.search(r"\bwhen: ('.*'|\"[^\"]*\")", line)
            if match and "[" not in match[1][:2]:
                found.append(yaml.safe_load(match[1]))
    assert len(found) >= 4, found
    for text in found:
        assert isinstance(parse_when(text), CelCondition), text


async def test_run_logs_the_cel_for_an_old_when(gateway_process) -> None:  # noqa: F811
    rules = """\
rules:
  - name: big
    match: {path: /payments, methods: [POST]}
    when: amount > 1000
    require: {level: password}
  - name: new
    match: {path: /payees, methods: [POST]}
    when: 'number(fields.amount) > 1000'
    require: {level: password}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""
    process, _url, _path = await gateway_process(rules=rules)
    notices = process.events("when_old_syntax")
    assert [(event["path"], event["cel"], event["level"]) for event in notices] == [
        ("rules[0].when", "number(fields.amount) > 1000", "warning")
    ]


def test_a_compiled_when_is_a_value() -> None:
    same, other = compile_cel("fields.a > 1"), compile_cel("fields.a > 2")
    assert same == compile_cel("fields.a > 1") and hash(same) == hash(compile_cel("fields.a > 1"))
    assert same != other
    assert "program" not in repr(same)
