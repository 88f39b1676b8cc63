"""What a relying party asks the user to approve, and how the provider says it.

An authorization request may carry RFC 9396 ``authorization_details`` (what the
sign-in authorises, as JSON) and a ``binding_message`` (a short text to show the
user, as in OpenID CIBA 1.0 7.1). The provider checks both, shows them in words on
every page of the sign-in, asks for the requested factor again even when its
session already holds it (the factor *is* the approval), and echoes the approved
``authorization_details`` in the ID token, so the relying party can check that what
the user saw is what it asked for.

Pure: no I/O. Errors are :class:`ApprovalError`, which the provider answers with
``invalid_authorization_details`` (RFC 9396 5) or ``invalid_request``.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The only type this provider knows how to show (RFC 9396 2: an AS refuses the rest);
# it is what stepup-gateway sends by default (step_up.authorization_details_type).
PAYMENT_INITIATION = "payment_initiation"
SUPPORTED_TYPES = (PAYMENT_INITIATION,)
# A payment's details are a few hundred characters. They travel in the query of the
# authorization URL, and 8 KiB is the request line many servers accept (nginx's
# large_client_header_buffers default), so 4 KiB leaves room for the rest.
MAX_DETAILS_CHARS = 4096
# One approval page shows them all; more than a handful is not something to read.
MAX_DETAILS_OBJECTS = 5
# CIBA 1.0 7.1: a binding message "SHOULD be relatively short"; stepup-gateway sends
# at most 200 characters.
MAX_BINDING_MESSAGE_CHARS = 200


class ApprovalError(ValueError):
    """The request's ``authorization_details`` or ``binding_message`` is not acceptable."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error  # the OAuth error code to answer with
        self.description = description


@dataclass(frozen=True, slots=True)
class Approval:
    """What one sign-in approves: the details as JSON text, and the words shown."""

    details_json: str | None  # canonical JSON of the authorization_details, if any
    text: str  # e.g. "Approve transfer of 250.00 EUR to ACME Ltd"


def _invalid_details(description: str) -> ApprovalError:
    return ApprovalError("invalid_authorization_details", description)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # {"amount": "1", "amount": "9000"}: which one did the user see? Refuse the question.
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _invalid_details("an object names the same key twice")
    return dict(pairs)


def _readable(text: str) -> bool:
    """No control or format characters: nothing that hides or reorders what is shown
    (a right-to-left override can make "ACME" read as something else)."""
    return not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _check_value(value: object) -> None:
    if isinstance(value, str):
        if not _readable(value):
            raise _invalid_details("a value holds control or formatting characters")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_value(key)
            _check_value(item)
    elif isinstance(value, list):
        for item in value:
            _check_value(item)


def parse_authorization_details(raw: str | None) -> list[dict[str, Any]] | None:
    """RFC 9396 2: a JSON array of objects, each with a ``type`` this provider supports."""
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_DETAILS_CHARS:
        raise _invalid_details(f"longer than {MAX_DETAILS_CHARS} characters")
    try:
        details = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):
        raise _invalid_details("not valid JSON") from None
    if not isinstance(details, list) or not details:
        raise _invalid_details("must be a non-empty JSON array")
    if len(details) > MAX_DETAILS_OBJECTS:
        raise _invalid_details(f"at most {MAX_DETAILS_OBJECTS} objects")
    for entry in details:
        if not isinstance(entry, dict):
            raise _invalid_details("every entry must be a JSON object")
        kind = entry.get("type")
        if not isinstance(kind, str):
            raise _invalid_details("every object needs a string 'type'")
        if kind not in SUPPORTED_TYPES:
            raise _invalid_details(f"unsupported type {kind!r} (supported: {PAYMENT_INITIATION})")
        _check_value(entry)
    return details


def parse_binding_message(raw: str | None) -> str | None:
    if raw is None or raw.strip() == "":
        return None
    if len(raw) > MAX_BINDING_MESSAGE_CHARS:
        raise ApprovalError(
            "invalid_request", f"'binding_message' is longer than {MAX_BINDING_MESSAGE_CHARS}"
        )
    if not _readable(raw):
        raise ApprovalError("invalid_request", "'binding_message' holds control characters")
    return raw.strip()


def _payment_words(entry: Mapping[str, Any]) -> str | None:
    """ "transfer of 250.00 EUR to ACME Ltd", when the object has exactly that shape."""
    fields = [entry.get(name) for name in ("amount", "currency", "payee")]
    if entry.get("type") != PAYMENT_INITIATION or not all(isinstance(f, str) for f in fields):
        return None
    amount, currency, payee = fields
    words = f"transfer of {amount} {currency} to {payee}"
    frequency = entry.get("frequency")
    if isinstance(frequency, str) and frequency:
        words += f", {frequency}"
    return words


def _plain(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def approval_text(details: list[dict[str, Any]] | None, binding_message: str | None) -> str | None:
    """The sentence the user approves; None when the request asks for no approval.

    Built from the details when each is a payment this provider can put in words
    (``amount``, ``currency`` and ``payee`` as text); otherwise the relying party's
    ``binding_message``; otherwise the details listed as they are.
    """
    if details:
        words = [_payment_words(entry) for entry in details]
        if all(words):
            return "Approve " + "; and ".join(w for w in words if w)
    if binding_message:
        return binding_message
    if details:
        listed = "; ".join(
            ", ".join(f"{key} {_plain(value)}" for key, value in entry.items() if key != "type")
            for entry in details
        )
        return f"Approve: {listed}"
    return None


def approval_from_request(
    authorization_details: str | None, binding_message: str | None
) -> Approval | None:
    """The approval an authorization request asks for, or None; raises ApprovalError."""
    details = parse_authorization_details(authorization_details)
    message = parse_binding_message(binding_message)
    text = approval_text(details, message)
    if text is None:
        return None
    canonical = None
    if details is not None:
        canonical = json.dumps(details, separators=(",", ":"), ensure_ascii=False)
    return Approval(details_json=canonical, text=text)
