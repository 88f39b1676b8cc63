"""Revoking cookie-store sessions, which cannot be deleted.

A cookie-store session cannot be deleted: a saved copy of the cookie would stay
valid until it expires (CWE-613). Signing out records the session id, and a
back-channel logout the subject or provider session with its time, beside the
one-time claims (this process, or Redis with session.redis_url), until every
session they name has expired.
"""

from __future__ import annotations

from gateway.session.aux import AuxStore
from gateway.session.model import Session

# Replicas' clocks differ a little; a revocation outlives the session by this much.
REVOCATION_MARGIN_S = 60


def revocation_names(session: Session) -> list[str]:
    names = [f"revoked:id:{session.id}", f"revoked:sub:{session.sub}"]
    if session.provider_sid is not None:
        names.append(f"revoked:sid:{session.provider_sid}")
    return names


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
