"""Where sessions live between requests.

Every store speaks :class:`SessionStore`: the app hands it the session cookie's
value and gets a :class:`Session` back (or None), and after a change hands it
the session and gets the cookie value to set. Expiry (idle and absolute) is
enforced by ``load`` with the caller's clock.

- :class:`CookieStore`: the cookie value *is* the session, sealed. Stateless
  and shared by every worker, but it cannot revoke: a copied cookie stays
  valid until it expires, and ``delete`` only forgets nothing.
- :class:`MemoryStore`: the cookie holds an opaque 256-bit handle; the session
  stays in this process. Revocable, but not shared between workers or kept
  across restarts.
- :class:`gateway.session.redis_store.RedisStore`: the same handle, the session
  sealed in Redis; shared by every worker and replica.

Session fixation: a store that keeps sessions server-side issues a new handle
whenever a saved session's assurance differs from what the previous handle
held, and forgets the previous handle, so a handle obtained before a step-up
never carries the upgraded level.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Protocol

import structlog

from gateway import errors
from gateway.session.crypto import Sealer
from gateway.session.model import Session, expired

SESSION_PURPOSE = "stepup-gateway session v1"
# RFC 6265 6.1: browsers keep at least 4096 bytes per cookie, counting name, value
# and attributes. "__Host-stepup_session=" plus "; Path=/; Max-Age=43200; HttpOnly;
# SameSite=Lax; Secure" is under 100 bytes, so 3800 for the value leaves margin
# for a longer configured cookie name.
MAX_COOKIE_VALUE_BYTES = 3800
# 100k sessions of ~1-2 KB each (id_token included) stays within a few hundred MB.
MAX_MEMORY_SESSIONS = 100_000
HANDLE_BYTES = 32  # 256-bit opaque handle (OWASP: at least 64 bits of entropy)
# Opened cookie-store sessions kept by cookie value, so the requests of a page load
# (and an API client's every request) decrypt and parse the cookie once, not each
# time. Sized for the sessions active within a few seconds on a busy process;
# at most ~16 MB with every cookie at the size limit, ~7 MB at a typical 1.6 KB.
OPENED_CACHE_SIZE = 4096
# Expired entries at the old end of the store removed per save: enough to keep up
# with the rate sessions are created, cheap enough to do on every save.
SWEEP_PER_SAVE = 16

_HANDLE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(HANDLE_BYTES)


def is_handle(value: object) -> bool:
    """A server-side store's cookie value: ``secrets.token_urlsafe(HANDLE_BYTES)``."""
    return isinstance(value, str) and _HANDLE.fullmatch(value) is not None


log = structlog.get_logger(__name__)


class SessionTooLarge(errors.GatewayError):
    """Even trimmed, the session does not fit in a cookie."""

    status = 500
    title = "Session too large"


class SessionStore(Protocol):
    async def load(self, cookie_value: str, now: float) -> Session | None:
        """The live session behind ``cookie_value``; None if unknown, expired or tampered."""
        ...

    async def save(
        self, session: Session, now: float, *, rotate: bool = False, previous: str | None = None
    ) -> str:
        """Store ``session``; return the cookie value to set.

        ``previous``: the cookie value the request came with, if any. A
        server-side store reuses it only when it still holds the same session at
        the same assurance and ``rotate`` is False; otherwise it issues a new
        value and forgets ``previous``.
        """
        ...

    async def delete(self, cookie_value: str) -> None:
        """Forget the session behind ``cookie_value`` (no-op if unknown)."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers (for readiness)."""
        ...


class CookieStore:
    """The session sealed into the cookie itself (stateless)."""

    def __init__(
        self,
        secrets: Sequence[bytes],
        *,
        idle_timeout_s: float,
        lifetime_s: float,
        max_cookie_bytes: int = MAX_COOKIE_VALUE_BYTES,
    ) -> None:
        self._sealer = Sealer(secrets, SESSION_PURPOSE)
        self._idle_timeout_s = idle_timeout_s
        self._lifetime_s = lifetime_s
        self._max_cookie_bytes = max_cookie_bytes
        # Cookie value -> the session it opened to. Only values that opened (so were
        # sealed with our key) get in; expiry is still checked on every load.
        # Oldest first, so the oldest entry is dropped when full.
        self._opened: dict[str, Session] = {}

    async def load(self, cookie_value: str, now: float) -> Session | None:
        return self.load_now(cookie_value, now)

    def load_now(self, cookie_value: str, now: float) -> Session | None:
        """:meth:`load` without the coroutine (this store does no I/O)."""
        session = self._opened.get(cookie_value)
        if session is None:
            session = Session.from_dict(self._sealer.open(cookie_value))
            if session is None:
                return None
            if len(self._opened) >= OPENED_CACHE_SIZE:
                del self._opened[next(iter(self._opened))]
            self._opened[cookie_value] = session
        if expired(session, now, self._idle_timeout_s, self._lifetime_s):
            self._opened.pop(cookie_value, None)
            return None
        return session

    async def save(
        self, session: Session, now: float, *, rotate: bool = False, previous: str | None = None
    ) -> str:
        # Every seal uses a fresh nonce, so the value changes on every save;
        # ``rotate`` and ``previous`` have nothing more to do here.
        return self.seal(session)

    def seal(self, session: Session) -> str:
        """The cookie value for ``session``, trimmed to fit the browser's cookie limit.

        When the sealed session is over ``max_cookie_bytes``, what matters least
        is dropped, in this order, until it fits: the id_token (only used as
        ``id_token_hint`` at logout), the oldest proofs (the session may then
        have to step up again sooner: safe), the display name. Raises
        :class:`SessionTooLarge` if it still does not fit.
        """
        sealed = self._sealer.seal(session.to_dict())
        if len(sealed) <= self._max_cookie_bytes:
            return sealed
        for candidate, dropped in _trimmed(session):
            sealed = self._sealer.seal(candidate.to_dict())
            if len(sealed) <= self._max_cookie_bytes:
                log.warning("session_cookie_trimmed", session_id=session.id, dropped=list(dropped))
                return sealed
        log.error("session_cookie_too_large", session_id=session.id, size=len(sealed))
        raise SessionTooLarge(
            "The session is too large to keep in a cookie.",
            reason="session_too_large",
        )

    async def delete(self, cookie_value: str) -> None:
        # Nothing is kept server-side; the app clears the cookie.
        return None

    async def ping(self) -> bool:
        return True


def _trimmed(session: Session) -> Iterator[tuple[Session, tuple[str, ...]]]:
    """Ever smaller versions of ``session``, each with what it lacks (for the log)."""
    current = replace(
        session,
        id_token=None,
        others=tuple(replace(login, id_token=None) for login in session.others),
    )
    yield current, ("id_token",)
    for keep in range(len(current.proofs) - 1, 0, -1):
        yield replace(current, proofs=current.proofs[:keep]), ("id_token", "older_proofs")
    last_resort = replace(current, proofs=current.proofs[:1], name=None)
    yield last_resort, ("id_token", "older_proofs", "name")


class MemoryStore:
    """Sessions in this process's memory, behind an opaque random handle.

    Bounded: beyond ``max_sessions`` the least recently saved session is
    evicted. Expired sessions are removed when loaded, a few at a time on each
    save, and all at once by :meth:`sweep`. Not shared between worker processes.
    """

    def __init__(
        self,
        *,
        idle_timeout_s: float,
        lifetime_s: float,
        max_sessions: int = MAX_MEMORY_SESSIONS,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._idle_timeout_s = idle_timeout_s
        self._lifetime_s = lifetime_s
        self._max_sessions = max_sessions
        # Insertion order is save order: a save moves its entry to the end, so the
        # front holds the sessions saved longest ago (eviction and sweep start there).
        self._sessions: dict[str, Session] = {}
        self.evictions = 0  # for metrics

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, cookie_value: object) -> bool:
        return cookie_value in self._sessions

    async def load(self, cookie_value: str, now: float) -> Session | None:
        if not is_handle(cookie_value):
            return None
        session = self._sessions.get(cookie_value)
        if session is None:
            return None
        if self._expired(session, now):
            del self._sessions[cookie_value]
            return None
        return session

    async def save(
        self, session: Session, now: float, *, rotate: bool = False, previous: str | None = None
    ) -> str:
        handle: str | None = None
        if previous is not None:
            held = self._sessions.pop(previous, None)
            if (
                not rotate
                and held is not None
                and held.id == session.id
                and held.assurance() == session.assurance()
            ):
                handle = previous
        if handle is None:
            # Only ever a fresh random value: a handle the client chose is never adopted.
            handle = secrets.token_urlsafe(HANDLE_BYTES)
        self._sessions[handle] = session
        self._sweep_oldest(now)
        while len(self._sessions) > self._max_sessions:
            del self._sessions[next(iter(self._sessions))]
            self.evictions += 1
        return handle

    async def delete(self, cookie_value: str) -> None:
        if isinstance(cookie_value, str):
            self._sessions.pop(cookie_value, None)

    async def delete_by(self, sub: str | None, provider_sid: str | None) -> int:
        """Delete the sessions a logout token names; return how many there were.

        OpenID Connect Back-Channel Logout 1.0, 2.4: with ``sid``, the sessions
        of that provider session (and, when ``sub`` is also given, of that
        subject only); with ``sub`` alone, every session of the subject.
        """
        if sub is None and provider_sid is None:
            raise ValueError("delete_by needs sub or provider_sid")
        doomed = [
            handle
            for handle, session in self._sessions.items()
            if (provider_sid is None or session.provider_sid == provider_sid)
            and (sub is None or session.sub == sub)
        ]
        for handle in doomed:
            del self._sessions[handle]
        return len(doomed)

    async def ping(self) -> bool:
        return True

    def sweep(self, now: float) -> int:
        """Remove every expired session; return how many. O(n): for a periodic task."""
        dead = [h for h, s in self._sessions.items() if self._expired(s, now)]
        for handle in dead:
            del self._sessions[handle]
        return len(dead)

    def _sweep_oldest(self, now: float) -> None:
        oldest = list(itertools.islice(self._sessions.items(), SWEEP_PER_SAVE))
        for handle, session in oldest:
            if not self._expired(session, now):
                break  # the rest were saved later; most are alive
            del self._sessions[handle]

    def _expired(self, session: Session, now: float) -> bool:
        return expired(session, now, self._idle_timeout_s, self._lifetime_s)
