"""The signed-in session: who the user is and what they have proven, and when.

Pure values. A session is created by a successful login (:meth:`Session.start`)
and upgraded by each later step-up (:meth:`Session.with_proof`); it never
changes in place.

The serialised form (:meth:`Session.to_dict`) uses one- or two-letter keys
because, with the cookie store, the whole session travels in a cookie that must
stay under the browser's 4 KB limit:

    v  format version (1)          a   acr of the last authentication
    i  public session id           m   amr of the last authentication (list)
    s  sub                         at  auth_time of the last authentication
    e  email          (optional)   pr  proofs: [[acr|null, [amr...], auth_time(, id)], ...]
    n  name           (optional)   c   created_at
    p  provider sid   (optional)   l   last_seen
    t  id_token       (optional)

Optional keys are left out when None. All times are epoch seconds (floats).

Several providers (``oidc.providers``): the keys above are one provider's sign-in, named
by ``pv`` (left out for ``default``); ``o`` lists the others' sign-ins, each a mapping
of the keys s e n p t a m at pr ip b, plus ``pv`` and ``c`` (when the gateway first
recorded it). Such a session is written as format 2, which a gateway that knows one
provider refuses (a new sign-in) rather than misreading; a session of the default
provider alone is still format 1, byte for byte.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

SESSION_FORMAT_VERSION = 1
SESSION_FORMAT_PROVIDERS = 2  # with oidc.providers: the sign-in of a named provider, or several
DEFAULT_PROVIDER = "default"  # gateway.model.DEFAULT_PROVIDER (no import: session is pure)
# Each proof is a few dozen bytes in the cookie. Eight covers every level a
# realistic config defines, several times over, while bounding the cookie.
MAX_PROOFS = 8
# Re-saving a session on every request only to move last_seen would rewrite the
# cookie (or the store entry) every time; a minute is far below any idle timeout
# and is what the idle check can be late by, at most.
TOUCH_INTERVAL_S = 60


@dataclass(frozen=True, slots=True)
class Proof:
    """One authentication the provider asserted: its acr, amr and auth_time.

    ``id`` names the step-up that produced it (minted at the callback), so a
    one-time rule consumes exactly this proof: two step-ups within the same second
    have the same ``auth_time`` but are two proofs. None in sessions saved before ids.
    """

    acr: str | None
    amr: tuple[str, ...]
    auth_time: float
    id: str | None = None

    def same_method(self, other: Proof) -> bool:
        """Same acr and the same set of amr values (RFC 8176 gives their order no meaning)."""
        return self.acr == other.acr and frozenset(self.amr) == frozenset(other.amr)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignIn:
    """Who signed in at a provider and what they proved: a :class:`Login`, and the
    sign-in a :class:`Session` is a view of."""

    sub: str
    email: str | None
    name: str | None
    provider_sid: str | None
    id_token: str | None
    acr: str | None
    amr: tuple[str, ...]
    auth_time: float
    proofs: tuple[Proof, ...]
    ip: str | None = None  # client address of the last authentication (risk conditions)
    # (digest of bound request fields, auth_time of the proof that approved them)
    bindings: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Session(SignIn):
    """A signed-in user.

    ``id`` is a random, public identifier for logs and correlation. It is *not*
    a credential: the cookie value is (the sealed session, or an opaque store
    handle), and the cookie value is never logged.
    ``acr``/``amr``/``auth_time`` describe the most recent authentication;
    ``proofs`` keeps up to :data:`MAX_PROOFS` authentications, newest first, one
    per (acr, amr set), so a session can hold a strong level proven earlier while
    a weaker one was proven later.
    """

    id: str
    created_at: float
    last_seen: float
    # oidc.providers: whose sign-in the fields of SignIn are, since when (None: created_at),
    # and the other providers' sign-ins in this browser session, kept apart.
    provider: str = DEFAULT_PROVIDER
    since: float | None = None
    others: tuple[Login, ...] = ()

    @classmethod
    def start(
        cls,
        proof: Proof,
        *,
        sub: str,
        email: str | None,
        name: str | None,
        provider_sid: str | None,
        id_token: str | None,
        now: float,
        session_id: str | None = None,
        ip: str | None = None,
        binding: str | None = None,
        provider: str = DEFAULT_PROVIDER,
    ) -> Session:
        """A new session from a first login (at ``provider``)."""
        first = Login.first(
            proof,
            provider=provider,
            sub=sub,
            email=email,
            name=name,
            provider_sid=provider_sid,
            id_token=id_token,
            now=now,
            ip=ip,
            binding=binding,
        )
        return cls(
            id=session_id if session_id is not None else new_session_id(),
            **_sign_in(first),
            created_at=now,
            last_seen=now,
            provider=provider,
        )

    def with_proof(
        self,
        proof: Proof,
        *,
        sub: str,
        email: str | None,
        name: str | None,
        provider_sid: str | None,
        id_token: str | None,
        now: float,
        ip: str | None = None,
        binding: str | None = None,
    ) -> Session:
        """This session after a further authentication of the same user.

        Raises ValueError when ``sub`` is not this session's subject: a login as
        somebody else must start a new session (:meth:`Session.start`), never
        upgrade this one. ``created_at`` is kept, so a step-up does not extend
        the absolute lifetime.
        """
        if sub != self.sub:
            raise ValueError("a proof for another subject cannot upgrade this session")
        return replace(
            self,
            email=email,
            name=name,
            provider_sid=provider_sid,
            id_token=id_token,
            acr=proof.acr,
            amr=proof.amr,
            auth_time=proof.auth_time,
            proofs=merge_proofs(self.proofs, proof),
            last_seen=now,
            ip=ip,
            bindings=merge_bindings(self.bindings, binding, proof.auth_time),
        )

    def touched(self, now: float) -> Session:
        """This session, seen at ``now`` (for the idle timeout)."""
        return replace(self, last_seen=now)

    def touch_due(self, now: float) -> bool:
        """Whether last_seen is stale enough to be worth saving again."""
        return now - self.last_seen >= TOUCH_INTERVAL_S

    def assurance(self) -> tuple[object, ...]:
        """Everything that decides which levels this session holds, for comparison.

        Two sessions with different assurance must not share a store id (see
        :mod:`gateway.session.stores`).
        """
        return (self.sub, self.acr, self.amr, self.auth_time, self.proofs, self.others)

    # -- several providers ---------------------------------------------------------

    def login(self) -> Login:
        """The sign-in the top-level fields hold, as a :class:`Login`."""
        return Login(
            provider=self.provider,
            since=self.created_at if self.since is None else self.since,
            **_sign_in(self),
        )

    def logins(self) -> tuple[Login, ...]:
        """Every provider's sign-in in this session, this view's first."""
        return (self.login(), *self.others)

    def for_provider(self, provider: str) -> Session | None:
        """This session as ``provider``'s sign-in (its sub, proofs, id token), or None
        when the user has not signed in there: a proof from one provider never
        stands for another's, whatever its level or ``sub``."""
        if provider == self.provider:
            return self
        for login in self.others:
            if login.provider == provider:
                rest = tuple(o for o in self.others if o is not login)
                return login.over(self, (self.login(), *rest))
        return None

    def joined(self, login: Login) -> Session:
        """This session with ``login`` (a provider it holds no sign-in of) added, as the view."""
        return login.over(self, self.logins())

    def without(self, providers: frozenset[str]) -> Session | None:
        """This session without the sign-ins of ``providers`` (None: nothing left)."""
        kept = [login for login in self.logins() if login.provider not in providers]
        if not kept:
            return None
        if kept[0].provider == self.provider:
            return replace(self, others=tuple(kept[1:]))
        return kept[0].over(self, tuple(kept[1:]))

    def to_dict(self) -> dict[str, object]:
        data = self._top_dict()
        if self.provider != DEFAULT_PROVIDER or self.others:
            data["v"] = SESSION_FORMAT_PROVIDERS
            if self.provider != DEFAULT_PROVIDER:
                data["pv"] = self.provider
            if self.since is not None:
                data["ps"] = _compact_time(self.since)
            if self.others:
                data["o"] = [login.to_dict() for login in self.others]
        return data

    def _top_dict(self) -> dict[str, object]:
        # Format 1, key for key in this order (the cookie store writes it as it stands).
        return {
            "v": SESSION_FORMAT_VERSION,
            "i": self.id,
            **_proven_keys(self),
            "c": _compact_time(self.created_at),
            "l": _compact_time(self.last_seen),
            **_client_keys(self),
        }

    @classmethod
    def from_dict(cls, data: object) -> Session | None:
        """The session in ``data``, or None if anything about it is malformed. Never raises."""
        if not isinstance(data, Mapping):
            return None
        version = data.get("v")
        # type() rather than ==: True == 1 and 1.0 == 1 in Python.
        if type(version) is not int or version not in (
            SESSION_FORMAT_VERSION,
            SESSION_FORMAT_PROVIDERS,
        ):
            return None
        several = version == SESSION_FORMAT_PROVIDERS
        try:
            session = cls(
                id=required_str(data.get("i")),
                **_read_sign_in(data),
                created_at=finite_time(data.get("c")),
                last_seen=finite_time(data.get("l")),
                provider=_provider(data.get("pv")) if several else DEFAULT_PROVIDER,
                since=finite_time(data["ps"]) if several and "ps" in data else None,
                others=_logins(data.get("o")) if several else (),
            )
        except Malformed:
            return None
        if any(login.provider == session.provider for login in session.others):
            return None  # one sign-in per provider
        return session


@dataclass(frozen=True, slots=True, kw_only=True)
class Login(SignIn):
    """One provider's sign-in within a session (``oidc.providers``): who, and what was proven.

    ``since`` is when the gateway first recorded it (its clock): a back-channel
    logout from the provider at a later moment ends it (gateway.session.revocation).
    """

    provider: str
    since: float

    @classmethod
    def first(
        cls,
        proof: Proof,
        *,
        provider: str,
        sub: str,
        email: str | None,
        name: str | None,
        provider_sid: str | None,
        id_token: str | None,
        now: float,
        ip: str | None = None,
        binding: str | None = None,
    ) -> Login:
        """A provider's first sign-in in a session that holds others'."""
        return cls(
            provider=provider,
            since=now,
            sub=sub,
            email=email,
            name=name,
            provider_sid=provider_sid,
            id_token=id_token,
            acr=proof.acr,
            amr=proof.amr,
            auth_time=proof.auth_time,
            proofs=(proof,),
            ip=ip,
            bindings=merge_bindings((), binding, proof.auth_time),
        )

    def over(self, session: Session, others: tuple[Login, ...]) -> Session:
        """``session`` (its id and times) viewed as this sign-in, with ``others`` beside it."""
        return replace(
            session, provider=self.provider, since=self.since, others=others, **_sign_in(self)
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "pv": self.provider,
            "c": _compact_time(self.since),
            **_proven_keys(self),
            **_client_keys(self),
        }

    @classmethod
    def from_dict(cls, data: object) -> Login:
        """Raises :class:`Malformed`."""
        if not isinstance(data, Mapping):
            raise Malformed
        return cls(
            provider=_provider(data.get("pv")),
            since=finite_time(data.get("c")),
            **_read_sign_in(data),
        )


_SIGN_IN_FIELDS = tuple(field.name for field in fields(SignIn))


def _sign_in(holder: SignIn) -> dict[str, Any]:
    """The fields of :class:`SignIn` in ``holder``, as keyword arguments."""
    return {name: getattr(holder, name) for name in _SIGN_IN_FIELDS}


def _proven_keys(holder: SignIn) -> dict[str, object]:
    """s e n p t a m at pr, in this order; optional ones left out when None."""
    data: dict[str, object] = {"s": holder.sub}
    for key, optional in (
        ("e", holder.email),
        ("n", holder.name),
        ("p", holder.provider_sid),
        ("t", holder.id_token),
        ("a", holder.acr),
    ):
        if optional is not None:
            data[key] = optional
    data["m"] = list(holder.amr)
    data["at"] = _compact_time(holder.auth_time)
    data["pr"] = [_proof_item(p) for p in holder.proofs]
    return data


def _client_keys(holder: SignIn) -> dict[str, object]:
    """ip b, when there is one: the last authentication's client address, the bound approvals."""
    data: dict[str, object] = {}
    if holder.ip is not None:
        data["ip"] = holder.ip
    if holder.bindings:
        data["b"] = [[digest, _compact_time(at)] for digest, at in holder.bindings]
    return data


def _read_sign_in(data: Mapping[str, object]) -> dict[str, Any]:
    """The fields of :class:`SignIn` in ``data``, as keyword arguments (or :class:`Malformed`)."""
    return {
        "sub": required_str(data.get("s")),
        "email": optional_str(data.get("e")),
        "name": optional_str(data.get("n")),
        "provider_sid": optional_str(data.get("p")),
        "id_token": optional_str(data.get("t")),
        "acr": optional_str(data.get("a")),
        "amr": _str_tuple(data.get("m")),
        "auth_time": finite_time(data.get("at")),
        "proofs": _proofs(data.get("pr")),
        "ip": optional_str(data.get("ip")),
        "bindings": _bindings(data.get("b")),
    }


# One sign-in per provider a config can name; a bound on what a cookie may carry.
MAX_LOGINS = 8


def _provider(value: object) -> str:
    name = required_str(value)
    if len(name) > 64:
        raise Malformed
    return name


def _logins(value: object) -> tuple[Login, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) >= MAX_LOGINS:
        raise Malformed
    logins = tuple(Login.from_dict(item) for item in value)
    if len({login.provider for login in logins}) != len(logins):
        raise Malformed
    return logins


def new_session_id() -> str:
    """A random public session id (128 bits; an identifier, not a credential)."""
    return secrets.token_urlsafe(16)


def merge_proofs(proofs: tuple[Proof, ...], proof: Proof) -> tuple[Proof, ...]:
    """``proofs`` plus ``proof``: one per method (newest wins), newest first, at most MAX_PROOFS."""
    kept = [p for p in proofs if not p.same_method(proof)]
    newest = max((p for p in proofs if p.same_method(proof)), key=_auth_time, default=proof)
    kept.append(proof if proof.auth_time >= newest.auth_time else newest)
    kept.sort(key=_auth_time, reverse=True)
    return tuple(kept[:MAX_PROOFS])


# Bound approvals kept per session: enough for a few transactions in flight at once.
MAX_BINDINGS = 8


def merge_bindings(
    bindings: tuple[tuple[str, float], ...], digest: str | None, auth_time: float
) -> tuple[tuple[str, float], ...]:
    """``bindings`` plus (``digest``, ``auth_time``), newest first, at most MAX_BINDINGS."""
    if digest is None:
        return bindings
    kept = [(d, at) for d, at in bindings if d != digest]
    return ((digest, auth_time), *kept)[:MAX_BINDINGS]


def _bindings(value: object) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_BINDINGS:
        raise Malformed
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise Malformed
        out.append((required_str(item[0]), finite_time(item[1])))
    return tuple(out)


def expired(session: Session, now: float, idle_timeout_s: float, lifetime_s: float) -> bool:
    """Whether ``session`` is past its idle or absolute timeout at ``now``.

    Both limits are exclusive: a session last seen exactly ``idle_timeout_s``
    ago, or created exactly ``lifetime_s`` ago, has expired (OWASP Session
    Management Cheat Sheet: enforce both an idle and an absolute timeout).
    """
    return now - session.last_seen >= idle_timeout_s or now - session.created_at >= lifetime_s


def _auth_time(proof: Proof) -> float:
    return proof.auth_time


class Malformed(Exception):
    """A serialised field has the wrong shape (raised by the readers below)."""


def required_str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise Malformed
    return value


def optional_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise Malformed
    return value


def finite_time(value: object) -> float:
    # bool is an int subclass; True is not a time.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed
    as_float = float(value)
    if not math.isfinite(as_float):
        raise Malformed
    return as_float


def _compact_time(value: float) -> float | int:
    # Provider times are whole seconds; "1700000000" is two bytes shorter than "1700000000.0".
    return int(value) if value.is_integer() else value


def _str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Malformed
    return tuple(value)


def new_proof_id() -> str:
    """A random id for one step-up's proof (96 bits: unique, short in the cookie)."""
    return secrets.token_urlsafe(12)


def _proof_item(proof: Proof) -> list[object]:
    item: list[object] = [proof.acr, list(proof.amr), _compact_time(proof.auth_time)]
    if proof.id is not None:
        item.append(proof.id)
    return item


def _proofs(value: object) -> tuple[Proof, ...]:
    if not isinstance(value, list) or len(value) > MAX_PROOFS:
        raise Malformed
    proofs: list[Proof] = []
    for item in value:
        if not isinstance(item, list) or len(item) not in (3, 4):
            raise Malformed
        acr, amr, auth_time = item[:3]
        proofs.append(
            Proof(
                acr=optional_str(acr),
                amr=_str_tuple(amr),
                auth_time=finite_time(auth_time),
                id=required_str(item[3]) if len(item) == 4 else None,
            )
        )
    return tuple(proofs)
