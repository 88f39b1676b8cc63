"""Transactional step-up, the pure parts: kept requests, bound approvals, challenges.

A browser form post that needs a step-up is kept (server-side, single use) and
replayed once the step-up succeeds. A proof can be bound to the values of a
request (RFC 9396 ``authorization_details`` plus a human-readable
``binding_message``), so that approving "250.00 EUR to ACME" never authorises
"9,000 EUR to someone else". An upstream may itself ask for a step-up with an
RFC 9470 challenge.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.fields import binding_digest, media_type
from gateway.model import Level
from gateway.responses import wants_html

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
KEPT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A binding message is shown on the provider's approval page; keep it readable.
MAX_BINDING_MESSAGE_CHARS = 200


def is_form_post(method: str, headers: Mapping[str, str]) -> bool:
    """A browser submitting an HTML form: it can follow a redirect and come back.

    Scripts get the RFC 9470 401 instead (they send neither a navigation's
    ``Sec-Fetch-Mode`` nor ask for HTML first).
    """
    if method not in KEPT_METHODS:
        return False
    if media_type(headers.get("Content-Type", "")) not in FORM_TYPES:
        return False
    mode = headers.get("Sec-Fetch-Mode", "").lower()
    if mode:
        return mode == "navigate"
    return wants_html(headers)


@dataclass(frozen=True, slots=True)
class KeptRequest:
    """A request held across a step-up round trip, to be replayed exactly once."""

    method: str
    path_qs: str  # the normalised path the rules judged, plus the raw query
    content_type: str
    body: bytes
    session_id: str | None  # the session it belongs to (None: before the first sign-in)
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "m": self.method,
            "p": self.path_qs,
            "t": self.content_type,
            "b": base64.b64encode(self.body).decode("ascii"),
            "s": self.session_id,
            "r": self.rule,
        }

    @classmethod
    def from_dict(cls, data: object) -> KeptRequest | None:
        if not isinstance(data, Mapping):
            return None
        method, path_qs, ctype = data.get("m"), data.get("p"), data.get("t")
        body, session_id, rule = data.get("b"), data.get("s"), data.get("r")
        if not (
            isinstance(method, str)
            and isinstance(path_qs, str)
            and path_qs.startswith("/")
            and isinstance(ctype, str)
            and isinstance(body, str)
            and isinstance(rule, str)
            and (session_id is None or isinstance(session_id, str))
        ):
            return None
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            return None
        return cls(method, path_qs, ctype, raw, session_id, rule)

    def with_session(self, session_id: str) -> KeptRequest:
        return KeptRequest(
            self.method, self.path_qs, self.content_type, self.body, session_id, self.rule
        )


def authorization_details(
    details_type: str, values: Mapping[str, str | None]
) -> list[dict[str, Any]]:
    """RFC 9396 ``authorization_details`` for the bound values (one object)."""
    return [{"type": details_type, **{k: v for k, v in sorted(values.items())}}]


def binding_message(values: Mapping[str, str | None]) -> str:
    """What the provider shows the user to approve, e.g. ``Approve: amount 250.00, payee ACME``."""
    parts = [f"{name} {value if value is not None else '(none)'}" for name, value in values.items()]
    message = "Approve: " + ", ".join(parts)
    if len(message) > MAX_BINDING_MESSAGE_CHARS:
        message = message[: MAX_BINDING_MESSAGE_CHARS - 1] + "…"
    return message


def echoed_binding(claims: Mapping[str, Any], bind: Sequence[str]) -> str | bool | None:
    """The digest of what the ID token says was approved.

    ``False`` when the token echoes no ``authorization_details`` (nothing to check);
    ``None`` when it echoes something unusable (treated as a mismatch).
    """
    details = claims.get("authorization_details")
    if details is None:
        return False
    if not isinstance(details, list) or len(details) != 1 or not isinstance(details[0], dict):
        return None
    values = {k: v for k, v in details[0].items() if k != "type"}
    return binding_digest(bind, values)


_PARAM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*,?')


def parse_bearer_challenge(value: str | None) -> dict[str, str] | None:
    """The parameters of an RFC 9470 ``insufficient_user_authentication`` challenge.

    None for anything else: another scheme, another error, or a malformed header.
    """
    if not value or value[:7].lower() != "bearer ":
        return None
    params: dict[str, str] = {}
    rest = value[7:]
    position = 0
    while position < len(rest):
        found = _PARAM.match(rest, position)
        if found is None or found.end() == position:
            return None
        raw = found.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[found.group(1).lower()] = raw
        position = found.end()
    if params.get("error") != "insufficient_user_authentication":
        return None
    return params


def level_for_acr_values(levels: Sequence[Level], acr_values: str) -> Level | None:
    """The configured level an upstream's ``acr_values`` names (the first one known)."""
    for acr in acr_values.split():
        for level in levels:
            if acr in level.acr:
                return level
    return None


def max_age_of(params: Mapping[str, str]) -> int | bool | None:
    """``max_age`` from a challenge: an int, None when absent, False when malformed."""
    raw = params.get("max_age")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 9:
        return False
    return int(raw)


def popup_page(origin: str, ok: bool, detail: Mapping[str, Any]) -> str:
    """The page that ends a popup step-up: it tells its opener (same origin only)."""
    # JSON inside <script>: escape "<" so no value can close the element.
    message = json.dumps({"type": "stepup-gateway", "ok": ok, **detail}).replace("<", "\\u003c")
    target = json.dumps(origin).replace("<", "\\u003c")
    text = "Done — you can close this window." if ok else "The sign-in did not complete."
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Step-up</title>'
        "</head><body><p>" + text + "</p><script>"
        f"if (window.opener) {{ window.opener.postMessage({message}, {target}); window.close(); }}"
        "</script></body></html>"
    )
