"""A small bounded memo for pure per-request computations.

Requests repeat themselves: the same client sends the same headers on every
request of a connection, an upstream answers with the same headers for a
second at a time. Filtering those headers is pure (the same input gives the
same output), so the gateway keeps recent results, keyed by everything they
are computed from.

The memo is bounded both in entries and in the bytes its entries take (as the
caller estimates them: :func:`header_set_size` for header sets), and it is
cleared when either bound would be passed: clearing costs O(1) per entry over
the memo's life, and a flood of distinct inputs costs one insertion each, never
more memory. Every user keys it by all that its result depends on, and hands
out copies of mutable results.
"""

from __future__ import annotations

from typing import Generic, TypeVar

# Each memo of header sets (the clients', the upstreams'): at most this many, this big.
HEADER_MEMO_ENTRIES = 1024
HEADER_MEMO_BYTES = 4 * 1024 * 1024

# What one header takes in memory beyond its name and value, about (two bytes objects
# and their tuple in the key, two strings and a slot in the filtered copy).
HEADER_OVERHEAD_BYTES = 320

K = TypeVar("K")
V = TypeVar("V")


class Memo(Generic[K, V]):
    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self._entries: dict[K, V] = {}
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V, size: int) -> None:
        """Remember ``value`` for ``key``; ``size`` is what the entry holds, in bytes."""
        if size > self._max_bytes:
            return
        if len(self._entries) >= self._max_entries or self._bytes + size > self._max_bytes:
            self._entries.clear()
            self._bytes = 0
        self._entries[key] = value
        self._bytes += size

    def __len__(self) -> int:
        return len(self._entries)


def header_set_size(raw: tuple[tuple[bytes, bytes], ...]) -> int:
    """About what remembering ``raw`` and a filtered copy of it takes, in bytes."""
    return sum(2 * (len(name) + len(value)) + HEADER_OVERHEAD_BYTES for name, value in raw)
