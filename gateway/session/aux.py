"""Short-lived server-side state beside the sessions: one-time records and kept requests.

``claim_once`` records that a one-time proof or a logout token's ``jti`` was used;
``put_record``/``get_records`` hold revocations (a signed-out cookie-store session);
``put_blob``/``take_blob`` keep a request across a step-up round trip and hand it out
once. :class:`LocalAux` keeps them in this process (one worker); the Redis store
implements the same methods for several workers and replicas.

One-time records and kept requests are kept apart. Anybody can make the gateway
keep a request; only a sign-in at the provider makes a one-time record. So a record
is never evicted before it expires: a flood of kept requests cannot push out a used
proof and make it work again. When either part is full, the new entry is refused
(:class:`gateway.errors.Busy`, 503), never an old one forgotten.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from gateway.errors import Busy

# One-time records are made by sign-ins and sign-outs only: each is about 300 bytes
# here, so 200k (60 MB) is far more than the proofs, logout tokens and revocations a
# process sees within a session lifetime; past it, new claims are refused (503).
MAX_ONE_TIME_RECORDS = 200_000
# A backstop on the number of kept requests; their bytes are bounded by the app's
# KeptLedger (step_up.keep_budget) before they get here.
MAX_LOCAL_BLOBS = 100_000


class AuxStore(Protocol):
    async def claim_once(self, name: str, ttl_s: float) -> bool:
        """True the first time ``name`` is claimed within ``ttl_s``."""
        ...

    async def put_record(self, name: str, value: float, ttl_s: float) -> None:
        """Hold ``value`` under ``name`` for ``ttl_s``, beside the one-time claims."""
        ...

    async def get_records(self, names: Iterable[str]) -> list[float | None]:
        """The values under ``names`` (None where there is none), in order."""
        ...

    async def put_blob(self, name: str, payload: Mapping[str, Any], ttl_s: float) -> None:
        """Keep ``payload`` under ``name`` for at most ``ttl_s``."""
        ...

    async def take_blob(self, name: str) -> dict[str, Any] | None:
        """The payload under ``name``, removed in the same step; None if gone."""
        ...


class _Expiring:
    """Entries that live until their own expiry time, never evicted earlier."""

    def __init__(self, capacity: int, what: str) -> None:
        self.capacity = capacity
        self._what = what
        self.entries: dict[str, tuple[float, Any]] = {}
        self._expiry: list[tuple[float, str]] = []

    def live(self, name: str, now: float) -> tuple[float, Any] | None:
        entry = self.entries.get(name)
        if entry is not None and entry[0] <= now:
            del self.entries[name]
            return None
        return entry

    def put(self, name: str, value: Any, ttl_s: float, now: float) -> None:
        self.sweep(now)
        if name not in self.entries and len(self.entries) >= self.capacity:
            soonest = self._expiry[0][0] if self._expiry else now + 60
            raise Busy(
                "The gateway is holding too much right now; try again shortly.",
                reason=f"{self._what}_full",
                retry_after_s=int(soonest - now) + 1,
            )
        expires_at = now + ttl_s
        self.entries[name] = (expires_at, value)
        heapq.heappush(self._expiry, (expires_at, name))

    def sweep(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, name = heapq.heappop(self._expiry)
            entry = self.entries.get(name)
            if entry is not None and entry[0] <= now:
                del self.entries[name]
        if len(self._expiry) > 2 * len(self.entries) + 1024:
            # Taken entries linger in the heap until their time; drop them.
            self._expiry = [(at, name) for name, (at, _) in self.entries.items()]
            heapq.heapify(self._expiry)


class LocalAux:
    """In-process :class:`AuxStore`. Atomic because the event loop runs one task at a time."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_records: int = MAX_ONE_TIME_RECORDS,
        max_blobs: int = MAX_LOCAL_BLOBS,
    ) -> None:
        self._clock = clock
        self._records = _Expiring(max_records, "one_time_records")
        self._blobs = _Expiring(max_blobs, "kept_requests")

    @property
    def record_count(self) -> int:
        return len(self._records.entries)

    @property
    def blob_count(self) -> int:
        return len(self._blobs.entries)

    async def claim_once(self, name: str, ttl_s: float) -> bool:
        now = self._clock()
        if self._records.live(f"once:{name}", now) is not None:
            return False
        self._records.put(f"once:{name}", 1.0, ttl_s, now)
        return True

    async def put_record(self, name: str, value: float, ttl_s: float) -> None:
        self._records.put(f"rec:{name}", value, ttl_s, self._clock())

    async def get_records(self, names: Iterable[str]) -> list[float | None]:
        now = self._clock()
        out: list[float | None] = []
        for name in names:
            entry = self._records.live(f"rec:{name}", now)
            out.append(None if entry is None else float(entry[1]))
        return out

    async def put_blob(self, name: str, payload: Mapping[str, Any], ttl_s: float) -> None:
        self._blobs.put(name, dict(payload), ttl_s, self._clock())

    async def take_blob(self, name: str) -> dict[str, Any] | None:
        entry = self._blobs.live(name, self._clock())
        if entry is None:
            return None
        del self._blobs.entries[name]
        value: dict[str, Any] = entry[1]
        return value
