"""Parsed ``when`` conditions and how they are evaluated (the old syntax's tree).

:mod:`gateway.conditions` parses the old syntax into these; :mod:`gateway.cel`
evaluates CEL with the same :class:`Facts` and the same fail-closed meaning: a
condition that cannot be evaluated counts as true, so the stricter rule applies.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

# A number's text; longer ones are not amounts (and bound Decimal's work).
MAX_NUMBER_CHARS = 64
EQUALITY_OPS = ("==", "!=")
# JSON's number grammar, plus a leading "+" and leading zeros that form fields carry.
NUMBER_PATTERN = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]{1,4})?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Description = str | list["Description"] | dict[str, list["Description"]]


@dataclass(frozen=True, slots=True)
class Facts:
    """What conditions are evaluated against.

    ``fields`` is the flat mapping :func:`extract_fields` builds; ``proven_ip`` the
    client address the session's last proof was made from; ``auth_age_s`` the
    seconds since the session's last authentication. ``None`` means unknown (no
    session, no address), which makes the conditions that need it TRUE.
    """

    fields: Mapping[str, object]
    client_ip: str | None = None
    proven_ip: str | None = None
    auth_age_s: float | None = None


class Condition:
    """A parsed ``when``. Build with :func:`parse_condition`."""

    __slots__ = ()

    def holds(self, facts: Facts) -> bool:
        """True when the rule applies; anything that cannot be evaluated counts as true."""
        return self.evaluate(facts) is not False

    def evaluate(self, facts: Facts) -> bool | None:
        """True, False, or None when it cannot be evaluated (which :meth:`holds` takes as true)."""
        raise NotImplementedError

    def fields(self) -> frozenset[str]:
        """The request fields this condition reads (empty: the body need not be read)."""
        return frozenset()

    def unknowns(self, facts: Facts) -> frozenset[str]:
        """What could not be evaluated: field names, ``session`` or ``client_ip`` (for explain)."""
        return frozenset()

    def describe(self) -> Description:
        """JSON-able, and parseable again: a string, a list (all) or ``{"any"|"all": [...]}``."""
        raise NotImplementedError


# --- Values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Value:
    """A literal in a condition. ``number`` is set for an unquoted number."""

    text: str
    quoted: bool
    number: Decimal | None

    def render(self) -> str:
        if not self.quoted:
            return self.text
        return '"' + self.text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    def equals(self, value: object) -> bool | None:
        """Whether a request value equals this literal; None when it cannot tell.

        An unquoted number compares numerically, so a value that is not a number
        cannot be compared with it.
        """
        if self.number is not None:
            number = as_number(value)
            return None if number is None else number == self.number
        text = as_text(value)
        if text is None:
            return None
        return text == self.text


def as_number(value: object) -> Decimal | None:
    """A request value as a finite Decimal, or None (bools, objects, non-numeric text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if (
        isinstance(value, str)
        and len(value) <= MAX_NUMBER_CHARS
        and NUMBER_PATTERN.fullmatch(value)
    ):
        return Decimal(value)
    return None


def as_text(value: object) -> str | None:
    """A scalar request value as text (JSON ``true`` -> ``"true"``), else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _address(text: str | None) -> IPAddress | None:
    if text is None:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 on a dual-stack socket
    return address


_MISSING: Final = object()


# --- Conditions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compare(Condition):
    """``FIELD OP VALUE``."""

    field: str
    op: str
    value: Value

    def evaluate(self, facts: Facts) -> bool | None:
        found = facts.fields.get(self.field, _MISSING)
        if self.op in EQUALITY_OPS:
            equal = self.value.equals(found)
            if equal is None:
                return None
            return equal if self.op == "==" else not equal
        number = as_number(found)
        if number is None or self.value.number is None:
            return None
        limit = self.value.number
        if self.op == ">":
            return number > limit
        if self.op == ">=":
            return number >= limit
        if self.op == "<":
            return number < limit
        return number <= limit

    def fields(self) -> frozenset[str]:
        return frozenset({self.field})

    def unknowns(self, facts: Facts) -> frozenset[str]:
        return frozenset({self.field}) if self.evaluate(facts) is None else frozenset()

    def describe(self) -> Description:
        return f"{self.field} {self.op} {self.value.render()}"


@dataclass(frozen=True, slots=True)
class Membership(Condition):
    """``FIELD in [VALUE, ...]`` / ``FIELD not in [...]``."""

    field: str
    negated: bool
    values: tuple[Value, ...]

    def evaluate(self, facts: Facts) -> bool | None:
        found = facts.fields.get(self.field, _MISSING)
        results = [value.equals(found) for value in self.values]
        if True in results:
            return not self.negated
        if None in results:
            return None
        return self.negated

    def fields(self) -> frozenset[str]:
        return frozenset({self.field})

    def unknowns(self, facts: Facts) -> frozenset[str]:
        return frozenset({self.field}) if self.evaluate(facts) is None else frozenset()

    def describe(self) -> Description:
        items = ", ".join(value.render() for value in self.values)
        return f"{self.field} {'not in' if self.negated else 'in'} [{items}]"


@dataclass(frozen=True, slots=True)
class AddressIn(Condition):
    """``client_ip in [CIDR, ...]`` / ``client_ip not in [...]``."""

    negated: bool
    networks: tuple[IPNetwork, ...]

    def evaluate(self, facts: Facts) -> bool | None:
        address = _address(facts.client_ip)
        if address is None:
            return None
        inside = any(address in network for network in self.networks)
        return inside != self.negated

    def unknowns(self, facts: Facts) -> frozenset[str]:
        return frozenset({"client_ip"}) if self.evaluate(facts) is None else frozenset()

    def describe(self) -> Description:
        items = ", ".join(str(network) for network in self.networks)
        return f"client_ip {'not in' if self.negated else 'in'} [{items}]"


@dataclass(frozen=True, slots=True)
class AddressChanged(Condition):
    """``client_ip_changed``: the client is not where the session's last proof came from."""

    def evaluate(self, facts: Facts) -> bool | None:
        current, proven = _address(facts.client_ip), _address(facts.proven_ip)
        if current is None or proven is None:
            return None
        return current != proven

    def unknowns(self, facts: Facts) -> frozenset[str]:
        if _address(facts.proven_ip) is None:
            return frozenset({"session"})
        return frozenset({"client_ip"}) if _address(facts.client_ip) is None else frozenset()

    def describe(self) -> Description:
        return "client_ip_changed"


@dataclass(frozen=True, slots=True)
class AuthAge(Condition):
    """``auth_age OP DURATION``: seconds since the session's last authentication."""

    op: str
    seconds: int
    text: str  # the duration as written, for describe()

    def evaluate(self, facts: Facts) -> bool | None:
        age = facts.auth_age_s
        if age is None or not math.isfinite(age):
            return None
        if self.op == ">":
            return age > self.seconds
        if self.op == ">=":
            return age >= self.seconds
        if self.op == "<":
            return age < self.seconds
        return age <= self.seconds

    def unknowns(self, facts: Facts) -> frozenset[str]:
        return frozenset({"session"}) if self.evaluate(facts) is None else frozenset()

    def describe(self) -> Description:
        return f"auth_age {self.op} {self.text}"


@dataclass(frozen=True, slots=True)
class _Group(Condition):
    """Conditions combined: they read the fields and miss the facts of all of them."""

    conditions: tuple[Condition, ...]

    def fields(self) -> frozenset[str]:
        return frozenset[str]().union(*(condition.fields() for condition in self.conditions))

    def unknowns(self, facts: Facts) -> frozenset[str]:
        return frozenset[str]().union(*(condition.unknowns(facts) for condition in self.conditions))


@dataclass(frozen=True, slots=True)
class AllOf(_Group):
    """Every condition holds. ``listed``: written as a plain YAML list."""

    listed: bool = True

    def evaluate(self, facts: Facts) -> bool | None:
        results = [condition.evaluate(facts) for condition in self.conditions]
        if False in results:
            return False
        return None if None in results else True

    def describe(self) -> Description:
        described = [condition.describe() for condition in self.conditions]
        return described if self.listed else {"all": described}


@dataclass(frozen=True, slots=True)
class AnyOf(_Group):
    """At least one condition holds."""

    def evaluate(self, facts: Facts) -> bool | None:
        results = [condition.evaluate(facts) for condition in self.conditions]
        if True in results:
            return True
        return None if None in results else False

    def describe(self) -> Description:
        return {"any": [condition.describe() for condition in self.conditions]}


# --- Parsing --------------------------------------------------------------------------
