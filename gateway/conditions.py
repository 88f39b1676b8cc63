"""Risk conditions: ``when:`` makes a rule apply only to riskier requests.

This module parses the old ``when`` syntax into the tree of
:mod:`gateway.condition_tree` (whose names it re-exports). The old syntax is deprecated:
``when`` is CEL now (:mod:`gateway.cel`), and ``check`` shows the CEL for each condition
written this way (:mod:`gateway.cel_rewrite`). A small declarative language, parsed once
at start-up by a hand-written tokenizer and a recursive-descent parser; nothing is ever
passed to ``eval``. Pure: no I/O.

Grammar
    In YAML, ``when`` is a condition string, a list of them (all must hold), or
    ``{any: [...]}`` / ``{all: [...]}``, which nest::

        when     := CONDITION | [when, ...] | {any: [when, ...]} | {all: [when, ...]}
        CONDITION:= FIELD OP VALUE                     amount > 1000, currency == EUR
                  | FIELD [not] in [VALUE, ...]        country not in [DE, FR]
                  | client_ip [not] in [CIDR, ...]     client_ip in [10.0.0.0/8, ::1]
                  | client_ip_changed
                  | auth_age ORDER DURATION            auth_age > 10m, auth_age >= 300
        OP       := ORDER | == | !=
        ORDER    := > | >= | < | <=
        FIELD    := [A-Za-z_][A-Za-z0-9_.-]*           beneficiary.iban reaches into JSON
        VALUE    := NUMBER | WORD | "quoted" | 'quoted'   (\\ \" \' escape in quotes)
        DURATION := whole seconds (300) or a number with units s, m, h, d (10m, 1h30m)

    ``client_ip``, ``client_ip_changed`` and ``auth_age`` are facts about the
    request and the session, not request fields. Numbers (``-?digits[.digits][e±N]``)
    compare as :class:`decimal.Decimal`, so ``1000.00 == 1000`` and ``0.1 + 0.2``
    surprises cannot happen; ``>``, ``>=``, ``<`` and ``<=`` need a number. A quoted
    value is always a string: ``== "1000"`` compares text. Text compares exactly
    (case-sensitive).

Fail closed
    A rule with ``when`` is the riskier one, placed before an ordinary rule for
    the same requests. So a condition that cannot be evaluated -- the field is
    missing, given twice with different values, not a number where one is
    needed, an object; no session for ``auth_age`` or ``client_ip_changed``; no
    client address -- counts as TRUE: the stricter rule applies. ``any`` and
    ``all`` only combine, and there is deliberately no ``not`` around a whole
    condition, so "cannot tell" always makes the stricter rule more likely, never
    less. (``!=`` and ``not in`` are single conditions and follow the same rule.)

"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from gateway.condition_tree import (  # the tree the old syntax is parsed into
    EQUALITY_OPS,
    MAX_NUMBER_CHARS,
    NUMBER_PATTERN,
    AddressChanged,
    AddressIn,
    AllOf,
    AnyOf,
    AuthAge,
    Compare,
    Condition,
    Description,
    Facts,
    IPAddress,
    IPNetwork,
    Membership,
    Value,
    as_number,
    as_text,
)

__all__ = [  # the tree's names stay importable from here, where they always were
    "EQUALITY_OPS",
    "MAX_CONDITION_CHARS",
    "MAX_DEPTH",
    "MAX_LIST_ITEMS",
    "MAX_NUMBER_CHARS",
    "NUMBER_PATTERN",
    "ORDER_OPS",
    "AddressChanged",
    "AddressIn",
    "AllOf",
    "AnyOf",
    "AuthAge",
    "Compare",
    "Condition",
    "ConditionError",
    "Description",
    "Facts",
    "IPAddress",
    "IPNetwork",
    "Membership",
    "Value",
    "as_number",
    "as_text",
    "is_field_name",
    "parse_condition",
    "parse_duration_s",
]

# --- Limits, and why ------------------------------------------------------------------

# A condition is a line of config; anything longer is a mistake (or a pasted file).
MAX_CONDITION_CHARS = 1000
# A CIDR list of a few hundred networks is realistic; a thousand values is a lookup
# table, which belongs in a risk engine.
MAX_LIST_ITEMS = 1000
# any/all nesting; real policies use two or three levels.
MAX_DEPTH = 16

ORDER_OPS = (">", ">=", "<", "<=")

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_SECONDS = re.compile(r"[0-9]{1,9}")
_DURATION = re.compile(r"(?:[0-9]{1,9}[smhd])+")
_DURATION_PART = re.compile(r"([0-9]+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 60 * 60, "d": 24 * 60 * 60}
_PUNCTUATION = "[],"
_OPERATOR_CHARS = "<>=!"
_QUOTES = "'\""


class ConditionError(ValueError):
    """A ``when`` that cannot be parsed.

    ``where`` locates the offending part inside the ``when`` value: list indexes
    and ``"any"``/``"all"`` keys, e.g. ``("any", 1)``; the config loader turns it
    into ``rules[3].when.any[1]`` and a line number.
    """

    def __init__(self, message: str, where: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.where = where


_SHAPE_HINT = (
    "write a condition like 'amount > 1000', a list of them (all must hold), "
    "or {any: [...]} / {all: [...]}"
)


def parse_condition(node: object) -> Condition:
    """Parse a ``when`` value (a string, a list, or an ``any``/``all`` mapping).

    Raises :class:`ConditionError` with a message an operator can act on.
    """
    return _parse_node(node, (), 0)


def _parse_node(node: object, where: tuple[str | int, ...], depth: int) -> Condition:
    if depth > MAX_DEPTH:
        raise ConditionError(f"nested more than {MAX_DEPTH} levels deep", where)
    if isinstance(node, str):
        try:
            return _parse_text(node)
        except ConditionError as exc:
            raise ConditionError(exc.message, where) from None
    if isinstance(node, list | tuple):
        return AllOf(_parse_items(node, where, depth), listed=True)
    if isinstance(node, Mapping):
        keys = list(node)
        if len(keys) != 1 or keys[0] not in ("any", "all"):
            shown = ", ".join(repr(key) for key in keys) or "none"
            raise ConditionError(
                f"a mapping here takes exactly one key, any or all (got {shown})", where
            )
        key: str = keys[0]
        items = node[key]
        if not isinstance(items, list | tuple):
            raise ConditionError(f"{key} takes a list of conditions", (*where, key))
        children = _parse_items(items, (*where, key), depth)
        return AnyOf(children) if key == "any" else AllOf(children, listed=False)
    shown = "no value" if node is None else json.dumps(node, default=repr)
    raise ConditionError(f"expected a condition, got {shown}: {_SHAPE_HINT}", where)


def _parse_items(
    items: Sequence[object], where: tuple[str | int, ...], depth: int
) -> tuple[Condition, ...]:
    if not items:
        raise ConditionError("an empty list of conditions", where)
    if len(items) > MAX_LIST_ITEMS:
        raise ConditionError(f"more than {MAX_LIST_ITEMS} conditions", where)
    return tuple(_parse_node(item, (*where, i), depth + 1) for i, item in enumerate(items))


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word" | "string" | "op" | "[" | "]" | ","
    text: str


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, end = 0, len(text)
    while i < end:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in _PUNCTUATION:
            tokens.append(_Token(char, char))
            i += 1
        elif char in _OPERATOR_CHARS:
            op = text[i : i + 2] if text[i : i + 2] in (">=", "<=", "==", "!=") else char
            if op in ("=", "!"):
                hint = "use == to compare" if op == "=" else "use != or 'not in'"
                raise ConditionError(f"unexpected {op!r} in {text!r}: {hint}")
            tokens.append(_Token("op", op))
            i += len(op)
        elif char in _QUOTES:
            value, i = _quoted(text, i)
            tokens.append(_Token("string", value))
        elif char.isprintable():
            start = i
            while i < end and not _ends_word(text[i]):
                i += 1
            tokens.append(_Token("word", text[start:i]))
        else:
            raise ConditionError(f"unexpected character {char!r} in {text!r}")
    return tokens


def _ends_word(char: str) -> bool:
    return (
        char.isspace()
        or char in _PUNCTUATION
        or char in _OPERATOR_CHARS
        or char in _QUOTES
        or not char.isprintable()
    )


def _quoted(text: str, start: int) -> tuple[str, int]:
    quote, i = text[start], start + 1
    chars: list[str] = []
    while i < len(text):
        char = text[i]
        if char == quote:
            return "".join(chars), i + 1
        if char == "\\":
            following = text[i + 1 : i + 2]
            if following not in ("\\", '"', "'"):
                raise ConditionError(
                    f"unknown escape \\{following} in a quoted value in {text!r}: "
                    "only \\\\, \\\" and \\' are escapes"
                )
            chars.append(following)
            i += 2
            continue
        chars.append(char)
        i += 1
    raise ConditionError(f"unterminated quoted value in {text!r}")


def _parse_text(text: str) -> Condition:
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionError(f"a condition is at most {MAX_CONDITION_CHARS} characters")
    tokens = _tokenize(text)
    if not tokens:
        raise ConditionError("an empty condition: " + _SHAPE_HINT)
    first = tokens[0]
    if first.kind == "word" and first.text == "not":
        raise ConditionError(
            f"{text!r}: there is no 'not' before a condition (a condition that cannot be "
            "evaluated counts as true, and 'not' would turn that into false); "
            "use != or 'not in', or put the rule after the one it excludes"
        )
    if first.kind != "word" or not is_field_name(first.text):
        raise ConditionError(
            f"{text!r} must start with a field name ([A-Za-z_][A-Za-z0-9_.-]*), "
            "client_ip, client_ip_changed or auth_age"
        )
    name, rest = first.text, tokens[1:]
    if name == "client_ip_changed":
        if rest:
            raise ConditionError(f"{text!r}: client_ip_changed takes no operator or value")
        return AddressChanged()
    if not rest:
        raise ConditionError(
            f"{text!r} is a name alone: compare it, e.g. '{name} > 1000' or '{name} in [a, b]'"
        )
    operator = rest[0]
    if operator.kind == "op":
        if len(rest) < 2:
            raise ConditionError(f"{text!r}: a value is missing after {operator.text}")
        if rest[1].kind not in ("word", "string"):
            raise ConditionError(
                f"{text!r}: expected a value after {operator.text}, got {_show(rest[1])}"
            )
        if len(rest) > 2:
            raise ConditionError(f"{text!r}: unexpected {_show(rest[2])} after the value")
        if name == "client_ip":
            raise ConditionError(
                f"{text!r}: compare client_ip with 'in' or 'not in' and a list of networks, "
                "e.g. client_ip in [10.0.0.0/8]"
            )
        if name == "auth_age":
            return _auth_age(text, operator.text, rest[1])
        return _compare(text, name, operator.text, rest[1])
    negated = operator.kind == "word" and operator.text == "not"
    if negated:
        rest = rest[1:]
        operator = rest[0] if rest else _Token("word", "")
    if not (operator.kind == "word" and operator.text == "in"):
        expected = "'in'" if negated else "an operator (> >= < <= == !=) or 'in'"
        raise ConditionError(f"{text!r}: expected {expected} after {name!r}, got {_show(operator)}")
    items = _list(text, rest[1:])
    if name == "auth_age":
        raise ConditionError(f"{text!r}: auth_age takes > >= < <= and a duration, e.g. > 10m")
    if name == "client_ip":
        return AddressIn(negated, tuple(_network(text, item) for item in items))
    return Membership(name, negated, tuple(_value(item) for item in items))


def is_field_name(name: str) -> bool:
    """A valid FIELD: ``[A-Za-z_][A-Za-z0-9_.-]*`` with no empty dotted part."""
    return bool(_FIELD.fullmatch(name)) and "" not in name.split(".")


def _show(token: _Token) -> str:
    if not token.text:
        return "nothing"
    return repr(token.text) if token.kind != "string" else f"the quoted value {token.text!r}"


def _value(token: _Token) -> Value:
    if token.kind == "string":
        return Value(token.text, quoted=True, number=None)
    number = None
    if len(token.text) <= MAX_NUMBER_CHARS and NUMBER_PATTERN.fullmatch(token.text):
        number = Decimal(token.text)
    return Value(token.text, quoted=False, number=number)


def _literal(text: str, token: _Token) -> Value:
    if token.kind not in ("word", "string"):
        raise ConditionError(f"{text!r}: expected a value, got {_show(token)}")
    if token.kind == "word" and token.text in ("in", "not"):
        raise ConditionError(f"{text!r}: expected a value, got {token.text!r}")
    return _value(token)


def _compare(text: str, name: str, op: str, token: _Token) -> Compare:
    value = _literal(text, token)
    if op in ORDER_OPS and value.number is None:
        what = "a quoted string" if value.quoted else repr(value.text)
        raise ConditionError(f"{text!r}: {op} needs a number, got {what}")
    return Compare(name, op, value)


def _auth_age(text: str, op: str, token: _Token) -> AuthAge:
    if op not in ORDER_OPS:
        raise ConditionError(f"{text!r}: auth_age takes > >= < <=, not {op}")
    seconds = parse_duration_s(token.text) if token.kind == "word" else None
    if seconds is None:
        raise ConditionError(
            f"{text!r}: auth_age needs a duration: whole seconds (300) or a number with "
            "a unit s, m, h or d (10m, 1h30m)"
        )
    return AuthAge(op, seconds, token.text)


def _list(text: str, tokens: list[_Token]) -> list[_Token]:
    if not tokens or tokens[0].kind != "[":
        raise ConditionError(f"{text!r}: 'in' takes a list in brackets, e.g. [a, b]")
    if tokens[-1].kind != "]":
        raise ConditionError(f"{text!r}: the list must end with ']' and nothing may follow it")
    inner = tokens[1:-1]
    if not inner:
        raise ConditionError(f"{text!r}: an empty list")
    items: list[_Token] = []
    for position, token in enumerate(inner):
        if position % 2:
            if token.kind != ",":
                raise ConditionError(f"{text!r}: expected ',' between values, got {_show(token)}")
            continue
        _literal(text, token)
        items.append(token)
    if inner[-1].kind == ",":
        raise ConditionError(f"{text!r}: a value is missing after the last ','")
    if len(items) > MAX_LIST_ITEMS:
        raise ConditionError(f"{text!r}: at most {MAX_LIST_ITEMS} values")
    return items


def _network(text: str, token: _Token) -> IPNetwork:
    try:
        return ipaddress.ip_network(token.text.strip(), strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(token.text.strip(), strict=False)
        except ValueError:
            raise ConditionError(
                f"{text!r}: {token.text!r} is not an IP address or network (CIDR like 10.0.0.0/8)"
            ) from None
        raise ConditionError(
            f"{text!r}: {token.text!r} has host bits set; did you mean {loose}?"
        ) from None


def parse_duration_s(text: str) -> int | None:
    """``"300"``, ``"90s"``, ``"10m"``, ``"12h"``, ``"1d"``, ``"1h30m"`` -> seconds; else None."""
    if _SECONDS.fullmatch(text):
        return int(text)
    if not _DURATION.fullmatch(text):
        return None
    return sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))
