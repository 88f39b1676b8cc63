"""Short-lived server-side state beside the sessions: single-use claims and kept requests.

``claim_once`` records that a one-time proof or a logout token's ``jti`` was used;
``put_blob``/``take_blob`` keep a request across a step-up round trip and hand it out
once. :class:`LocalAux` keeps them in this process (one worker); the Redis store
implements the same three methods for several workers and replicas.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

# Bounds memory when many claims or kept requests are outstanding; the oldest go first.
MAX_LOCAL_ENTRIES = 100_000


class AuxStore(Protocol):
    async def claim_once(self, name: str, ttl_s: float) -> bool:
        """True the first time ``name`` is claimed within ``ttl_s``."""
        ...

    async def put_blob(self, name: str, payload: Mapping[str, Any], ttl_s: float) -> None:
        """Keep ``payload`` under ``name`` for at most ``ttl_s``."""
        ...

    async def take_blob(self, name: str) -> dict[str, Any] | None:
        """The payload under ``name``, removed in the same step; None if gone."""
        ...


class LocalAux:
    """In-process :class:`AuxStore`. Atomic because the event loop runs one task at a time."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_LOCAL_ENTRIES
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def _live(self, name: str) -> tuple[float, Any] | None:
        entry = self._entries.get(name)
        if entry is not None and entry[0] <= self._clock():
            del self._entries[name]
            return None
        return entry

    def _put(self, name: str, value: Any, ttl_s: float) -> None:
        self._entries[name] = (self._clock() + ttl_s, value)
        self._entries.move_to_end(name)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def claim_once(self, name: str, ttl_s: float) -> bool:
        if self._live(f"once:{name}") is not None:
            return False
        self._put(f"once:{name}", True, ttl_s)
        return True

    async def put_blob(self, name: str, payload: Mapping[str, Any], ttl_s: float) -> None:
        self._put(f"blob:{name}", dict(payload), ttl_s)

    async def take_blob(self, name: str) -> dict[str, Any] | None:
        entry = self._live(f"blob:{name}")
        if entry is None:
            return None
        del self._entries[f"blob:{name}"]
        value: dict[str, Any] = entry[1]
        return value
