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
import heapq
import ipaddress
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from gateway.fields import binding_digest, media_type
from gateway.model import Level
from gateway.responses import wants_html

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
KEPT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# A binding message is shown on the provider's approval page; keep it readable.
MAX_BINDING_MESSAGE_CHARS = 200
# What a kept request costs beyond its body (base64, as stored): the dict, its
# strings and the ledger's own record, about.
KEPT_OVERHEAD_BYTES = 1024
# Clients without a session are counted per IPv6 /64: one host usually holds a whole
# /64 (RFC 6177), so counting single addresses would not limit anybody.
IPV6_CLIENT_PREFIX = 64


def same_origin_refusal(headers: Mapping[str, str], public_origin: str) -> str | None:
    """None when the browser says this request comes from the gateway's own origin;
    otherwise why not (a log reason).

    The Fetch standard's ``Origin`` (sent on every POST by current browsers) must
    equal the public origin; ``null`` (sandboxed frames, cross-origin redirects,
    ``file:``) never does. ``Sec-Fetch-Site`` (Fetch Metadata), when present, must be
    ``same-origin``: ``same-site`` is a sibling host, which may be somebody else's.
    A request that carries neither header says nothing about where it came from,
    and fails closed: it is not from a current browser's same-origin page.
    """
    origin = headers.get("Origin")
    site = headers.get("Sec-Fetch-Site")
    if origin is not None:
        sent = serialized_origin(origin)
        if sent is None or sent != serialized_origin(public_origin):
            return "cross_origin"
    if site is not None and site.strip().lower() != "same-origin":
        return "cross_site"
    if origin is None and site is None:
        return "origin_unknown"
    return None


def serialized_origin(url: str) -> str | None:
    """``scheme://host[:port]`` as RFC 6454 6.1 serialises an origin: lower case, no
    default port (a public_url written with ``:443`` names the origin browsers send
    without it). None for ``null`` and anything that is not an http(s) origin."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    default = {"http": 80, "https": 443}.get(scheme)
    if default is None or not host or parts.path not in ("", "/") or parts.query:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def client_key(session_id: str | None, client_ip: str | None) -> str:
    """Whose kept requests these are: the session's, else the client address's."""
    if session_id is not None:
        return f"session:{session_id}"
    if client_ip is None:
        return "ip:unknown"
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return f"ip:{client_ip}"
    if address.version == 6:
        network = ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False)
        return f"ip:{network}"
    return f"ip:{address}"


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
    # Where the browser said it came from (checked same-origin before it was kept);
    # the replay carries the same, so an upstream's own CSRF check sees the original.
    origin: str | None = None
    fetch_site: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "m": self.method,
            "p": self.path_qs,
            "t": self.content_type,
            "b": base64.b64encode(self.body).decode("ascii"),
            "s": self.session_id,
            "r": self.rule,
            "o": self.origin,
            "fs": self.fetch_site,
        }

    @classmethod
    def from_dict(cls, data: object) -> KeptRequest | None:
        if not isinstance(data, Mapping):
            return None
        method, path_qs, ctype = data.get("m"), data.get("p"), data.get("t")
        body, session_id, rule = data.get("b"), data.get("s"), data.get("r")
        origin, fetch_site = data.get("o"), data.get("fs")
        if not (
            isinstance(method, str)
            and isinstance(path_qs, str)
            and path_qs.startswith("/")
            and isinstance(ctype, str)
            and isinstance(body, str)
            and isinstance(rule, str)
            and (session_id is None or isinstance(session_id, str))
            # Kept before origins were checked: it may be a cross-site post. Refused.
            and (isinstance(origin, str) or isinstance(fetch_site, str))
            and (origin is None or isinstance(origin, str))
            and (fetch_site is None or isinstance(fetch_site, str))
        ):
            return None
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            return None
        return cls(method, path_qs, ctype, raw, session_id, rule, origin, fetch_site)

    def with_session(self, session_id: str) -> KeptRequest:
        return replace(self, session_id=session_id)

    @property
    def size_bytes(self) -> int:
        """About what holding it takes, for the budget (see :func:`kept_size_bytes`)."""
        return kept_size_bytes(len(self.body), self.path_qs)


def kept_size_bytes(body_bytes: int, path_qs: str) -> int:
    """About what keeping a request takes: its body as stored (base64), and the rest."""
    return 4 * math.ceil(body_bytes / 3) + len(path_qs) + KEPT_OVERHEAD_BYTES


@dataclass(slots=True)
class KeptLedger:
    """What this process holds in kept requests: bytes in all, and requests per client.

    Pure bookkeeping (the clock is passed in); the requests themselves live in the
    aux store (this process, or Redis). A request is counted from :meth:`admit` until
    :meth:`release` or its expiry, whichever comes first; one released by another
    worker stays counted here until it expires, which only errs on the safe side.
    Nothing is ever evicted to make room: a full ledger refuses the new request.
    """

    budget_bytes: int
    per_client: int
    total_bytes: int = 0
    _entries: dict[str, tuple[float, int, str]] = field(default_factory=dict)
    _clients: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    _expiry: list[tuple[float, str]] = field(default_factory=list)

    def admit(
        self, name: str, size: int, client: str, now: float, ttl_s: float
    ) -> tuple[str, float] | None:
        """Count ``name``; None when admitted, else (why not, seconds until room is likely):
        ``keep_per_client`` or ``keep_budget``."""
        self.sweep(now)
        held = self._clients.get(client, [])
        if len(held) >= self.per_client:
            return "keep_per_client", max(min(at for at, _ in held) - now, 1.0)
        if self.total_bytes + size > self.budget_bytes:
            soonest = self._expiry[0][0] if self._expiry else now + ttl_s
            return "keep_budget", max(soonest - now, 1.0)
        expires_at = now + ttl_s
        self._entries[name] = (expires_at, size, client)
        self._clients.setdefault(client, []).append((expires_at, name))
        heapq.heappush(self._expiry, (expires_at, name))
        self.total_bytes += size
        return None

    def release(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        _, size, client = entry
        self.total_bytes -= size
        held = self._clients.get(client, [])
        held[:] = [item for item in held if item[1] != name]
        if not held:
            self._clients.pop(client, None)

    def sweep(self, now: float) -> None:
        """Forget what has expired (the store forgets it too)."""
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, name = heapq.heappop(self._expiry)
            entry = self._entries.get(name)
            if entry is not None and entry[0] == expires_at:
                self.release(name)
        if len(self._expiry) > 2 * len(self._entries) + 1024:
            # Released entries linger in the heap until they expire; drop them.
            self._expiry = [(at, name) for name, (at, _, _) in self._entries.items()]
            heapq.heapify(self._expiry)

    def __len__(self) -> int:
        return len(self._entries)


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
