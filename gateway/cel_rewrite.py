"""The CEL for a condition written in the old ``when`` syntax (shown by ``check``).

The rewrite keeps the old meaning, fail-closed part included, with the functions
:mod:`gateway.cel` adds:

    amount > 1000                  number(fields.amount) > 1000
    currency == EUR                string(fields.currency) == "EUR"
    country not in [DE, FR]        !(string(fields.country) in ["DE", "FR"])
    client_ip in [10.0.0.0/8]      ip_in(client_ip, ["10.0.0.0/8"])
    auth_age > 10m                 auth_age > duration("600s")
    [a, b] / {all: [a, b]}         (a) && (b)
    {any: [a, b]}                  (a) || (b)

``number()`` and ``string()`` turn a value of the wrong type into an error, and an
error counts as true just as "cannot be evaluated" did; CEL's ``&&`` and ``||``
treat an error on one side as the old ``all``/``any`` treated an unknown one. The
one difference: a JSON number compared with text uses CEL's ``string()`` of it
(``5000.0`` reads "5000", where the old language kept "5000.0" as written).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal

from gateway.conditions import (
    AddressChanged,
    AddressIn,
    AllOf,
    AnyOf,
    AuthAge,
    Compare,
    Condition,
    Membership,
    Value,
    parse_duration_s,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# CEL's reserved words (cel-spec langdef.md, "Syntax"): not usable after a dot.
_RESERVED = frozenset(
    [
        "as",
        "break",
        "const",
        "continue",
        "else",
        "false",
        "for",
        "function",
        "if",
        "import",
        "in",
        "let",
        "loop",
        "package",
        "namespace",
        "null",
        "return",
        "true",
        "var",
        "void",
        "while",
    ]
)
_INT64_MAX = 2**63 - 1


def to_cel(condition: Condition) -> str:
    """CEL text meaning what ``condition`` (the old syntax, parsed) means."""
    if isinstance(condition, Compare):
        return _compare(condition)
    if isinstance(condition, Membership):
        return _membership(condition)
    if isinstance(condition, AddressIn):
        networks = ", ".join(json.dumps(str(network)) for network in condition.networks)
        inside = f"ip_in(client_ip, [{networks}])"
        return f"!{inside}" if condition.negated else inside
    if isinstance(condition, AddressChanged):
        return "client_ip_changed"
    if isinstance(condition, AuthAge):
        seconds = parse_duration_s(condition.text)
        return f'auth_age {condition.op} duration("{seconds}s")'
    if isinstance(condition, AllOf | AnyOf):
        joiner = " && " if isinstance(condition, AllOf) else " || "
        parts = [_grouped(child) for child in condition.conditions]
        return (
            parts[0] if len(parts) == 1 and not isinstance(condition, AnyOf) else joiner.join(parts)
        )
    raise TypeError(f"not an old-syntax condition: {type(condition).__name__}")


def _grouped(child: Condition) -> str:
    text = to_cel(child)
    if isinstance(child, AllOf | AnyOf) and len(child.conditions) > 1:
        return f"({text})"
    return text


def field(name: str) -> str:
    """``fields.amount``; ``fields["beneficiary.iban"]`` for names CEL cannot select."""
    if _IDENT.fullmatch(name) and name not in _RESERVED:
        return f"fields.{name}"
    return f"fields[{json.dumps(name)}]"


def _literal(value: Value) -> str:
    if value.number is None:
        return json.dumps(value.text, ensure_ascii=False)
    return _number(value.number)


def _number(number: Decimal) -> str:
    if number == number.to_integral_value() and abs(number) <= _INT64_MAX:
        return str(int(number))
    return repr(float(number))


def _compare(condition: Compare) -> str:
    convert = "number" if condition.value.number is not None else "string"
    return f"{convert}({field(condition.field)}) {condition.op} {_literal(condition.value)}"


def _membership(condition: Membership) -> str:
    numbers = [value for value in condition.values if value.number is not None]
    texts = [value for value in condition.values if value.number is None]
    parts = []
    if texts:
        items = ", ".join(_literal(value) for value in texts)
        parts.append(f"string({field(condition.field)}) in [{items}]")
    if numbers:
        items = ", ".join(_literal(value) for value in numbers)
        parts.append(f"number({field(condition.field)}) in [{items}]")
    inside = " || ".join(parts)
    if condition.negated:
        return f"!({inside})"
    return inside if len(parts) == 1 else f"({inside})"
