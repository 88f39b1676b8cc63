"""gateway.memo: bounded in entries and bytes, forgetting everything when full."""

from __future__ import annotations

from gateway.memo import Memo


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
