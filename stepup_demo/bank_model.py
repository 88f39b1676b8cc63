"""Demo Bank's values: customers, payees, transfers, standing orders, amounts.

Also what one request carried (:class:`Seen`: the ``X-Auth-*`` headers and the
verified assertion's claims) and the limits Demo Bank applies (the largest
transfer, its own step-up rule for savings). No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

SHOWN_HEADERS = (
    "X-Auth-Subject",
    "X-Auth-Email",
    "X-Auth-Acr",
    "X-Auth-Amr",
    "X-Auth-Time",
    "X-Auth-Level",
    "X-Auth-Rule",
)
ASSERTION_HEADER = "X-Auth-Assertion"
MAX_TRANSFER = Decimal("10000.00")
CURRENCIES = ("EUR",)  # the demo's accounts hold euros only
FREQUENCIES = ("monthly", "weekly")
IBAN = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")  # ISO 13616 shape, not its checksum
# Demo Bank's own rule for moving money to savings: above this, a passkey (acr phr)
# proven within the last five minutes, asked for with an RFC 9470 challenge.
SAVINGS_STEP_UP_ABOVE = Decimal("1000.00")
SAVINGS_STEP_UP_ACR = "phr"
SAVINGS_STEP_UP_MAX_AGE_S = 5 * 60


@dataclass(frozen=True, slots=True)
class Payee:
    name: str
    iban: str


@dataclass(frozen=True, slots=True)
class Transfer:
    at: float
    payee: str
    amount: Decimal
    acr: str
    amr: str
    currency: str = "EUR"


@dataclass(frozen=True, slots=True)
class StandingOrder:
    at: float
    payee: str
    amount: Decimal
    currency: str
    frequency: str
    acr: str
    amr: str


@dataclass
class Customer:
    balance: Decimal = Decimal("12500.00")
    savings: Decimal = Decimal("0.00")
    payees: dict[str, Payee] = field(
        default_factory=lambda: {
            "acme": Payee("ACME Ltd", "FR7630006000011234567890189"),
            "landlord": Payee("Landlord Ltd", "GB82WEST12345698765432"),
            "power": Payee("City Power", "DE89370400440532013000"),
        }
    )
    ledger: list[Transfer] = field(default_factory=list)
    standing_orders: list[StandingOrder] = field(default_factory=list)
    savings_moves: list[Transfer] = field(default_factory=list)

    def payee_named(self, name: object) -> Payee | None:
        """Forms name payees by name: that is what the provider shows for approval."""
        return next((p for p in self.payees.values() if p.name == name), None)


@dataclass(frozen=True, slots=True)
class Seen:
    """What one request carried: the headers, and whether the assertion checked out."""

    headers: Mapping[str, str]
    claims: Mapping[str, Any] | None
    problem: str | None

    @property
    def verified(self) -> bool:
        return self.claims is not None


def parse_amount(text: str) -> Decimal | None:
    text = text.strip().replace(",", "")
    if not re.fullmatch(r"[0-9]{1,7}(\.[0-9]{1,2})?", text):
        return None
    try:
        amount = Decimal(text)
    except InvalidOperation:
        return None
    return amount if Decimal("0.01") <= amount <= MAX_TRANSFER else None


def asserted(seen: Seen) -> tuple[str, str]:
    """``acr`` and ``amr`` (comma-joined, like X-Auth-Amr) from the verified assertion."""
    claims = seen.claims or {}
    amr = claims.get("amr") or []
    return str(claims.get("acr") or ""), ",".join(str(v) for v in amr)
