"""gateway.memo: bounded in entries and bytes, forgetting everything when full."""

from __future__ import annotations

import tracemalloc

import pytest
from multidict import CIMultiDict

from gateway.memo import HEADER_MEMO_BYTES, HEADER_MEMO_ENTRIES, Memo, header_set_size


def test_it_remembers_what_was_put() -> None:
    memo: Memo[str, int] = Memo(max_entries=4, max_bytes=100)
    memo.put("a", 1, 10)
    assert memo.get("a") == 1
    assert memo.get("b") is None


def test_it_is_cleared_when_the_entries_would_exceed_the_bound() -> None:
    memo: Memo[int, int] = Memo(max_entries=3, max_bytes=1_000)
    for i in range(3):
        memo.put(i, i, 1)
    assert len(memo) == 3
    memo.put(3, 3, 1)
    assert len(memo) == 1 and memo.get(3) == 3 and memo.get(0) is None


def test_it_is_cleared_when_the_bytes_would_exceed_the_bound() -> None:
    memo: Memo[int, int] = Memo(max_entries=100, max_bytes=100)
    memo.put(1, 1, 60)
    memo.put(2, 2, 40)
    assert len(memo) == 2
    memo.put(3, 3, 1)
    assert len(memo) == 1 and memo.get(3) == 3


def test_an_entry_bigger_than_the_whole_memo_is_not_kept() -> None:
    memo: Memo[int, int] = Memo(max_entries=100, max_bytes=100)
    memo.put(1, 1, 10)
    memo.put(2, 2, 101)
    assert memo.get(2) is None
    assert memo.get(1) == 1  # and what was there stays


def test_a_flood_of_distinct_keys_never_grows_it_past_its_bounds() -> None:
    memo: Memo[int, bytes] = Memo(max_entries=50, max_bytes=1_000)
    for i in range(10_000):
        memo.put(i, b"x" * 30, 30)
        assert len(memo) <= 50
        assert len(memo) * 30 <= 1_000


@pytest.mark.parametrize(
    ("headers", "value_bytes"), [(3, 4000), (10, 20), (10, 200), (40, 10), (100, 2)]
)
def test_a_header_memo_stays_near_its_byte_budget_in_real_memory(
    headers: int, value_bytes: int
) -> None:
    # What the gateway keeps per distinct client header set: the raw tuple (in the key)
    # and the filtered copy. Many small headers cost mostly object overhead, which
    # header_set_size counts too.
    memo: Memo[object, CIMultiDict[str]] = Memo(
        max_entries=HEADER_MEMO_ENTRIES, max_bytes=HEADER_MEMO_BYTES
    )
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        peak = 0
        for i in range(3 * HEADER_MEMO_ENTRIES):
            raw = tuple(
                (f"X-H{j}".encode(), f"{i}-{j}-{'v' * value_bytes}".encode())
                for j in range(headers)
            )
            filtered = CIMultiDict((n.decode(), v.decode()) for n, v in raw)
            memo.put((raw, "127.0.0.1"), filtered, header_set_size(raw))
            peak = max(peak, tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * HEADER_MEMO_BYTES, f"{peak / 1e6:.1f} MB"
