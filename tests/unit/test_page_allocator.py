"""PageAllocator: exact ids, lowest-first reuse, all-or-nothing alloc, strict frees."""

import pytest

from pdserve.shared.engine.page_allocator import PageAllocator


def test_fresh_allocator_hands_out_ascending_ids_from_one():
    a = PageAllocator(8)
    assert a.num_total == 7
    assert a.num_free == 7
    assert a.alloc(3) == [1, 2, 3]
    assert a.alloc(2) == [4, 5]
    assert a.num_free == 2
    assert a.alloc(0) == []


def test_freed_pages_are_reused_lowest_first():
    a = PageAllocator(8)
    assert a.alloc(5) == [1, 2, 3, 4, 5]
    a.free([4])
    a.free([2, 5])
    assert a.free_pages() == [2, 4, 5, 6, 7]
    assert a.alloc(2) == [2, 4]
    assert a.alloc(2) == [5, 6]
    assert a.alloc(1) == [7]


def test_exhaustion_returns_none_without_partial_allocation():
    a = PageAllocator(4)
    assert a.alloc(2) == [1, 2]
    assert a.alloc(2) is None
    assert a.num_free == 1
    assert a.alloc(1) == [3]
    assert a.alloc(1) is None


def test_bad_frees_raise_and_change_nothing():
    a = PageAllocator(6)
    assert a.alloc(3) == [1, 2, 3]
    a.free([2])
    with pytest.raises(ValueError, match="double free"):
        a.free([2])
    with pytest.raises(ValueError, match="double free"):
        a.free([3, 3])  # twice in one call
    with pytest.raises(ValueError):
        a.free([0])  # reserved
    with pytest.raises(ValueError):
        a.free([6])  # out of range
    with pytest.raises(ValueError):
        a.free([1, 4])  # 4 is free: nothing of the call happens, 1 stays allocated
    assert a.free_pages() == [2, 4, 5]
    assert not a.is_free(1) and not a.is_free(3) and not a.is_free(0)


def test_reset_and_minimum_size():
    a = PageAllocator(5)
    a.alloc(4)
    a.reset()
    assert a.num_free == 4
    assert a.alloc(4) == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        PageAllocator(1)
    with pytest.raises(ValueError):
        a.alloc(-1)
