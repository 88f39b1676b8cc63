"""``when`` in CEL: compile once at start-up, evaluate per request, fail closed.

CEL (the Common Expression Language, https://cel.dev) is what Envoy, Kubernetes,
Istio and Google's IAP use for conditions, so platform teams already write it. The
runtime is Google's CEL-C++ (the one inside Envoy) through ``cel-expr-python``;
expressions are parsed and type-checked by :func:`compile_cel` when the config is
loaded, never at request time, and nothing is ever passed to Python's ``eval``.

What an expression sees
    ``fields``             map: the request's fields (body, then query; ``extract_fields``);
                           ``fields.amount`` or ``fields["beneficiary.iban"]``. Form and query
                           values are strings, JSON values keep their JSON type.
    ``client_ip``          string: the client's address
    ``client_ip_changed``  bool: the client is not where the session's last proof came from
    ``auth_age``           duration since the session's last authentication:
                           ``auth_age > duration("10m")``
    ``number(v)``          a number from a string or a number, by the grammar today's
                           language used (``-?digits[.digits][e±N]``; no NaN, no Infinity),
                           so ``number(fields.amount) > 1000`` works for forms and JSON alike
    ``ip_in(ip, [CIDR, ...])``  whether ``ip`` is inside one of the networks

Fail closed
    A rule with ``when`` is the stricter rule, placed before an ordinary one. An
    expression whose evaluation errors -- a missing field, ``null`` or text where a
    number is needed, a fact that is unknown (no session, no client address) --
    counts as TRUE, so the stricter rule applies; so does a result that is not a
    bool. CEL's own ``&&`` and ``||`` already absorb an error when the other side
    decides (``false && error`` is false), exactly as today's ``all``/``any``. Note
    that CEL's ``==`` between different types is false, not an error: compare form
    numbers through ``number()``.

Only the fields an expression names are converted and handed to CEL (they are
found by a scan of the source, which also refuses ``fields`` used any other way),
so a form with many fields costs no more than one with few.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from cel_expr_python import cel

from gateway.cel_rewrite import to_cel
from gateway.conditions import (
    MAX_CONDITION_CHARS,
    MAX_LIST_ITEMS,
    MAX_NUMBER_CHARS,
    AddressChanged,
    AddressIn,
    Condition,
    ConditionError,
    Description,
    Facts,
    as_number,
    parse_condition,
)

FIELDS = "fields"
FACTS = ("client_ip", "client_ip_changed", "auth_age")
# A double holds every decimal of up to 15 significant digits exactly enough that two
# different ones stay different and in order (IEEE 754 binary64: DBL_DIG = 15). Longer
# numbers are refused, so a comparison never flips on rounding (the error counts as true).
MAX_SIGNIFICANT_DIGITS = 15
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# JSON nesting handed to CEL; deeper makes the condition unknown. The same depth the field
# extractor flattens dotted names to: real request bodies nest a few levels.
MAX_VALUE_DEPTH = 32

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# gateway.conditions' number grammar, with the digits before and after the point grouped.
_NUMBER_TEXT = re.compile(r"[+-]?([0-9]+)(?:\.([0-9]+))?(?:[eE][+-]?[0-9]{1,4})?")
_STRING_PREFIX = re.compile(r"(?:[rRbB]|[rR][bB]|[bB][rR])?(?:'''|\"\"\"|'|\")")


class _Unconvertible(ValueError):
    """A request value CEL cannot be given faithfully: the condition is then unknown."""


# --- Functions the gateway adds --------------------------------------------------------


def number(value: object) -> float:
    """``number(v)``: text or a number as a double; refuses what would compare wrongly.

    Text follows the old language's number grammar (JSON's, plus a leading ``+`` and
    leading zeros that forms carry). The messages name no value: they reach logs.
    """
    if isinstance(value, str):
        match = _NUMBER_TEXT.fullmatch(value) if len(value) <= MAX_NUMBER_CHARS else None
        if match is None:
            raise ValueError("number(): not a number")
        significant = (match[1] + (match[2] or "")).strip("0")
        result = float(value)
    elif isinstance(value, bool):
        raise ValueError("number() takes text or a number, not a bool")
    elif isinstance(value, float):  # a CEL double: already what CEL compares
        significant, result = "", value
    else:
        exact = as_number(value)  # int, Decimal
        if exact is None:
            raise ValueError("number(): not a number")
        significant = "".join(map(str, exact.normalize().as_tuple().digits)).strip("0")
        result = float(exact)
    if len(significant) > MAX_SIGNIFICANT_DIGITS:
        raise ValueError(f"number(): more than {MAX_SIGNIFICANT_DIGITS} significant digits")
    # Beyond a double's normal range: 1e999 overflows, 1e-400 would become 0 (or lose
    # digits as a subnormal), and 1e-400 > 0 would turn false.
    if not math.isfinite(result) or (significant and abs(result) < sys.float_info.min):
        raise ValueError("number(): beyond the range of a double")
    return result


@functools.lru_cache(maxsize=256)
def _networks(
    texts: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(text.strip(), strict=True) for text in texts)


def ip_in(address_text: str, networks: list[str]) -> bool:
    """``ip_in(ip, [CIDR, ...])``; ``::ffff:10.0.0.1`` is 10.0.0.1 (a dual-stack socket)."""
    try:
        address = ipaddress.ip_address(address_text.strip())
    except ValueError:
        raise ValueError("ip_in(): not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(tuple(networks)))


@functools.cache
def environment() -> Any:
    """The one CEL environment: the variables and functions above, type-checked."""
    types = cel.Type
    number_overloads = [
        # Returns dyn, not double, so `number(x) > 1000` type-checks (CEL compares
        # int and double at run time, but its checker wants one type on each side).
        cel.Overload(
            f"gateway_number_{name}", return_type=types.DYN, parameters=[kind], impl=number
        )
        for name, kind in (
            ("string", types.STRING),
            ("int", types.INT),
            ("uint", types.UINT),
            ("double", types.DOUBLE),
        )
    ]
    ip_in_overload = cel.Overload(
        "gateway_ip_in",
        return_type=types.BOOL,
        parameters=[types.STRING, types.List(types.STRING)],
        impl=ip_in,
    )
    return cel.NewEnv(
        variables={
            FIELDS: types.Map(types.STRING, types.DYN),
            "client_ip": types.STRING,
            "client_ip_changed": types.BOOL,
            "auth_age": types.DURATION,
        },
        functions=[
            cel.FunctionDecl("number", number_overloads),
            cel.FunctionDecl("ip_in", [ip_in_overload]),
        ],
    )


# --- The condition ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CelCondition(Condition):
    """A compiled CEL ``when``. Build with :func:`compile_cel`."""

    source: str
    # cel_expr_python Expression, compiled and checked once; the source is its identity
    program: Any = field(compare=False, repr=False)
    field_names: frozenset[str]
    facts_used: frozenset[str]

    def evaluate(self, facts: Facts) -> bool | None:
        data: dict[str, object] = {}
        if self.field_names:
            try:
                data[FIELDS] = _cel_fields(self.field_names, facts.fields)
            except _Unconvertible:
                # Not left out, which has() would read as "absent" (false): unknown.
                return None
        if "client_ip" in self.facts_used and facts.client_ip is not None:
            data["client_ip"] = facts.client_ip
        if "client_ip_changed" in self.facts_used:
            changed = AddressChanged().evaluate(facts)
            if changed is not None:
                data["client_ip_changed"] = changed
        age = facts.auth_age_s
        if "auth_age" in self.facts_used and age is not None and math.isfinite(age):
            # beyond timedelta's 999,999,999 days: left out, so unknown
            with contextlib.suppress(OverflowError):
                data["auth_age"] = datetime.timedelta(seconds=age)
        try:
            value = self.program.eval(data=data).value()
        except Exception:  # the runtime's own failure: fail closed as well
            return None
        # An error value (a missing field, a type CEL has no overload for) or a result
        # that is not a bool: unknown, which holds() takes as true.
        return value if isinstance(value, bool) else None

    def fields(self) -> frozenset[str]:
        return self.field_names

    def unknowns(self, facts: Facts) -> frozenset[str]:
        if self.evaluate(facts) is not None:
            return frozenset()
        missing = {name for name in self.field_names if name not in facts.fields}
        if "client_ip" in self.facts_used and facts.client_ip is None:
            missing.add("client_ip")
        if "auth_age" in self.facts_used and facts.auth_age_s is None:
            missing.add("session")
        if "client_ip_changed" in self.facts_used:
            missing |= AddressChanged().unknowns(facts)
        # Nothing missing: a value of the wrong type; name what the expression reads.
        return frozenset(missing or self.field_names or self.facts_used or {"expression"})

    def describe(self) -> Description:
        return self.source


def _cel_fields(names: frozenset[str], fields: Mapping[str, object]) -> dict[str, object]:
    converted: dict[str, object] = {}
    for name in names:
        if name not in fields:
            continue
        converted[name] = _cel_value(fields[name], 0)
    return converted


def _cel_value(value: object, depth: int) -> object:
    """A request value as CEL takes it: JSON types as they are, numbers kept exact."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return value
        raise _Unconvertible("an integer beyond int64")
    if isinstance(value, Decimal | float):
        try:
            return number(value)
        except ValueError:
            raise _Unconvertible("a number a double cannot hold") from None
    if depth >= MAX_VALUE_DEPTH:
        raise _Unconvertible("nested too deeply")
    if isinstance(value, Mapping):
        return {str(key): _cel_value(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cel_value(item, depth + 1) for item in value]
    raise _Unconvertible(type(value).__name__)


# --- Compiling --------------------------------------------------------------------------


def compile_cel(source: str) -> CelCondition:
    """Parse and type-check a CEL ``when``; :class:`ConditionError` says what is wrong."""
    if len(source) > MAX_CONDITION_CHARS:
        raise ConditionError(f"a condition is at most {MAX_CONDITION_CHARS} characters")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from YAML escapes: not text CEL takes
        raise ConditionError(f"{source!r} is not valid text (a lone surrogate)") from None
    tokens = _tokens(source)
    field_names = _field_references(source, tokens)
    _check_networks(source, tokens)
    try:
        program = environment().compile(source)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConditionError(_cel_message(source, str(exc))) from None
    returns = program.return_type().name()
    if returns not in ("bool", "BOOL", "dyn", "DYN"):
        raise ConditionError(f"{source!r} gives {returns.lower()}, not true or false")
    identifiers = {token.text for token in tokens if token.kind == "ident"}
    return CelCondition(
        source=source,
        program=program,
        field_names=field_names,
        facts_used=frozenset(name for name in FACTS if name in identifiers),
    )


def _cel_message(source: str, text: str) -> str:
    """The checker's message on one line: ``1:14: Syntax error: ...``."""
    found = re.findall(r"ERROR: <input>:(\d+:\d+): ([^\n]*)", text)
    if not found:
        return f"{source!r}: not valid CEL ({text.splitlines()[0] if text else 'no reason'})"
    parts = "; ".join(f"at {where}: {message.strip()}" for where, message in found)
    return f"{source!r} is not valid CEL: {parts}"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "ident" | "string" | "other"
    text: str  # the identifier, the string's decoded text (None-free), or the character
    escaped: bool = False  # a string with a backslash: its text is not decoded here


def _tokens(source: str) -> list[_Token]:
    """Just enough of CEL's lexer to tell identifiers from what is inside strings."""
    tokens: list[_Token] = []
    i, end = 0, len(source)
    while i < end:
        char = source[i]
        if char.isspace():
            i += 1
        elif source.startswith("//", i):  # a comment, to the end of the line
            newline = source.find("\n", i)
            i = end if newline < 0 else newline + 1
        elif prefix := _STRING_PREFIX.match(source, i):
            token, i = _string(source, i, prefix.group())
            tokens.append(token)
        elif ident := _IDENT.match(source, i):
            tokens.append(_Token("ident", ident.group()))
            i = ident.end()
        else:
            tokens.append(_Token("other", char))
            i += 1
    return tokens


def _string(source: str, start: int, prefix: str) -> tuple[_Token, int]:
    quote = prefix.lstrip("rRbB")
    raw = any(char in "rR" for char in prefix[: -len(quote)])
    i, escaped = start + len(prefix), False
    while i < len(source):
        if source.startswith(quote, i):
            text = source[start + len(prefix) : i]
            return _Token("string", text, escaped), i + len(quote)
        if source[i] == "\\":
            escaped = True
            i += 1 if raw else 2
            continue
        if source[i] == "\n" and len(quote) == 1:
            break
        i += 1
    raise ConditionError(f"{source!r}: a string that is not closed")


def _field_references(source: str, tokens: list[_Token]) -> frozenset[str]:
    """The fields named as ``fields.NAME`` or ``fields["NAME"]``; any other use is refused.

    The gateway reads the body, hands fields to CEL and tells a risk engine what a
    rule read by these names, so every field an expression may touch must be named.
    """
    names: set[str] = set()
    for index, token in enumerate(tokens):
        if token.kind != "ident" or token.text != FIELDS:
            continue
        if index and tokens[index - 1].text == ".":
            continue  # x.fields: a member called "fields", not the variable
        rest = tokens[index + 1 : index + 4]
        method_call = len(rest) == 3 and rest[2].text == "("  # fields.all(k, ...), a macro
        if len(rest) >= 2 and rest[0].text == "." and rest[1].kind == "ident" and not method_call:
            names.add(rest[1].text)
            continue
        if (
            len(rest) == 3
            and rest[0].text == "["
            and rest[1].kind == "string"
            and not rest[1].escaped
            and rest[2].text == "]"
        ):
            names.add(rest[1].text)
            continue
        raise ConditionError(
            f'{source!r}: name each field as fields.NAME or fields["NAME"] '
            "(a quoted name without escapes), so the gateway knows what the rule reads"
        )
    return frozenset(names)


def _check_networks(source: str, tokens: list[_Token]) -> None:
    """Every string inside ``ip_in(...)`` must be a network: a typo is an error at check."""
    for index, token in enumerate(tokens):
        if not (token.kind == "ident" and token.text == "ip_in"):
            continue
        if index + 1 >= len(tokens) or tokens[index + 1].text != "(":
            continue
        depth, count = 0, 0
        for inner in tokens[index + 1 :]:
            if inner.text in "([" and inner.kind == "other":
                depth += 1
            elif inner.text in ")]" and inner.kind == "other":
                depth -= 1
                if depth == 0:
                    break
            elif inner.kind == "string":
                count += 1
                _network(source, inner.text)
        if count > MAX_LIST_ITEMS:
            raise ConditionError(f"{source!r}: at most {MAX_LIST_ITEMS} networks")


def _network(source: str, text: str) -> None:
    try:
        ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ConditionError(
                f"{source!r}: {text!r} is not an IP address or network (CIDR like 10.0.0.0/8)"
            ) from None
        raise ConditionError(
            f"{source!r}: {text!r} has host bits set; did you mean {loose}?"
        ) from None


# --- when: CEL, or the old syntax for a while ---------------------------------------------


def parse_when(node: object) -> Condition:
    """A ``when`` value: a CEL string, or (deprecated) the old syntax.

    A string is CEL when it compiles as CEL. Otherwise the old language is tried; a
    list or an ``any``/``all`` mapping is always the old language. A string that is
    valid in both but means something else in each is refused, with the CEL for the
    old reading.
    """
    if not isinstance(node, str):
        return parse_condition(node)
    try:
        compiled = compile_cel(node)
    except ConditionError as cel_error:
        try:
            return parse_condition(node)
        except ConditionError as old_error:
            # Both readings fail: say what each language objects to, CEL first.
            reason = old_error.message.removeprefix(f"{node!r}: ")
            raise ConditionError(
                f"{cel_error.message}; read as the old (deprecated) syntax: {reason}"
            ) from None
    try:
        old = parse_condition(node)
    except ConditionError:
        return compiled
    # Valid in both: `fields.amount > 1000` (the old language read a field literally named
    # "fields.amount": CEL's reading is the one meant) and `client_ip_changed` (the same
    # fact) are CEL. Only `client_ip in ["10.0.0.0/8"]` means something else in CEL (text
    # equality, not a network), and silently so: refused.
    if not isinstance(old, AddressIn):
        return compiled
    raise ConditionError(
        f"{node!r} reads differently in CEL and in the old condition syntax; "
        f"for the old meaning write {to_cel(old)!r}"
    )


def old_syntax_rewrites(rules: Iterable[Any]) -> list[tuple[str, str]]:
    """``(rules[i].when, CEL)`` for each rule whose ``when`` is in the old syntax."""
    return [
        (f"rules[{rule.index}].when", to_cel(rule.when))
        for rule in rules
        if rule.when is not None and not isinstance(rule.when, CelCondition)
    ]


def rewrite_notice(path: str, rewrite: str) -> str:
    """What ``check`` prints for an old-syntax ``when``: the line to paste instead."""
    quoted = "'" + rewrite.replace("'", "''") + "'"  # a YAML single-quoted scalar
    return (
        f"warning: {path}: the old condition syntax is deprecated and will be removed; "
        f"write it in CEL: when: {quoted}"
    )
