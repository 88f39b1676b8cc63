"""The state of one authorization round trip, kept in the browser.

Between the redirect to the provider and the callback the gateway must remember
the ``state``, ``nonce``, PKCE ``code_verifier`` and where to send the user
back. It keeps them in a short-lived sealed cookie rather than server-side, so
no store is needed and any worker can finish the round trip. Each transaction
gets its own cookie, named after a hash of its ``state``
(:func:`tx_cookie_name`), so several tabs can each have a round trip in flight;
:func:`tx_cookies_to_drop` caps how many.

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.session.cookies import cookie_name
from gateway.session.crypto import Sealer
from gateway.session.model import Malformed, finite_time, optional_str, required_str

TX_PURPOSE = "stepup-gateway tx v1"
TX_COOKIE_BASE = "stepup_tx"
# A user rarely has more than a couple of tabs mid-login; the cap keeps a looping
# page from filling the Cookie header (servers refuse headers over ~8 KB).
MAX_IN_FLIGHT = 5
# The return URL sealed into a transaction cookie, at most. Beyond it the query is
# dropped (the path alone is kept, or "/"): a sealed 1 KiB URL makes a cookie of
# about 2 KB, well under the 4096 bytes per cookie RFC 6265 6.1 asks browsers to keep.
MAX_RETURN_TO_CHARS = 1024
# All transaction cookies together, as name=value in the Cookie header. With the
# session cookie (at most ~3.9 KB) the gateway's own cookies stay under 8 KB, the
# header limit of nginx, Apache, Jetty and aiohttp alike; beyond it the oldest go.
MAX_TX_COOKIE_BYTES = 3 * 1024
# Replicas' clocks disagree a little (OIDC Core 3.1.3.7 allows for the same with
# iat); a transaction from further in the future than this was not sealed by us now.
CLOCK_SKEW_S = 60
_NAME_HASH_HEX = 8  # 32 bits: collisions among five in-flight states are negligible


@dataclass(frozen=True, slots=True)
class Transaction:
    """One authorization request in flight."""

    state: str
    nonce: str
    code_verifier: str
    return_to: str  # local path (+ query) to send the browser back to
    rule: str | None  # name of the rule that asked for the step-up
    level: str | None  # level asked for
    max_age_s: int | None
    created_at: float
    mode: str = "redirect"  # "redirect", or "popup" (ends with a message to the opener)
    kept: str | None = None  # id of the request kept across this step-up, to replay once
    binding: str | None = None  # digest of the bound request fields the user approves
    fresh: bool = False  # the provider must authenticate during this transaction (once)
    # oidc.providers: the provider asked; its answer alone is accepted (RFC 9207 mix-up).
    provider: str = "default"

    @property
    def requested_max_age_s(self) -> int | None:
        """The ``max_age`` the authorization request carried: 0 for a one-time proof
        (a new authentication), else the rule's. With any ``max_age`` the ID token
        must carry ``auth_time`` (OIDC Core 3.1.2.1)."""
        return 0 if self.fresh else self.max_age_s

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "s": self.state,
            "n": self.nonce,
            "v": self.code_verifier,
            "r": self.return_to,
            "c": self.created_at,
            "o": self.mode,
        }
        if self.rule is not None:
            data["u"] = self.rule
        if self.level is not None:
            data["l"] = self.level
        if self.max_age_s is not None:
            data["m"] = self.max_age_s
        if self.kept is not None:
            data["k"] = self.kept
        if self.binding is not None:
            data["b"] = self.binding
        if self.fresh:
            data["f"] = True
        if self.provider != "default":
            data["p"] = self.provider
        return data

    @classmethod
    def from_dict(cls, data: object) -> Transaction | None:
        """The transaction in ``data``, or None if malformed. Never raises."""
        if not isinstance(data, Mapping):
            return None
        max_age_s, fresh = data.get("m"), data.get("f", False)
        if max_age_s is not None and (type(max_age_s) is not int or max_age_s < 0):
            return None
        if not isinstance(fresh, bool):
            return None
        try:
            return cls(
                state=required_str(data.get("s")),
                nonce=required_str(data.get("n")),
                code_verifier=required_str(data.get("v")),
                return_to=required_str(data.get("r")),
                rule=optional_str(data.get("u")),
                level=optional_str(data.get("l")),
                max_age_s=max_age_s,
                created_at=finite_time(data.get("c")),
                mode=required_str(data.get("o")),
                kept=optional_str(data.get("k")),
                binding=optional_str(data.get("b")),
                fresh=fresh,
                provider=required_str(data.get("p", "default")),
            )
        except Malformed:
            return None


class TransactionCodec:
    """Seal transactions into cookie values and open them at the callback."""

    __slots__ = ("_sealer",)

    def __init__(self, secrets: Sequence[bytes]) -> None:
        self._sealer = Sealer(secrets, TX_PURPOSE)

    def seal(self, tx: Transaction) -> str:
        return self._sealer.seal(tx.to_dict())

    def open(self, value: str, state: str, now: float, ttl_s: float) -> Transaction | None:
        """The transaction in ``value`` if it is ours, for ``state``, and younger than ``ttl_s``.

        None otherwise: tampered, for another state (a cookie swapped in from
        another round trip), ``ttl_s`` old or older, or dated in the future.
        """
        tx = self.peek(value)
        if tx is None or not same_state(tx.state, state):
            return None
        age_s = now - tx.created_at
        if age_s >= ttl_s or age_s < -CLOCK_SKEW_S:
            return None
        return tx

    def peek(self, value: str) -> Transaction | None:
        """The transaction in ``value`` without checking state or age.

        Only for housekeeping (which cookie is oldest); never to finish a login.
        """
        return Transaction.from_dict(self._sealer.open(value))


def tx_cookie_name(base: str, state: str, secure: bool) -> str:
    """Cookie name for the transaction with this ``state``, e.g. ``__Host-stepup_tx_1a2b3c4d``."""
    digest = hashlib.sha256(_state_bytes(state)).hexdigest()[:_NAME_HASH_HEX]
    return cookie_name(f"{base}_{digest}", secure)


def tx_cookie_names(cookies: Mapping[str, str], base: str, secure: bool) -> list[str]:
    """The transaction cookie names present in ``cookies`` (a request's cookies)."""
    pattern = _name_pattern(base, secure)
    return [name for name in cookies if pattern.fullmatch(name)]


def bounded_return_to(return_to: str, max_chars: int = MAX_RETURN_TO_CHARS) -> str:
    """``return_to`` when short enough to seal; else its path alone, else ``/``."""
    if len(return_to) <= max_chars:
        return return_to
    path = return_to.partition("?")[0].partition("#")[0]
    return path if len(path) <= max_chars else "/"


def cookie_pair_bytes(name: str, value: str) -> int:
    """What ``name=value`` adds to a Cookie header, with its ``; `` separator."""
    return len(name) + 1 + len(value) + 2


def tx_cookies_to_drop(
    cookies: Mapping[str, str],
    codec: TransactionCodec,
    *,
    base: str,
    secure: bool,
    now: float,
    ttl_s: float,
    max_in_flight: int = MAX_IN_FLIGHT,
    new_bytes: int = 0,
    max_total_bytes: int = MAX_TX_COOKIE_BYTES,
) -> list[str]:
    """Transaction cookies to delete before setting one more of ``new_bytes``
    (:func:`cookie_pair_bytes`).

    Unreadable and expired ones, then the oldest, until at most
    ``max_in_flight - 1`` remain (room for the new one) and the remaining ones and
    the new one take at most ``max_total_bytes`` together.
    """
    drop: list[str] = []
    alive: list[tuple[float, str]] = []
    for name in tx_cookie_names(cookies, base, secure):
        tx = codec.peek(cookies[name])
        if tx is None or now - tx.created_at >= ttl_s:
            drop.append(name)
        else:
            alive.append((tx.created_at, name))
    alive.sort()
    total = new_bytes + sum(cookie_pair_bytes(name, cookies[name]) for _, name in alive)
    while alive and (len(alive) > max(max_in_flight - 1, 0) or total > max_total_bytes):
        _, name = alive.pop(0)
        total -= cookie_pair_bytes(name, cookies[name])
        drop.append(name)
    return drop


def _state_bytes(state: str) -> bytes:
    # The callback's state comes from the query string and may hold anything,
    # including lone surrogates; this must not raise.
    return state.encode("utf-8", "surrogatepass")


def same_state(expected: str, received: str) -> bool:
    """Constant-time ``state`` comparison; the received one may hold anything."""
    return hmac.compare_digest(_state_bytes(expected), _state_bytes(received))


@functools.lru_cache(maxsize=8)
def _name_pattern(base: str, secure: bool) -> re.Pattern[str]:
    prefix = re.escape(cookie_name(f"{base}_", secure))
    return re.compile(f"{prefix}[0-9a-f]{{{_NAME_HASH_HEX}}}")
