"""Page accounting of the paged KV cache's block manager (host side, no jax)."""
import random

import numpy as np
import pytest

from jax_tokenweave.engine.block_manager import BlockManager, OutOfPages, UnknownSequence


def test_constructor_validates():
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(1, 16)          # only the scratch page
    with pytest.raises(ValueError, match="page_size"):
        BlockManager(8, 0)
    bm = BlockManager(8, 16)
    assert bm.num_usable == 7 and bm.num_free == 7 and bm.num_used == 0
    assert bm.capacity_tokens == 7 * 16
    bm.check_invariants()


def test_pages_for():
    bm = BlockManager(8, 4)
    assert [bm.pages_for(n) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    with pytest.raises(ValueError):
        bm.pages_for(-1)


def test_allocate_across_page_boundaries_and_slots():
    bm = BlockManager(10, 4)
    assert bm.allocate(0, 3) == [1]
    assert bm.allocate(0, 4) == []          # still fits page 1
    assert bm.allocate(0, 5) == [2]         # position 4 crosses into a second page
    assert bm.allocate(0, 2) == []          # never shrinks
    assert bm.block_table(0) == [1, 2]
    assert bm.allocate(1, 9) == [3, 4, 5]   # a second sequence, three pages at once
    assert bm.allocate(0, 12) == [6]
    assert bm.block_table(0) == [1, 2, 6]
    assert bm.num_free == 10 - 1 - 6
    assert bm.slot(0, 0) == (1, 0)
    assert bm.slot(0, 3) == (1, 3)
    assert bm.slot(0, 4) == (2, 0)
    assert bm.slot(0, 9) == (6, 1)
    assert bm.slot(1, 8) == (5, 0)
    pages, offs = bm.slots(0, 2, 9)
    assert pages.dtype == np.int32 and offs.dtype == np.int32
    assert list(zip(pages.tolist(), offs.tolist())) == [bm.slot(0, p) for p in range(2, 11)]
    with pytest.raises(IndexError):
        bm.slot(0, 12)                      # beyond its three pages
    with pytest.raises(IndexError):
        bm.slot(0, -1)
    with pytest.raises(IndexError):
        bm.slots(1, 10, 3)
    bm.check_invariants()


def test_new_sequence_with_zero_tokens_is_registered_without_pages():
    bm = BlockManager(4, 4)
    assert bm.allocate(5, 0) == []
    assert 5 in bm and bm.block_table(5) == [] and bm.num_free == 3
    assert bm.free(5) == 0
    assert 5 not in bm


def test_scratch_page_never_handed_out():
    bm = BlockManager(6, 2)
    for sid in range(5):
        bm.allocate(sid, 2)
    owned = sorted(p for sid in range(5) for p in bm.block_table(sid))
    assert owned == [1, 2, 3, 4, 5]
    assert bm.num_free == 0
    bm.check_invariants()


def test_reuse_after_free_lifo():
    bm = BlockManager(8, 4)
    bm.allocate(0, 8)          # pages 1, 2
    bm.allocate(1, 4)          # page 3
    assert bm.free(0) == 2
    assert bm.num_free == 6
    assert 0 not in bm
    # The freed pages are handed out again first, the sequence's first page first.
    assert bm.allocate(2, 12) == [1, 2, 4]
    bm.check_invariants()
    bm.free(1)
    bm.free(2)
    assert bm.num_free == 7
    bm.check_invariants()


def test_exhaustion_message_names_numbers_and_fix_and_is_atomic():
    bm = BlockManager(256, 16)      # 255 usable
    bm.allocate(1, 254 * 16)        # leaves 1 free
    bm.allocate(7, 0)               # sequence 7, no pages yet
    assert bm.num_free == 1
    before_free, before_table = bm.num_free, bm.block_table(7)
    assert not bm.can_allocate(7, 48)
    with pytest.raises(OutOfPages) as e:
        bm.allocate(7, 48)          # needs 3 pages
    msg = str(e.value)
    assert "sequence 7 needs 3 more pages of 16 tokens" in msg
    assert "1 free of 255" in msg
    assert "raise num_pages" in msg and "max_num_seqs" in msg
    # atomic: nothing was taken
    assert bm.num_free == before_free and bm.block_table(7) == before_table
    bm.check_invariants()
    assert bm.can_allocate(7, 16)
    assert bm.allocate(7, 16) != []
    assert bm.num_free == 0


def test_atomic_failure_for_existing_sequence():
    bm = BlockManager(5, 4)          # 4 usable
    bm.allocate(0, 4)                # 1 page
    bm.allocate(1, 8)                # 2 pages; 1 free
    with pytest.raises(OutOfPages):
        bm.allocate(0, 13)           # needs 3 more
    assert bm.block_table(0) == [1] and bm.num_free == 1
    assert bm.can_allocate(0, 8) and not bm.can_allocate(0, 9)
    bm.allocate(0, 8)
    assert bm.num_free == 0
    bm.check_invariants()


def test_unknown_and_double_free_errors():
    bm = BlockManager(4, 4)
    with pytest.raises(UnknownSequence, match="sequence 3"):
        bm.block_table(3)
    with pytest.raises(KeyError):    # UnknownSequence is a KeyError
        bm.slot(3, 0)
    with pytest.raises(UnknownSequence):
        bm.free(3)
    with pytest.raises(UnknownSequence):
        bm.block_tables_array([3], 2)
    bm.allocate(3, 5)
    bm.free(3)
    with pytest.raises(UnknownSequence, match="already freed"):
        bm.free(3)
    assert bm.num_free == 3          # the failed second free returned nothing twice
    bm.check_invariants()


def test_block_tables_array():
    bm = BlockManager(10, 4)
    bm.allocate(0, 9)    # 3 pages
    bm.allocate(1, 1)    # 1 page
    bm.allocate(2, 0)    # none
    arr = bm.block_tables_array([1, 0, 2], 4)
    assert arr.dtype == np.int32 and arr.shape == (3, 4)
    assert arr.tolist() == [[4, 0, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]]
    assert bm.block_tables_array([], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="width"):
        bm.block_tables_array([0], 2)


def test_check_invariants_catches_corruption():
    bm = BlockManager(6, 4)
    bm.allocate(0, 8)
    bm.allocate(1, 4)
    bm.check_invariants()
    bm._free.append(bm._tables[0][0])         # a page both free and owned
    with pytest.raises(AssertionError, match="page"):
        bm.check_invariants()
    bm._free.pop()
    bm._tables[1].append(bm._tables[0][1])    # a page owned twice
    with pytest.raises(AssertionError, match="owned by sequence 0"):
        bm.check_invariants()
    bm._tables[1].pop()
    lost = bm._tables[1].pop()                # a leaked page
    with pytest.raises(AssertionError, match="leaked"):
        bm.check_invariants()
    bm._tables[1].append(lost)
    bm._tables[1].append(0)                   # the scratch page owned
    with pytest.raises(AssertionError, match="outside"):
        bm.check_invariants()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_invariants(seed):
    rng = random.Random(seed)
    num_pages, page_size = 40, 4
    bm = BlockManager(num_pages, page_size)
    want: dict[int, int] = {}     # the model: seq -> positions it holds
    next_id = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.5 or not want:                     # new sequence
            n = int(rng.paretovariate(1.2) * 3)
            sid, next_id = next_id, next_id + 1
            fits = bm.pages_for(n) <= num_pages - 1 - sum(bm.pages_for(v) for v in want.values())
            assert bm.can_allocate(sid, n) == fits
            if fits:
                bm.allocate(sid, n)
                want[sid] = n
            else:
                free_before = bm.num_free
                with pytest.raises(OutOfPages):
                    bm.allocate(sid, n)
                assert bm.num_free == free_before and sid not in bm
        elif op < 0.8:                               # grow
            sid = rng.choice(list(want))
            n = want[sid] + rng.randint(0, 9)
            table_before = bm.block_table(sid)
            try:
                new = bm.allocate(sid, n)
            except OutOfPages:
                assert bm.block_table(sid) == table_before
            else:
                assert bm.block_table(sid) == table_before + new
                want[sid] = n
        else:                                        # free
            sid = rng.choice(list(want))
            assert bm.free(sid) == bm.pages_for(want.pop(sid))
        bm.check_invariants()
        for sid, n in want.items():
            assert bm.num_pages_of(sid) == bm.pages_for(n)
            if n:
                page, off = bm.slot(sid, n - 1)
                assert 1 <= page < num_pages and off == (n - 1) % page_size
        assert bm.num_free == num_pages - 1 - sum(bm.pages_for(v) for v in want.values())
    for sid in list(want):
        bm.free(sid)
    assert bm.num_free == num_pages - 1
    bm.check_invariants()
