"""Assurance levels: what an ID token proves, and whether that is fresh enough.

A session keeps a short list of proofs — the ``acr``, ``amr`` and ``auth_time`` of
each verified ID token — rather than the level names they mapped to, so that a
changed level definition is applied to old proofs too (levels are re-evaluated,
never trusted from storage).
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
        if max_age_s is not None and now - proof.auth_time > max_age_s:
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
