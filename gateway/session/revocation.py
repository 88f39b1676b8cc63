"""Revoking cookie-store sessions, which cannot be deleted.

A cookie-store session cannot be deleted: a saved copy of the cookie would stay
valid until it expires (CWE-613). Signing out records the session id, and a
back-channel logout the subject or provider session with its time, beside the
one-time claims (this process, or Redis with session.redis_url), until every
session they name has expired.
"""

from __future__ import annotations

import structlog

from gateway.session.aux import AuxStore
from gateway.session.model import Session

log = structlog.get_logger("gateway")

# Replicas' clocks differ a little; a revocation outlives the session by this much.
REVOCATION_MARGIN_S = 60


def revocation_names(session: Session) -> list[str]:
    names = [f"revoked:id:{session.id}", f"revoked:sub:{session.sub}"]
    if session.provider_sid is not None:
        names.append(f"revoked:sid:{session.provider_sid}")
    return names


async def unrevoked(
    aux: AuxStore, session: Session, *, sealed: bool, several: bool
) -> Session | None:
    """``session`` as far as sign-outs leave it: None when it was signed out (a cookie
    session, ``sealed``), else without the sign-ins a provider's back-channel logout
    ended (``several`` providers)."""
    if sealed and await revoked(aux, session):
        log.info("session_rejected", reason="revoked")
        return None
    return await without_revoked_logins(aux, session) if several else session


async def revoked(aux: AuxStore, session: Session) -> bool:
    marks = await aux.get_records(revocation_names(session))
    if marks[0] is not None:
        return True
    # By subject or provider session: every session created up to that moment.
    return any(at is not None and session.created_at <= at for at in marks[1:])


async def revoke(
    aux: AuxStore,
    now: float,
    session_lifetime_s: int,
    *,
    session: Session | None = None,
    sub: str | None = None,
    provider_sid: str | None = None,
) -> None:
    """Record a sign-out until every session it covers has expired anyway."""
    lifetime_s = session_lifetime_s + REVOCATION_MARGIN_S
    if session is not None:
        left_s = session.created_at + lifetime_s - now
        await aux.put_record(f"revoked:id:{session.id}", now, max(left_s, 1))
    if sub is not None and provider_sid is None:
        await aux.put_record(f"revoked:sub:{sub}", now, lifetime_s)
    if provider_sid is not None:
        await aux.put_record(f"revoked:sid:{provider_sid}", now, lifetime_s)


# -- several providers (oidc.providers) ---------------------------------------------
# A back-channel logout from one provider ends that provider's sign-ins only: the
# marks name the provider, and a session loses the sign-ins they cover (and is gone
# when none is left). Sub and sid are the provider's own, never compared across.


def _login_names(provider: str, sub: str, provider_sid: str | None) -> list[str]:
    names = [f"revoked:login:{provider}:sub:{sub}"]
    if provider_sid is not None:
        names.append(f"revoked:login:{provider}:sid:{provider_sid}")
    return names


async def without_revoked_logins(aux: AuxStore, session: Session) -> Session | None:
    """``session`` without the sign-ins a provider's logout has ended since they began."""
    logins = session.logins()
    names = [_login_names(login.provider, login.sub, login.provider_sid) for login in logins]
    marks = await aux.get_records([name for group in names for name in group])
    ended: set[str] = set()
    at = iter(marks)
    for login, group in zip(logins, names, strict=True):
        if any(mark is not None and login.since <= mark for mark in (next(at) for _ in group)):
            ended.add(login.provider)
    return session.without(frozenset(ended)) if ended else session


async def revoke_logins(
    aux: AuxStore,
    now: float,
    session_lifetime_s: int,
    *,
    provider: str,
    sub: str | None,
    provider_sid: str | None,
) -> None:
    """Back-Channel Logout 1.0 2.4 for ``provider``: with ``sid``, that provider session's
    sign-ins; with ``sub`` alone, all of the subject's there."""
    lifetime_s = session_lifetime_s + REVOCATION_MARGIN_S
    if provider_sid is not None:
        await aux.put_record(f"revoked:login:{provider}:sid:{provider_sid}", now, lifetime_s)
    elif sub is not None:
        await aux.put_record(f"revoked:login:{provider}:sub:{sub}", now, lifetime_s)
