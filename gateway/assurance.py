"""Assurance levels: what an ID token proves, and whether that is fresh enough.

A session keeps a short list of proofs — the ``acr``, ``amr`` and ``auth_time`` of
each verified ID token — rather than the level names they mapped to, so that a
changed level definition is applied to old proofs too (levels are re-evaluated,
never trusted from storage).

Freshness is measured without leeway. Clock skew is allowed for once, when a token
arrives (OIDC Core 3.1.3.7: ``iat``, ``exp``, ``auth_time`` not in the future); a
proof's time is then clamped to when the gateway received it (:func:`proven_at`), so
that a provider clock running ahead cannot make a proof look fresher than it is, and
``max_age: 5m`` means five minutes, not five plus the skew.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from gateway.model import Level


class ProofLike(Protocol):
    @property
    def acr(self) -> str | None: ...
    @property
    def amr(self) -> tuple[str, ...]: ...
    @property
    def auth_time(self) -> float: ...


P = TypeVar("P", bound=ProofLike)


def proven_at(auth_time: float, received_at: float) -> float:
    """When the gateway can vouch the user authenticated: the provider's ``auth_time``,
    but never later than the moment the ID token reached the gateway.

    A provider clock ahead of ours (within the skew the token checks allow) would
    otherwise date a proof in the future and stretch every ``max_age`` by that much.
    A provider clock behind ours makes proofs look older: that fails closed.
    """
    return min(auth_time, received_at)


def fresh_enough(proof: ProofLike, max_age_s: int | None, now: float) -> bool:
    """Whether ``proof`` was made at most ``max_age_s`` seconds before ``now`` (no leeway)."""
    return max_age_s is None or now - proof.auth_time <= max_age_s


def level_of(levels: Sequence[Level], acr: str | None, amr: Iterable[str]) -> Level | None:
    """The strongest level whose ``acr`` list holds ``acr`` or whose ``amr_any`` meets ``amr``.

    The level comes from what the provider asserted in the verified token, never
    from what the gateway asked for: a provider that answers a ``phr`` request with
    a password login proves the password level only.
    """
    amr_set = frozenset(amr)
    for level in reversed(levels):  # strongest first
        if (acr is not None and acr in level.acr) or not amr_set.isdisjoint(level.amr_any):
            return level
    return None


def satisfies(
    levels: Sequence[Level],
    proofs: Iterable[ProofLike],
    required: Level,
    max_age_s: int | None,
    now: float,
) -> bool:
    """True when ``required`` or a stronger level was proven within ``max_age_s``."""
    return bool(satisfying_proofs(levels, proofs, required, max_age_s, now))


def satisfying_proofs(
    levels: Sequence[Level],
    proofs: Iterable[P],
    required: Level,
    max_age_s: int | None,
    now: float,
) -> list[P]:
    """The proofs that meet ``required`` within ``max_age_s``, newest first."""
    found = []
    for proof in proofs:
        if not fresh_enough(proof, max_age_s, now):
            continue
        level = level_of(levels, proof.acr, proof.amr)
        if level is not None and level.rank >= required.rank:
            found.append(proof)
    found.sort(key=lambda p: p.auth_time, reverse=True)
    return found


def highest(levels: Sequence[Level], proofs: Iterable[ProofLike]) -> Level | None:
    """The strongest level any of the session's proofs reaches, however old."""
    best: Level | None = None
    for proof in proofs:
        level = level_of(levels, proof.acr, proof.amr)
        if level is not None and (best is None or level.rank > best.rank):
            best = level
    return best


def acr_values_for(level: Level) -> tuple[str, ...]:
    """The ``acr_values`` a step-up to ``level`` asks for.

    The level's own values, in the order the operator listed them (list the
    strongest, most preferred one first). Stronger levels are not added: asking
    for more than the rule needs makes providers over-prompt, and a stronger
    answer is accepted anyway because :func:`satisfies` compares ranks.
    """
    return level.acr
